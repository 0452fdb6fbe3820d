"""The size/quality table of Phase 2: every stage's bytes on disk, bits per weight and quality, beside the plan's
promised sizes, and the arithmetic of what a model with this many parameters can and cannot reach."""

from __future__ import annotations

# The plan's size chain (GB): start -> pruned -> AWQ -> GGUF -> zstd
PLAN_GB = {"start": 10.0, "stage1": 3.5, "stage2": 0.9, "stage3": 0.6, "stage4": 0.5}
SHIPPED_MB_PROMISED = 668
PLAN_MODEL_PARAMETERS = 8_030_261_248  # Llama-3.1-8B-Instruct, the plan's model
BITMASK_BITS = 1.0  # a sparse format needs at least ~1 bit per weight to say which weights are kept


def _row(stage: str, nbytes: int | None, params: int, **extra) -> dict:
    bpw = round(nbytes * 8 / params, 3) if nbytes and params else None
    return {"stage": stage, "bytes": nbytes, "gb": round(nbytes / 1e9, 4) if nbytes else None,
            "bits_per_weight": bpw, **extra}


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
        "arithmetic": arithmetic,
        "token_agreement": gguf.get("token_agreement"),
        "ece_before": metrics.get("calibrator", {}).get("ece_before"),
        "ece_after": metrics.get("calibrator", {}).get("ece_after"),
        "recovery": {k: lora.get(k) for k in ("hardest", "improved", "improved_byte_ppl_before",
                                              "improved_byte_ppl_after", "other_byte_ppl_before",
                                              "other_byte_ppl_after")} if lora.get("enabled") else None,
    }
