"""PreloadLocalExecutor: Airflow's LocalExecutor with the steps' heavy libraries imported before its workers fork.

On Linux a LocalExecutor task runs in a process forked (without exec) from one of the executor's workers, which
are forked from the scheduler, so every module the scheduler imported before starting its workers is already
imported in each task. The steps import torch, transformers, peft and the like inside their functions (the library
stays light to import); in a fresh task process that took 5-8 s per step on 2 CPU cores, every step again. This
executor imports them once, when the scheduler starts it, and then starts the workers as LocalExecutor does.

Only imports happen before the fork: no tensor operation runs, so no thread pool of torch exists to be copied
(each task starts its own). With the ``spawn`` start method nothing is inherited and the executor says so.
The local stack runs this executor (``cogumi_tasks.stack.local``); on other executors the steps import as usual.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import time
from collections.abc import Iterable

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

# What the steps import inside their functions, heaviest first (transformers' Llama classes are imported lazily by
# transformers itself, on the first from_pretrained).
PRELOAD_MODULES = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "trl",
    "datasets",
    "sentence_transformers",
    "sklearn.cluster",
    "safetensors.torch",
    "llama_cpp",
)


def preload(modules: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Import ``modules``; returns (imported, {module: why not}). A module that fails to import is skipped: the step
    that needs it imports it itself and fails there with its own error."""
    imported, failed = [], {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import error only means this module is not preloaded
            failed[name] = f"{type(exc).__name__}: {exc}"
        else:
            imported.append(name)
    return imported, failed


class PreloadLocalExecutor(LocalExecutor):
    """LocalExecutor that imports :data:`PRELOAD_MODULES` before it forks its workers (module docstring)."""

    preload_modules: tuple[str, ...] = PRELOAD_MODULES

    def start(self) -> None:
        if not self.is_mp_using_fork:  # LocalExecutor's own reading of the start method
            log.warning("PreloadLocalExecutor: start method %s: tasks do not inherit imports, nothing preloaded",
                        multiprocessing.get_start_method())
        else:
            started = time.monotonic()
            imported, failed = preload(self.preload_modules)
            log.info("PreloadLocalExecutor: imported %d modules for the tasks in %.1f s%s", len(imported),
                     time.monotonic() - started, f"; not imported: {failed}" if failed else "")
        super().start()
