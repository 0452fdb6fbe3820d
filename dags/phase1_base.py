"""Phase 1: the base model, specialised on the Phase 0 dataset.

base_model -> vocab_trim -> sft -> eval_sft -> failure_analysis -> distill -> eval_distilled -> before_after -> publish
base_model -> eval_untrained -> before_after (held-out accuracy per domain: untrained, after SFT, after distillation)
Scheduled on Phase 0's Asset (the dataset comes from its newest event) or run by hand with a dataset
URI. Publishes the ``cogumi_phase1`` Asset that Phase 2 is scheduled on.
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, phase_asset, placement, run_params

# Phase 1 evaluates to find failures and to compare before/after: the suite scores are what count,
# so the pairwise judge (a release-time check) is left out here.
EVAL_OVERRIDES = {"eval.judge_pairwise": False}

with cogumi_dag(
    "phase1_base",
    "Vocabulary trimming, LoRA SFT, failure analysis and targeted distillation of the base model",
    params=run_params(
        dataset=Param(None, type=["null", "string"], title="Dataset",
                      description="s3:// URI of a curated JSONL; empty: the newest cogumi_phase0 dataset."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["phase1"],
    schedule=[phase_asset("phase0")],
) as dag:
    dataset = "{{ params.dataset }}"
    from_phase0 = {"inlets": [phase_asset("phase0")], "asset_inputs": {"dataset": "cogumi_phase0:dataset"}}
    base = CogumiStepOperator(task_id="base_model", step="train.base_model", **placement("train.base_model"))
    eval_untrained = CogumiStepOperator(
        task_id="eval_untrained", step="eval.run", inputs={"model": base.output["model"]},
        overrides={**dag.default_args["overrides"], **EVAL_OVERRIDES}, **placement("eval.run"),
    )
    trim = CogumiStepOperator(
        task_id="vocab_trim", step="train.vocab_trim", inputs={"model": base.output["model"], "dataset": dataset},
        **from_phase0, **placement("train.vocab_trim"),
    )
    sft = CogumiStepOperator(
        task_id="sft", step="train.sft", inputs={"model": trim.output["model"], "dataset": dataset},
        **from_phase0, **placement("train.sft"),
    )
    eval_sft = CogumiStepOperator(
        task_id="eval_sft", step="eval.run", inputs={"model": sft.output["model"]},
        overrides={**dag.default_args["overrides"], **EVAL_OVERRIDES}, **placement("eval.run"),
    )
    failures = CogumiStepOperator(
        task_id="failure_analysis", step="train.failure_analysis", inputs={"items": eval_sft.output["items"]},
        **placement("train.failure_analysis"),
    )
    distill = CogumiStepOperator(
        task_id="distill", step="train.distill",
        inputs={"model": sft.output["model"], "clusters": failures.output["clusters"], "dataset": dataset},
        **from_phase0, **placement("train.distill"),
    )
    eval_distilled = CogumiStepOperator(
        task_id="eval_distilled", step="eval.run", inputs={"model": distill.output["model"]},
        overrides={**dag.default_args["overrides"], **EVAL_OVERRIDES}, **placement("eval.run"),
    )
    before_after = CogumiStepOperator(
        task_id="before_after", step="eval.before_after",
        inputs={"untrained": eval_untrained.output["items"], "sft": eval_sft.output["items"],
                "distilled": eval_distilled.output["items"]},
        **placement("eval.before_after"),
    )
    publish = CogumiStepOperator(
        task_id="publish", step="train.publish",
        inputs={"model": distill.output["model"], "before": eval_sft.output["items"],
                "after": eval_distilled.output["items"], "table": before_after.output["table"]},
        outlets=[phase_asset("phase1")], **placement("train.publish"),
    )
