"""Where a task is queued, decided when the DAG is parsed.

A ``gpu_queue`` step must be routed to its queue before it runs, so the deployment's config
(``COGUMI_CONFIG``, default ``tiny``) decides placement at parse time; the other targets are
decided at run time from the run's own config.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import lru_cache

import pendulum
from airflow.sdk import DAG, Asset, Param


@lru_cache(maxsize=1)
def _deployment():
    from cogumi_tasks.core.config import load_config

    return load_config(os.environ.get("COGUMI_CONFIG", "tiny"))


def _deployment_compute():
    return _deployment().compute


def deployment_modifiers() -> list[tuple[str, int]]:
    """The deployment config's Phase 3 modifiers as (name, number of cascade tiers): one task group each."""
    return [(m.name, len(m.tiers)) for m in _deployment().modifiers]


def deployment_recalibration() -> dict:
    """``cogumi_dag`` kwargs of DAG ``recalibrate`` from the deployment config: its cron ``schedule`` as data
    intervals (Airflow 3 makes a plain cron string a trigger timetable, whose runs have an empty interval; each run
    here reads the logs between one tick and the next), and when ``recalibrate.start_date`` is set, that start with
    catch-up (every interval since runs)."""
    from airflow.sdk import CronDataIntervalTimetable

    cfg = _deployment().recalibrate
    if cfg is None:
        return {"schedule": None}
    timetable = CronDataIntervalTimetable(cfg.schedule, timezone="UTC")
    if cfg.start_date is None:
        return {"schedule": timetable}
    return {"schedule": timetable, "start_date": pendulum.parse(cfg.start_date), "catchup": True}


def deployment_config() -> str:
    return os.environ.get("COGUMI_CONFIG", "tiny")


EDGE_EXECUTOR = "EdgeExecutor"


def placement(step: str) -> dict[str, str]:
    """Operator kwargs placing ``step``: queue ``gpu`` on the Edge executor when the deployment's
    config says ``gpu_queue`` (Airflow routes a task to a non-default executor only when the task
    names it), else the default queue and executor; plus the step's pool, if the config gives one
    (``cogumi stack up`` creates the tiny config's pools)."""
    compute = _deployment_compute()
    where = ({"queue": compute.gpu_queue, "executor": EDGE_EXECUTOR} if compute.target(step) == "gpu_queue"
             else {"queue": "default"})
    pool = compute.pool(step)
    return {**where, "pool": pool} if pool else where


def retry_delay_s() -> float:
    """Seconds between a failed task's tries: ``COGUMI_RETRY_DELAY_S`` (a deployment setting), default 30."""
    return float(os.environ.get("COGUMI_RETRY_DELAY_S", "30"))


def phase_asset(phase: str) -> Asset:
    """The Asset a phase publishes and the next phase is scheduled on."""
    return Asset(name=f"cogumi_{phase}", uri=f"cogumi://pipeline/{phase}")


def run_params(**extra: Param) -> dict[str, Param]:
    """The form every manual run shows: which config, plus phase-specific overrides. A name that is also a dict
    attribute (``items``, ``keys``, ...) is refused: in a template ``{{ params.items }}`` is the dict's method,
    not the param (a run of phase4_routing failed on it)."""
    shadowing = sorted(name for name in extra if hasattr(dict, name))
    if shadowing:
        raise ValueError(f"run param name(s) {shadowing} shadow dict attributes: {{{{ params.NAME }}}} would render "
                         "the dict's attribute, not the param; choose another name")
    return {
        "config": Param(deployment_config(), type="string", title="Config",
                        description="A config name in configs/ (tiny, production) or a YAML path."),
        "budget_usd": Param(None, type=["null", "number"], minimum=0, title="Budget (USD)",
                            description="Stop new teacher/judge calls once the run has spent this much."),
        **extra,
    }


@contextmanager
def cogumi_dag(dag_id: str, description: str, *, params: dict[str, Param], overrides: dict[str, str],
               tags: list[str], retries: int = 2, schedule=None, start_date=None,
               catchup: bool = False) -> Iterator[DAG]:
    """``with cogumi_dag(...) as dag:`` a pipeline DAG with the project's defaults: manual or Asset-scheduled,
    one active run, native templates (so params keep their types), retries, and the run params as config
    overrides. When the block ends its wiring is checked against the steps' declared inputs and outputs
    (:mod:`cogumi_provider.wiring`), so a misspelt name fails the DAG's import."""
    from cogumi_provider.wiring import check_wiring

    with DAG(
        dag_id=dag_id,
        description=description,
        schedule=schedule,
        start_date=start_date or pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=catchup,
        max_active_runs=1,
        render_template_as_native_obj=True,
        tags=["cogumi", *tags],
        params=params,
        default_args={"retries": retries, "retry_delay": timedelta(seconds=retry_delay_s()), "overrides": overrides},
    ) as dag:
        yield dag
    check_wiring(dag)
