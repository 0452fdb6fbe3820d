"""Phase 3: one LoRA modifier per domain, trained on what a cascade of teachers solved of the base's failures.

Per modifier (a task group named after it, e.g. ``code``):
test -> tier_1 -> tier_2 -> tier_3 -> train -> compress
  test:     the compressed base (Phase 2's GGUF + recovery LoRA) on the domain's tasks; what it fails goes on
  tier_k:   tier k's teacher answers what is left, the verifier (or judge) keeps what passes, the rest goes on
  train:    a LoRA on every tier's solved rows plus Phase 0 replay, on Phase 2's pruned HF model
  compress: rank reductions at each sparsity level, each scored on the domain; the smallest passing the gate
all compress -> evaluate (base and base+each modifier on every domain, with the reference; answers compress already
made with the same model are reused) -> publish
Scheduled on Phase 2's Asset; publishes ``cogumi_phase3`` for Phase 4. A tier task that failed (a teacher
down, the budget hit) is backfilled by clearing it: ``cogumi backfill phase3 --modifier code --tier 2``
(docs/phase3.md); calls already answered come from the response cache.
"""

from __future__ import annotations

from airflow.sdk import Param, TaskGroup
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, deployment_modifiers, phase_asset, placement, run_params

with cogumi_dag(
    "phase3_modifiers",
    "Domain modifiers: a 3-tier teacher cascade per domain, a LoRA on its result, compressed and evaluated",
    params=run_params(
        gguf=Param(None, type=["null", "string"], title="Base GGUF",
                   description="s3:// URI of Phase 2's Q5_K_M GGUF; empty: the newest cogumi_phase2 one."),
        lora=Param(None, type=["null", "string"], title="Recovery LoRA",
                   description="s3:// URI of Phase 2's recovery GGUF LoRA; empty: the newest cogumi_phase2 one."),
        model=Param(None, type=["null", "string"], title="Pruned model",
                    description="s3:// URI of Phase 2's pruned HF directory (ending in /); empty: cogumi_phase2's."),
        dataset=Param(None, type=["null", "string"], title="Dataset",
                      description="Phase 0 rows for replay; empty: the newest cogumi_phase0 dataset."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["phase3"],
    schedule=[phase_asset("phase2")],
) as dag:
    gguf, lora, model, dataset = "{{ params.gguf }}", "{{ params.lora }}", "{{ params.model }}", "{{ params.dataset }}"
    phase2 = {"inlets": [phase_asset("phase2"), phase_asset("phase0")],
              "asset_inputs": {"gguf": "cogumi_phase2:gguf", "lora": "cogumi_phase2:lora_gguf?",
                               "model": "cogumi_phase2:pruned", "dataset": "cogumi_phase0:dataset"}}

    def from_phase2(*names: str) -> dict:
        return {"inlets": phase2["inlets"], "asset_inputs": {n: phase2["asset_inputs"][n] for n in names}}

    chosen = []
    for name, n_tiers in deployment_modifiers():
        params = {"modifier": name}
        with TaskGroup(group_id=name, tooltip=f"modifier {name}: cascade, LoRA, compression"):
            test = CogumiStepOperator(task_id="test", step="modifiers.test", inputs={"gguf": gguf, "lora": lora},
                                      step_params=params, **from_phase2("gguf", "lora"),
                                      **placement("modifiers.test"))
            remaining, solved, last = test.output["remaining"], [], test
            for k in range(1, n_tiers + 1):
                tier = CogumiStepOperator(task_id=f"tier_{k}", step="modifiers.tier", inputs={"remaining": remaining},
                                          step_params={**params, "tier": k}, **placement("modifiers.tier"))
                last >> tier
                remaining, last = tier.output["remaining"], tier
                solved.append(tier.output["solved"])
            train = CogumiStepOperator(task_id="train", step="modifiers.train",
                                       inputs={"model": model, "solved": solved, "dataset": dataset},
                                       step_params=params, **from_phase2("model", "dataset"),
                                       **placement("modifiers.train"))
            compress = CogumiStepOperator(task_id="compress", step="modifiers.compress",
                                          inputs={"adapter": train.output["adapter"],
                                                  "adapter_gguf": train.output["lora_gguf"], "gguf": gguf,
                                                  "lora": lora},
                                          step_params=params, **from_phase2("gguf", "lora"),
                                          **placement("modifiers.compress"))
            last >> train
            chosen.append(compress)
    evaluate = CogumiStepOperator(task_id="evaluate", step="modifiers.evaluate",
                                  inputs={"gguf": gguf, "lora": lora,
                                          "modifiers": [c.output["lora_gguf"] for c in chosen],
                                          "known": [c.output["items"] for c in chosen]},
                                  **from_phase2("gguf", "lora"), **placement("modifiers.evaluate"))
    publish = CogumiStepOperator(
        task_id="publish", step="modifiers.publish",
        inputs={"variants": [c.output["variants"] for c in chosen], "summary": evaluate.output["summary"],
                "items": evaluate.output["items"],
                "modifiers": [c.output["lora_gguf"] for c in chosen], "gguf": gguf, "lora": lora},
        outlets=[phase_asset("phase3")], **from_phase2("gguf", "lora"), **placement("modifiers.publish"),
    )
    evaluate >> publish
