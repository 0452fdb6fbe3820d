"""Phase 4: which model answers each query, when a user is dissatisfied, and the confidence threshold.

labels -> train_router --+
escalation --------------+-> publish (the routing table and bundle; the cogumi_phase4 Asset)
  labels:       every model (the base and each modifier) on Phase 3's held-out items and on general prompts, each
                answer judged; the base's calibrated confidence per query
  train_router: the router MLP on that verdict table, every policy and the threshold sweep on its holdout
  escalation:   a BERT-class teacher fine-tuned on dissatisfaction examples, distilled into an LSTM
Scheduled on Phase 3's Asset; reads Phase 2's calibrator and tokenizer from cogumi_phase2.
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, phase_asset, placement, run_params

with cogumi_dag(
    "phase4_routing",
    "Routing: verdict labels, the router MLP with its threshold sweep, the escalation detector",
    params=run_params(
        phase3_items=Param(None, type=["null", "string"], title="Phase 3 answers",
                           description="s3:// URI of modifiers.evaluate's items.jsonl; empty: the newest cogumi_phase3 "
                                       "one."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["phase4"],
    schedule=[phase_asset("phase3")],
) as dag:
    upstream = {"inlets": [phase_asset("phase3"), phase_asset("phase2")],
                "asset_inputs": {"items": "cogumi_phase3:items", "modifiers": "cogumi_phase3:modifiers",
                                 "gguf": "cogumi_phase3:gguf", "lora": "cogumi_phase3:lora_gguf?",
                                 "calibrator": "cogumi_phase2:calibrator", "tokenizer": "cogumi_phase2:pruned"}}
    labels = CogumiStepOperator(task_id="labels", step="routing.labels",
                                inputs={"items": "{{ params.phase3_items }}"}, **upstream,
                                **placement("routing.labels"))
    router = CogumiStepOperator(task_id="train_router", step="routing.train_router",
                                inputs={"verdicts": labels.output["verdicts"]}, **placement("routing.train_router"))
    escalation = CogumiStepOperator(task_id="escalation", step="routing.escalation",
                                    **placement("routing.escalation"))
    publish = CogumiStepOperator(
        task_id="publish", step="routing.publish",
        inputs={"router": router.output["router"], "evaluation": router.output["evaluation"],
                "verdicts": labels.output["verdicts"], "stats": labels.output["stats"],
                "escalation": escalation.output["student"], "escalation_metrics": escalation.output["metrics"]},
        inlets=[phase_asset("phase2")], asset_inputs={"calibrator": "cogumi_phase2:calibrator"},
        outlets=[phase_asset("phase4")], **placement("routing.publish"),
    )
