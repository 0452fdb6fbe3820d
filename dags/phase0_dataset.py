"""Phase 0: teachers answer prompts, a judge keeps the good answers, near-duplicates go.

prompts -> generate (one mapped task per shard) -> score (mapped) -> dedup -> publish
Publishes the ``cogumi_phase0`` Asset that Phase 1 is scheduled on.
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, phase_asset, placement, run_params

OVERRIDES = {
    "dataset.prompts.limit": "{{ params.prompt_limit }}",
    "llm.budget_usd": "{{ params.budget_usd }}",
}

with cogumi_dag(
    "phase0_dataset",
    "Teacher answers, judged and deduplicated, into a curated JSONL dataset",
    params=run_params(
        prompt_limit=Param(None, type=["null", "integer"], minimum=1, title="Prompt limit",
                           description="Use only the first N valid prompts (empty: the config's limit)."),
    ),
    overrides=OVERRIDES,
    tags=["phase0"],
) as dag:
    prompts = CogumiStepOperator(
        task_id="prompts", step="data.prompts", return_output="shards", **placement("data.prompts")
    )
    generate = CogumiStepOperator.partial(
        task_id="generate", step="data.generate", input_name="shard", return_output="answers",
        **placement("data.generate"),
    ).expand(input_uri=prompts.output)
    score = CogumiStepOperator.partial(
        task_id="score", step="data.score", input_name="answers", return_output="kept",
        **placement("data.score"),
    ).expand(input_uri=generate.output)
    dedup = CogumiStepOperator(
        task_id="dedup", step="data.dedup", inputs={"scored": score.output}, **placement("data.dedup")
    )
    publish = CogumiStepOperator(
        task_id="publish", step="data.publish", inputs={"deduped": dedup.output["deduped"]},
        outlets=[phase_asset("phase0")], **placement("data.publish"),
    )
    dedup >> publish
