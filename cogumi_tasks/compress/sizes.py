"""The size/quality table of Phase 2: every stage's bytes on disk, bits per weight and quality, beside the plan's
promised sizes, and the arithmetic of what a model with this many parameters can and cannot reach.

The plan's sizes were written for its 8B base, so each stage is judged (``core.verdict.judge_plan_ratio``) as the
plan's ratio of that stage to its start (3.5 GB of 10 GB: 0.35 x start), with the absolute size that ratio gives
for the configured base, and what the plan's 8B model would weigh at the bits per weight measured here."""

from __future__ import annotations

from cogumi_tasks.core.verdict import Verdict, judge_plan_ratio, num

# The plan's size chain (GB): start -> pruned -> AWQ -> GGUF -> zstd
PLAN_GB = {"start": 10.0, "stage1": 3.5, "stage2": 0.9, "stage3": 0.6, "stage4": 0.5}
SHIPPED_MB_PROMISED = 668
PLAN_PROMISED = {"stage1": "10 GB -> 3.5 GB", "stage2": "3.5 GB -> 0.9 GB", "stage3": "0.9 GB -> 0.6 GB",
                 "stage4": "0.6 GB -> 0.5 GB", "shipped": f"{SHIPPED_MB_PROMISED} MB shipped"}
PLAN_MODEL_PARAMETERS = 8_030_261_248  # Llama-3.1-8B-Instruct, the plan's model
BITMASK_BITS = 1.0  # a sparse format needs at least ~1 bit per weight to say which weights are kept


def _row(stage: str, nbytes: int | None, params: int, **extra) -> dict:
    bpw = round(nbytes * 8 / params, 3) if nbytes and params else None
    return {"stage": stage, "bytes": nbytes, "gb": round(nbytes / 1e9, 4) if nbytes else None,
            "bits_per_weight": bpw, **extra}


def plan_size_verdicts(measured: dict[str, int | None], params: int) -> dict[str, dict]:
    """Per measured stage (and ``shipped``, the serving GGUF) the plan's figure judged as its ratio to the start.

    ``measured``: bytes on disk of ``start``, ``stage1``..``stage4`` and ``shipped`` (None: stage not run, left
    out). Each entry: the plan's figure and ratio, the measured size and ratio, the plan's ratio applied to this
    base, the plan model's size at this stage's measured bits per weight, ``check``, ``verdict`` and ``reason``.
    """
    start = measured.get("start")
    plan = {**{k: (v, PLAN_GB["start"], "GB") for k, v in PLAN_GB.items() if k != "start"},
            "shipped": (float(SHIPPED_MB_PROMISED), PLAN_GB["start"] * 1000, "MB")}
    out: dict[str, dict] = {}
    for stage, (plan_value, plan_start, unit) in plan.items():
        nbytes = measured.get(stage)
        if not nbytes:
            continue
        scale = 1e9 if unit == "GB" else 1e6
        v = judge_plan_ratio(nbytes / scale, start / scale if start else None, plan_value, plan_start, "<=", unit)
        bpw = nbytes * 8 / params
        plan_gb = plan_value * scale / 1e9
        model_gb = PLAN_MODEL_PARAMETERS * bpw / 8e9
        needed = plan_gb * 8e9 / PLAN_MODEL_PARAMETERS
        arithmetic = (f"the plan's 8B base ({PLAN_MODEL_PARAMETERS / 1e9:.2f}B parameters) at this stage's measured "
                      f"{bpw:.3g} bits/weight ~ {num(model_gb)} GB, "
                      + (f"not {num(plan_value)} {unit} (that needs {needed:.3g} bits/weight)" if model_gb > plan_gb
                         else f"within {num(plan_value)} {unit}"))
        v = Verdict(v.verdict, f"{v.reason}; {arithmetic}")
        out[stage] = {"promised": PLAN_PROMISED[stage], "plan": plan_value, "unit": unit,
                      "plan_ratio": round(plan_value / plan_start, 5),
                      "measured": round(nbytes / scale, 4), "ratio": round(nbytes / start, 5) if start else None,
                      "for_this_base": round(plan_value / plan_start * start / scale, 4) if start else None,
                      "plan_model_gb_at_measured_bits_per_weight": round(model_gb, 3),
                      "check": {"op": "<=", "value": round(plan_value / plan_start, 5), "of": "start"},
                      **v.as_dict()}
    return out


