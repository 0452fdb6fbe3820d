"""Scheduled re-calibration on served traffic: per data interval, label a budgeted sample of the serving API's
query logs, refit the confidence calibration and the routing threshold, publish only when no worse.

label -> refit
  label: the interval's query-log lines, a sample of the auto requests, every model's answer to each judged
         (verifier where the query is a task, else the LLM judge)
  refit: temperature/Platt calibration and the threshold refitted, compared with the live release on the fixed
         holdout plus the sample; a calibration release published and made current only when no worse
The schedule (and an optional start date with catch-up) comes from the deployment config's ``recalibrate``
section; missed intervals are filled with ``airflow backfill create`` (docs/operations.md). A manual run takes
its interval from the ``start``/``end`` params.
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, deployment_recalibration, placement, run_params

INTERVAL = {"start": "{{ params.start or data_interval_start.isoformat() }}",
            "end": "{{ params.end or data_interval_end.isoformat() }}"}

with cogumi_dag(
    "recalibrate",
    "Refit calibration and routing threshold on served traffic; publish a calibration release only if no worse",
    params=run_params(
        start=Param(None, type=["null", "string"], title="Interval start",
                    description="ISO 8601; empty: the run's data interval (scheduled and backfill runs)."),
        end=Param(None, type=["null", "string"], title="Interval end", description="ISO 8601, exclusive."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["operations"],
    **deployment_recalibration(),
) as dag:
    label = CogumiStepOperator(task_id="label", step="recalibrate.label", step_params=INTERVAL,
                               **placement("recalibrate.label"))
    refit = CogumiStepOperator(task_id="refit", step="recalibrate.refit", inputs={"labels": label.output["labels"]},
                               step_params=INTERVAL, **placement("recalibrate.refit"))
