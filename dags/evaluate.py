"""Evaluation: the student and the reference on the configured suites, then the quality gates.

eval_run -> eval_gate. Runnable on any model (param ``model``: a GGUF file or an HF directory in
S3; empty: the config's ``eval.student``). Later phases reuse the same steps inside their DAGs.
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, phase_asset, placement, run_params

with cogumi_dag(
    "evaluate",
    "Score a model against the reference model; gate the release on it",
    params=run_params(
        model=Param(None, type=["null", "string"], title="Model",
                    description="s3:// URI of a GGUF file or an HF model directory (ending in /); "
                                "empty: the config's eval.student."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["eval"],
    retries=1,
) as dag:
    run = CogumiStepOperator(
        task_id="eval_run", step="eval.run", inputs={"model": "{{ params.model }}"}, **placement("eval.run")
    )
    gate = CogumiStepOperator(
        task_id="eval_gate", step="eval.gate", inputs={"summary": run.output["summary"]},
        outlets=[phase_asset("eval")], retries=0, **placement("eval.gate"),
    )