def size_table(base: dict, metrics: dict[str, dict]) -> dict:
    """``base``: model_stats of the input model; ``metrics``: producer metrics of pruned, awq (optional), gguf,
    packed, calibrator."""
    params = base["parameters"]
    pruned, gguf, packed = metrics["pruned"], metrics["gguf"], metrics["packed"]
    awq = metrics.get("awq") or {}
    q = gguf["quant_type"]
    ppl = gguf.get("perplexity", {})
    rows = [
        _row("base (safetensors)", base["weight_bytes"], params, byte_ppl=pruned.get("before", {}).get("byte_ppl")),
        _row("pruned (dense, zeros stored)", pruned.get("model", {}).get("weight_bytes"), params,
             sparsity=pruned.get("sparsity"), byte_ppl=(pruned.get("stages") or [{}])[-1].get("byte_ppl")),
    ]
    if awq.get("enabled"):
        rows.append(_row("AWQ W4A16 (compressed-tensors)", awq["weight_bytes"], params,
                         byte_ppl=awq["after"]["byte_ppl"]))
    rows += [
        _row("GGUF f16", gguf["f16_bytes"], params, byte_ppl=ppl.get("f16", {}).get("byte_ppl"),
             token_agreement=gguf.get("token_agreement_f16")),
        _row(f"GGUF {q} (serving artifact)", gguf["gguf_bytes"], params, byte_ppl=ppl.get(q, {}).get("byte_ppl"),
             token_agreement=gguf.get("token_agreement")),
        _row("GGUF + zstd (transfer only)", packed["packed_bytes"] + packed["dict_bytes"], params,
             ratio=round(packed["ratio"], 4)),
    ]
    lora = metrics.get("lora") or {}
    calibrator = metrics.get("calibrator", {})
    if lora.get("enabled"):
        rows.append(_row("recovery LoRA (GGUF, applied at load time)", lora["lora_gguf_bytes"], params,
                         byte_ppl=lora.get("other_byte_ppl_after")))
    measured = {"start": base["weight_bytes"], "stage1": pruned.get("model", {}).get("weight_bytes"),
                "stage2": awq.get("weight_bytes"), "stage3": gguf["gguf_bytes"],
                "stage4": packed["packed_bytes"] + packed["dict_bytes"]}
    sparsity = pruned.get("sparsity") or 0.0
    density = 1.0 - sparsity
    arithmetic = {
        "parameters": params,
        "bits_per_weight_needed": {k: round(gb * 1e9 * 8 / params, 3) for k, gb in PLAN_GB.items()},
        "gb_at": {"fp16": round(params * 2 / 1e9, 3), "4 bit + group scales (~4.25 bpw)": round(params * 4.25 / 8e9, 3),
                  f"{q} as measured": round(gguf["gguf_bytes"] / 1e9, 4),
                  f"sparse 4 bit at the reached density {density:.2f} (+{BITMASK_BITS:.0f} bit mask)":
                      round(params * (density * 4.25 + BITMASK_BITS) / 8e9, 3)},
        "plan_model": {
            "parameters": PLAN_MODEL_PARAMETERS,
            "bits_per_weight_needed": {k: round(gb * 1e9 * 8 / PLAN_MODEL_PARAMETERS, 3) for k, gb in PLAN_GB.items()},
            f"gb_at_measured_{q}_bits_per_weight": round(PLAN_MODEL_PARAMETERS * gguf["gguf_bytes"] / params / 1e9, 3),
            "gb_at_fp16": round(PLAN_MODEL_PARAMETERS * 2 / 1e9, 3),
        },
        "note": ("Pruned weights are stored dense (zeros take space) in safetensors and GGUF, so sparsity saves "
                 "bytes only in a sparse format; a size below ~(density x 4 + 1) bits per weight is out of reach "
                 "of these methods."),
    }
    return {
        "rows": rows,
        "size_gb": {k: round(v / 1e9, 4) if v else None for k, v in measured.items()},
        "plan_gb": PLAN_GB,
        "shipped_mb": round(gguf["gguf_bytes"] / 1e6, 2),
        "shipped_mb_promised": SHIPPED_MB_PROMISED,
        "plan_sizes": plan_size_verdicts({**measured, "shipped": gguf["gguf_bytes"]}, params),
        "arithmetic": arithmetic,
        "token_agreement": gguf.get("token_agreement"),
        **{k: calibrator.get(k) for k in ("ece_before", "ece_before_ci", "ece_after", "ece_after_ci", "ece_floor")},
        "recovery": {k: lora.get(k) for k in ("hardest", "improved", "kept_verified",
                                              "hard_byte_ppl_before", "hard_byte_ppl_after", "other_byte_ppl_before",
                                              "other_byte_ppl_after")} if lora.get("enabled") else None,
    }
