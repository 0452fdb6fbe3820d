"""Where a task is queued, decided when the DAG is parsed.

A ``gpu_queue`` step must be routed to its queue before it runs, so the deployment's config
(``COGUMI_CONFIG``, default ``tiny``) decides placement at parse time; the other targets are
decided at run time from the run's own config.
"""

from __future__ import annotations

import os
from functools import lru_cache

from airflow.sdk import Asset, Param


@lru_cache(maxsize=1)
def _deployment_compute():
    from cogumi_tasks.core.config import load_config

    return load_config(os.environ.get("COGUMI_CONFIG", "tiny")).compute


def deployment_config() -> str:
    return os.environ.get("COGUMI_CONFIG", "tiny")


EDGE_EXECUTOR = "EdgeExecutor"


def placement(step: str) -> dict[str, str]:
    """Operator kwargs placing ``step``: queue ``gpu`` on the Edge executor when the deployment's
    config says ``gpu_queue`` (Airflow routes a task to a non-default executor only when the task
    names it), else the default queue and executor."""
    compute = _deployment_compute()
    if compute.target(step) == "gpu_queue":
        return {"queue": compute.gpu_queue, "executor": EDGE_EXECUTOR}
    return {"queue": "default"}


def phase_asset(phase: str) -> Asset:
    """The Asset a phase publishes and the next phase is scheduled on."""
    return Asset(name=f"cogumi_{phase}", uri=f"cogumi://pipeline/{phase}")


def run_params(**extra: Param) -> dict[str, Param]:
    """The form every manual run shows: which config, plus phase-specific overrides."""
    return {
        "config": Param(deployment_config(), type="string", title="Config",
                        description="A config name in configs/ (tiny, production) or a YAML path."),
        "budget_usd": Param(None, type=["null", "number"], minimum=0, title="Budget (USD)",
                            description="Stop new teacher/judge calls once the run has spent this much."),
        **extra,
    }
