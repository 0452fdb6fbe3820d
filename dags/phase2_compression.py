"""Phase 2: compression of the Phase 1 model, every size and loss measured.

prune -> quantize_awq                      (compressed-tensors for vLLM/transformers)
prune -> export_gguf -> pack_zstd          (the GGUF is the serving artifact; .zst is for transfer)
         export_gguf -> eval_gguf -> calibrate
prune -> recover                           (a conservative LoRA as a GGUF adapter applied at load time)
all -> publish (the size/quality table; the cogumi_phase2 Asset)
Scheduled on Phase 1's Asset, or run alone on any HF model directory (param ``model``).
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, phase_asset, placement, run_params

EVAL_OVERRIDES = {"eval.judge_pairwise": False}

with cogumi_dag(
    "phase2_compression",
    "Pruning, AWQ, GGUF export, zstd packing and confidence calibration, with every size measured",
    params=run_params(
        model=Param(None, type=["null", "string"], title="Model",
                    description="s3:// URI of an HF model directory (ending in /); empty: the newest "
                                "cogumi_phase1 model."),
        dataset=Param(None, type=["null", "string"], title="Dataset",
                      description="calibration and held-out text (curated JSONL); empty: the newest "
                                  "cogumi_phase0 dataset."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["phase2"],
    schedule=[phase_asset("phase1")],
) as dag:
    upstream = {"inlets": [phase_asset("phase1"), phase_asset("phase0")],
                "asset_inputs": {"model": "cogumi_phase1:model", "dataset": "cogumi_phase0:dataset"}}
    model, dataset = "{{ params.model }}", "{{ params.dataset }}"
    prune = CogumiStepOperator(task_id="prune", step="compress.prune", inputs={"model": model, "dataset": dataset},
                               **upstream, **placement("compress.prune"))
    awq = CogumiStepOperator(task_id="quantize_awq", step="compress.quantize_awq",
                             inputs={"model": prune.output["model"], "dataset": dataset},
                             **upstream, **placement("compress.quantize_awq"))
    gguf = CogumiStepOperator(task_id="export_gguf", step="compress.export_gguf",
                              inputs={"model": prune.output["model"], "dataset": dataset},
                              **upstream, **placement("compress.export_gguf"))
    pack = CogumiStepOperator(task_id="pack_zstd", step="compress.pack_zstd", inputs={"gguf": gguf.output["gguf"]},
                              **placement("compress.pack_zstd"))
    eval_gguf = CogumiStepOperator(task_id="eval_gguf", step="eval.run", inputs={"model": gguf.output["gguf"]},
                                   overrides={**dag.default_args["overrides"], **EVAL_OVERRIDES},
                                   **placement("eval.run"))
    recover = CogumiStepOperator(task_id="recover", step="compress.recover",
                                 inputs={"model": prune.output["model"], "dataset": dataset},
                                 **upstream, **placement("compress.recover"))
    calibrate = CogumiStepOperator(task_id="calibrate", step="compress.calibrate",
                                   inputs={"gguf": gguf.output["gguf"], "items": eval_gguf.output["items"],
                                           "tokenizer": prune.output["model"]},
                                   **placement("compress.calibrate"))
    publish = CogumiStepOperator(
        task_id="publish", step="compress.publish",
        inputs={"base": model, "pruned": prune.output["model"], "awq": awq.output["model"],
                "gguf": gguf.output["gguf"], "packed": pack.output["packed"],
                "calibrator": calibrate.output["calibrator"], "lora": recover.output["lora_gguf"]},
        inlets=[phase_asset("phase1")], asset_inputs={"base": "cogumi_phase1:model"},
        outlets=[phase_asset("phase2")], **placement("compress.publish"),
    )
