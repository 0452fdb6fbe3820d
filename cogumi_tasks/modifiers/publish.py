"""Phase 3's result: per modifier the cascade's tier table, the sizes at each sparsity level and the domain scores,
beside the plan's figures, and the bundle Phase 4 routes between.

The tier table is read from the manifests along each modifier's lineage (compress <- train <- tier k <- test), so
every figure is the one its step measured. The cascade's saving is against sending every task that entered
tier 1 to the top tier at the top tier's measured cost per item, every call at list price (answers from the
response cache included). The plan's sizes were written for an 8B base at ranks 128 / 112 / 96, so beside each
measured size stands the arithmetic of a LoRA of that rank on Llama-3.1-8B.
"""

from __future__ import annotations

import json
from typing import Any

from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.core.verdict import judge, num

# The plan's Phase 3 figures per domain: LoRA rank, sparsity, stored MB, domain score in % of the reference.
PLAN = {"code": {"rank": 128, "sparsity": 0.78, "mb": 47, "pct": 115},
        "reasoning": {"rank": 112, "sparsity": 0.82, "mb": 48, "pct": 100},
        "automation": {"rank": 96, "sparsity": 0.85, "mb": 40, "pct": 105}}
PLAN_SAVING = 0.61  # "61% saving" of the cascade against sending everything to the top tier
# Llama-3.1-8B: hidden 4096, MLP 14336, 8 KV heads of 128, 32 layers: (in, out) of each linear layer.
LLAMA_8B_LAYERS = 32
LLAMA_8B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
DEFAULT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def plan_lora_mb(rank: int, sparsity: float, modules: list[str], bytes_per_param: float = 2.0) -> dict:
    """A LoRA of ``rank`` on Llama-3.1-8B over ``modules`` keeping ``1 - sparsity`` of its parameters, in f16:
    parameters = rank x sum(in + out) x 32 layers."""
    per_rank = sum(sum(LLAMA_8B_SHAPES[m]) for m in modules if m in LLAMA_8B_SHAPES) * LLAMA_8B_LAYERS
    params = rank * per_rank
    kept = params * (1 - sparsity)
    return {"modules": modules, "params_per_rank": per_rank, "params": params, "kept_params": round(kept),
            "mb_f16_dense": round(params * bytes_per_param / 1e6, 1),
            "mb_f16_kept": round(kept * bytes_per_param / 1e6, 1),
            "arithmetic": f"{rank} x {per_rank:,} parameters x {1 - sparsity:.2f} kept x {bytes_per_param:g} bytes "
                          f"= {kept * bytes_per_param / 1e6:.1f} MB"}


def _manifest(ctx: StepContext, uri: str) -> dict:
    m = ctx.store.producer_manifest(uri if not uri.endswith("/") else uri + "x")
    if m is None:
        raise StepFailed(f"modifiers.publish: no manifest for {uri}")
    return m


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def lineage(ctx: StepContext, variants_uri: str) -> dict[str, Any]:
    """The manifests of one modifier's chain: compress, train, its tiers (in order) and test."""
    compress = _manifest(ctx, variants_uri)
    train = _manifest(ctx, compress["inputs"]["adapter"])
    tiers = [_manifest(ctx, u) for u in _as_list(train["inputs"]["solved"])]
    tiers.sort(key=lambda m: m["params"].get("tier", 0))
    test = _manifest(ctx, tiers[0]["inputs"]["remaining"]) if tiers else None
    return {"compress": compress, "train": train, "tiers": tiers, "test": test}


def tier_table(chain: dict[str, Any]) -> dict:
    """Share solved and cost per tier, and the cost had every task that entered tier 1 gone to the top tier.
    Costs are list prices of every call (``list_cost_usd``: answers from the response cache count at the price
    they would have cost), so a re-run that paid nothing new still measures the cascade; ``paid_usd`` is what the
    tiers' runs paid."""
    rows = []
    for m in chain["tiers"]:
        x = m["metrics"]
        paid = x.get("cost_usd", 0.0)
        rows.append({"tier": m["params"].get("tier"), "teacher": x.get("teacher"), "items_in": x.get("items_in"),
                     "attempted": x.get("attempted"), "solved": x.get("solved"), "remaining": x.get("remaining"),
                     "calls": x.get("calls"), "cost_usd": x.get("list_cost_usd", paid), "paid_usd": paid})
    entered = rows[0]["items_in"] if rows else 0
    for r in rows:
        r["share_of_entered"] = round(r["solved"] / entered, 4) if entered else None
    cost = sum(r["cost_usd"] or 0.0 for r in rows)
    top = rows[-1] if rows else None
    per_item = top["cost_usd"] / top["attempted"] if top and top["attempted"] else None
    all_top = per_item * entered if per_item is not None else None
    saving = 1 - cost / all_top if all_top else None
    why = None if saving is not None else "the top tier attempted no item, so its cost per item is unknown"
    test = chain["test"]["metrics"] if chain["test"] else {}
    return {"tested": test.get("tested"), "base_passed": test.get("passed"), "entered_cascade": entered,
            "tiers": rows, "solved": sum(r["solved"] or 0 for r in rows),
            "unsolved": rows[-1]["remaining"] if rows else None, "cost_usd": round(cost, 6),
            "paid_usd": round(sum(r["paid_usd"] or 0.0 for r in rows), 6),
            "top_tier_cost_per_item_usd": per_item, "cost_all_top_tier_usd": all_top,
            "saving": round(saving, 4) if saving is not None else None,
            "saving_vs_plan": {"plan": PLAN_SAVING, **judge(saving, ">=", PLAN_SAVING, undefined_reason=why).as_dict()}}


