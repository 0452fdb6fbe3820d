# syntax=docker/dockerfile:1
# GPU worker image of the Cogumi stack: the same cogumi package with the `ml` and `airflow`
# extras on a CUDA base, plus bitsandbytes (QLoRA) and llmcompressor (AWQ/GPTQ/SparseGPT).
# One image, two uses (see docker/gpu-worker-entrypoint.sh):
#   - KubernetesPodOperator pods:  cogumi run-step <step> ...
#   - the Edge worker on the GPU box:  airflow edge worker -q gpu
#
#   docker build -f docker/gpu-worker.Dockerfile -t cogumi/gpu-worker:0.1.0 .
#
# The host needs the NVIDIA driver and the NVIDIA Container Toolkit. torch's CUDA wheels bundle
# their CUDA libraries; the CUDA runtime base supplies cudart/cuBLAS for bitsandbytes and the
# NVIDIA_* settings the container toolkit reads.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
FROM ${CUDA_BASE_IMAGE}

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
# Empty: torch from PyPI (its Linux x86_64 wheel is a CUDA build). Or pick a CUDA variant, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=""
ARG AIRFLOW_VERSION=3.3.2
ARG BITSANDBYTES_VERSION=0.50.2
# llmcompressor 0.14.0.1 pins transformers to 5.15-5.17; the ml extra pins 5.17.0.
ARG LLMCOMPRESSOR_VERSION=0.14.0.1
# GGUF export: llama-cpp-python (built from its sdist) quantizes and checks the GGUF; the HF-to-GGUF
# converter ships only in that sdist, so it is extracted to /opt/cogumi/llama-convert. Built for any x86-64 host
# with AVX2 rather than for the build host's CPU (GGML_NATIVE=OFF): the image runs elsewhere, and a native build
# on a host that reports AMX crashes where AMX is not usable (tools/llama_cmake_args.sh).
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (Ubuntu 22.04 ships 3.10) from the deadsnakes PPA; gcc and the Python headers are
# there for Triton, which compiles small launchers at run time; tini reaps and forwards signals.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
        gcc g++ cmake make libc6-dev ca-certificates curl git tini \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

RUN "python${PYTHON_VERSION}" -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first, so nothing else picks its build.
RUN pip install --upgrade pip \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml /opt/cogumi/src/pyproject.toml
COPY cogumi_tasks /opt/cogumi/src/cogumi_tasks
RUN pip install \
        "/opt/cogumi/src[ml,airflow]" \
        "apache-airflow[postgres,statsd]==${AIRFLOW_VERSION}" \
        "torch==${TORCH_VERSION}" \
        "bitsandbytes==${BITSANDBYTES_VERSION}" \
        "llmcompressor==${LLMCOMPRESSOR_VERSION}" \
    && python -c "import cogumi_tasks, torch, transformers, peft, bitsandbytes, llmcompressor, airflow.providers.edge3" \
    && cogumi --help >/dev/null
RUN pip download --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_VERSION}" -d /tmp/llama \
    && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install /tmp/llama/llama_cpp_python-${LLAMA_CPP_VERSION}.tar.gz \
    && mkdir -p /opt/cogumi/llama-convert \
    && tar xzf /tmp/llama/llama_cpp_python-${LLAMA_CPP_VERSION}.tar.gz -C /opt/cogumi/llama-convert --strip-components=3 \
        $(for f in convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py; do \
            echo "llama_cpp_python-${LLAMA_CPP_VERSION}/vendor/llama.cpp/$f"; done) \
    && rm -rf /tmp/llama \
    && python -c "import llama_cpp"

# Same uid/gid as the official Airflow image, so the shared logs volume is writable by both.
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/cogumi --shell /bin/bash cogumi \
    && mkdir -p /opt/airflow/dags /opt/airflow/plugins /opt/airflow/logs /opt/cogumi/hf-cache \
    && chown -R 50000:0 /opt/airflow /opt/cogumi/hf-cache \
    && chmod -R g+rwX /opt/airflow /opt/cogumi/hf-cache

COPY docker/gpu-worker-entrypoint.sh /usr/local/bin/cogumi-entrypoint
COPY --chown=50000:0 configs /opt/cogumi/configs
COPY --chown=50000:0 plugins /opt/airflow/plugins
COPY --chown=50000:0 dags /opt/airflow/dags

ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    COGUMI_CONFIG_DIR=/opt/cogumi/configs \
    COGUMI_LLAMA_CONVERT=/opt/cogumi/llama-convert \
    HF_HOME=/opt/cogumi/hf-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 50000:0
WORKDIR /opt/airflow
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/cogumi-entrypoint"]
CMD ["cogumi", "--help"]