def size_rows(compress: dict, domain: str, modules: list[str]) -> dict:
    """Measured bytes per variant (full rank and each sparsity level) and the plan's size with its arithmetic."""
    x = compress["metrics"]
    plan = PLAN.get(domain)
    out: dict[str, Any] = {"variants": [{k: v.get(k) for k in ("sparsity", "rank", "gguf_bytes", "safetensors_bytes",
                                                                  "accuracy", "pct_of_reference", "vs_base",
                                                                  "passed_gate")}
                                        for v in x.get("variants", [])],
                           "chosen": x.get("chosen"), "passed_gate": x.get("passed_gate")}
    if plan:
        arith = plan_lora_mb(plan["rank"], plan["sparsity"], modules)
        out["plan"] = {**plan, "llama_8b": arith,
                       "note": f"the plan's {plan['mb']} MB at rank {plan['rank']} and sparsity {plan['sparsity']}: "
                               f"{arith['arithmetic']} on Llama-3.1-8B, dense f16 {num(arith['mb_f16_dense'])} MB"}
    return out


@step("modifiers.publish", version=2, reads=("modifiers", "train.sft.target_modules"),
      inputs=("variants", "summary", "items", "modifiers", "gguf", "lora"),
      outputs=("table", "bundle", "items", "modifiers", "gguf", "lora_gguf?"),
      code=("cogumi_tasks.core.verdict",))
def publish(ctx: StepContext) -> StepOutput:
    """The Phase 3 table and the modifier bundle.

    Inputs: ``variants`` (each modifier's compress output, in the config's modifier order), ``summary``
    and ``items`` (modifiers.evaluate's), ``modifiers`` (each modifier's chosen GGUF LoRA, same order), ``gguf`` and
    ``lora`` (Phase 2's base GGUF and recovery LoRA). Outputs: ``table`` (JSON: per modifier the tier table, sizes
    per sparsity level beside the plan's with the 8B arithmetic, scores by domain from the evaluation, and the
    cascade's total saving), ``bundle`` (JSON: base, recovery LoRA, and per modifier its domain, GGUF LoRA and
    scale: what Phase 4 and serving load); ``items``, ``modifiers``, ``gguf``, ``lora_gguf`` passed on for Phase 4.
    """
    mods = ctx.config.modifiers
    variants, chosen = _as_list(ctx.inputs["variants"]), _as_list(ctx.inputs["modifiers"])
    if len(variants) != len(mods) or len(chosen) != len(mods):
        raise StepFailed(f"modifiers.publish: {len(variants)} variants and {len(chosen)} adapters for "
                         f"{len(mods)} configured modifiers ({[m.name for m in mods]})")
    summary = json.loads(ctx.fetch(ctx.input("summary")).read_text())
    sft_modules = ctx.config.train.sft.target_modules if ctx.config.train else None
    table: dict[str, Any] = {"modifiers": {}}
    totals = {"entered": 0, "cost": 0.0, "all_top": 0.0, "complete": True}
    for m, v_uri in zip(mods, variants, strict=True):
        chain = lineage(ctx, v_uri)
        tiers = tier_table(chain)
        modules = m.target_modules or sft_modules or DEFAULT_MODULES
        entry = {"domain": m.domain, "rank": m.rank, "cascade": tiers,
                 "sizes": size_rows(chain["compress"], m.domain, modules),
                 "training": chain["train"]["metrics"].get("training")}
        table["modifiers"][m.name] = entry
        totals["entered"] += tiers["entered_cascade"] or 0
        totals["cost"] += tiers["cost_usd"]
        if tiers["cost_all_top_tier_usd"] is None:
            totals["complete"] = False
        else:
            totals["all_top"] += tiers["cost_all_top_tier_usd"]
    saving = 1 - totals["cost"] / totals["all_top"] if totals["complete"] and totals["all_top"] else None
    table["cascade"] = {"entered": totals["entered"], "cost_usd": round(totals["cost"], 6),
                        "cost_all_top_tier_usd": round(totals["all_top"], 6) if totals["complete"] else None,
                        "saving": round(saving, 4) if saving is not None else None,
                        "vs_plan": {"plan": PLAN_SAVING, **judge(
                            saving, ">=", PLAN_SAVING,
                            undefined_reason="a modifier's top tier attempted no item").as_dict()}}
    table["scores"] = summary
    table["plan"] = {"sizes_mb": {d: p["mb"] for d, p in PLAN.items()}, "pct_of_reference": {
        d: p["pct"] for d, p in PLAN.items()}, "saving": PLAN_SAVING}
    bundle = {"base_gguf": ctx.input("gguf"), "recovery_lora": ctx.inputs.get("lora"),
              "modifiers": [{"name": m.name, "domain": m.domain, "lora_gguf": uri, "scale": m.adapter_scale}
                            for m, uri in zip(mods, chosen, strict=True)]}
    ctx.out("table.json").write_text(json.dumps(table, indent=1))
    ctx.out("bundle.json").write_text(json.dumps(bundle, indent=1))
    files: dict[str, str | list[str]] = {"table": "table.json", "bundle": "bundle.json", "items": ctx.input("items"),
                                         "modifiers": chosen, "gguf": ctx.input("gguf")}
    if ctx.inputs.get("lora"):
        files["lora_gguf"] = ctx.input("lora")
    return StepOutput(files=files, metrics=table)
