"""Phase 2 steps: prune, AWQ, GGUF export, zstd packing, confidence calibration, and the size/quality table.

Every size is bytes on disk of a file the step wrote, every perplexity is computed here (per byte, on held-out
Phase 0 rows, comparable across tokenizers and formats), every agreement is counted token by token.
"""

from __future__ import annotations

import json
import logging
import random

from cogumi_tasks.core.config import CompressConfig
from cogumi_tasks.core.records import iter_jsonl_dicts
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.core.verdict import MET, judge
from cogumi_tasks.models.step_io import dataset_rows, model_stats, pass_on

log = logging.getLogger("cogumi")


def compress_config(ctx: StepContext) -> CompressConfig:
    if ctx.config.compress is None:
        raise StepFailed(f"config {ctx.config.name} has no compress section")
    return ctx.config.compress


def shuffled(rows: list[dict]) -> list[dict]:
    """The dataset rows in the one fixed order every compression step samples from."""
    rows = list(rows)
    random.Random(0).shuffle(rows)
    return rows


def split_texts(rows: list[dict], tokenizer, n_calib: int, n_ppl: int) -> tuple[list[str], list[str]]:
    """Chat-formatted dataset rows: calibration texts and (disjoint) held-out perplexity texts."""
    from cogumi_tasks.models.nll import chat_texts

    rows = shuffled(rows)
    texts = chat_texts(tokenizer, [(r["prompt"], r["response"]) for r in rows])
    held = texts[:n_ppl]
    calib = texts[n_ppl:][:n_calib] or held
    return calib, held


def _ppl(stats) -> dict:
    return {"byte_ppl": round(stats.byte_ppl, 5), "token_ppl": round(stats.token_ppl, 4),
            "bits_per_byte": round(stats.bits_per_byte, 5)}


@step("compress.prune", version=1, reads=("compress.prune",), inputs=("model", "dataset", "recipe"),
      outputs=("model",),
      code=("cogumi_tasks.compress.oneshot", "cogumi_tasks.models.nll", "cogumi_tasks.models.step_io"),
      config_inputs={"recipe": "compress.prune.recipe"})
def prune(ctx: StepContext) -> StepOutput:
    """Gradual one-shot pruning (llm-compressor recipe, e.g. SparseGPT) up to the last stage's sparsity.

    Inputs: ``model`` (HF directory), ``dataset`` (calibration and held-out text), ``recipe`` (from config).
    Outputs: ``model`` (dense fp32 checkpoint with zeros). Metrics: sparsity reached overall and per layer and
    per-byte perplexity after each stage.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi_tasks.compress.oneshot import gradual_prune, load_recipe, sparsity
    from cogumi_tasks.models.nll import nll_stats

    cfg = compress_config(ctx).prune
    src_uri = ctx.input("model")
    if not cfg.enabled:  # before any download
        return StepOutput(files={"model": pass_on(ctx, src_uri)}, metrics={"enabled": False})
    src = ctx.fetch_dir(src_uri)
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    calib, held = split_texts(dataset_rows(ctx), tok, cfg.calibration_samples, cfg.ppl_rows)
    before = nll_stats(model, held, tokenizer=tok)
    stages = gradual_prune(model, tok, load_recipe(ctx.fetch(ctx.input("recipe"))), cfg.schedule, calib,
                           cfg.max_seq_len, lambda m: _ppl(nll_stats(m, held, tokenizer=tok)))
    dest = ctx.out_dir / "model"
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    reached = sparsity(model)
    metrics = {"enabled": True, "calibration_samples": len(calib), "ppl_texts": len(held), "before": _ppl(before),
               "stages": stages, "sparsity": reached["overall"], "target": cfg.schedule[-1],
               "byte_ppl_increase_pct": round((stages[-1]["byte_ppl"] / before.byte_ppl - 1) * 100, 3),
               "model": model_stats(dest)}
    return StepOutput(files={"model": "model/"}, metrics=metrics)


@step("compress.quantize_awq", version=1, reads=("compress.awq", "compress.prune.ppl_rows"),
      inputs=("model", "dataset", "recipe"), outputs=("model?",),
      code=("cogumi_tasks.compress.oneshot", "cogumi_tasks.models.nll", "cogumi_tasks.models.step_io"),
      config_inputs={"recipe": "compress.awq.recipe"})
def quantize_awq(ctx: StepContext) -> StepOutput:
    """AWQ W4A16 with llm-compressor, saved in compressed-tensors format (vLLM and transformers load it).

    Inputs: ``model`` (the pruned HF directory), ``dataset``, ``recipe``. Outputs: ``model`` (compressed
    checkpoint). Metrics: bytes on disk, bits per weight, per-byte perplexity before and after (the saved checkpoint
    reloaded with transformers).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi_tasks.compress.oneshot import load_recipe, run_oneshot, with_value
    from cogumi_tasks.models.nll import nll_stats

    cfg = compress_config(ctx).awq
    if not cfg.enabled:  # before any download
        return StepOutput(files={}, metrics={"enabled": False})
    src = ctx.fetch_dir(ctx.input("model"))
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    calib, held = split_texts(dataset_rows(ctx), tok, cfg.calibration_samples, compress_config(ctx).prune.ppl_rows)
    before = nll_stats(model, held, tokenizer=tok)
    recipe = with_value(load_recipe(ctx.fetch(ctx.input("recipe"))), "group_size", cfg.group_size)
    recipe = with_value(recipe, "n_grid", cfg.n_grid)
    try:
        run_oneshot(model, tok, recipe, calib, cfg.max_seq_len)
    except ValueError as exc:
        raise StepFailed(f"compress.quantize_awq: {exc} (group_size {cfg.group_size} must divide every "
                         f"quantized layer's input size, e.g. 64 for SmolLM2's 576)") from exc
    dest = ctx.out_dir / "model"
    model.save_pretrained(str(dest), save_compressed=True)
    tok.save_pretrained(str(dest))
    del model
    # perplexity of the saved checkpoint as transformers loads it (compressed-tensors), not of the in-memory model
    after = nll_stats(AutoModelForCausalLM.from_pretrained(str(dest)), held, tokenizer=tok)
    weights = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    params = model_stats(src)["parameters"]
    return StepOutput(files={"model": "model/"}, metrics={
        "enabled": True, "group_size": cfg.group_size, "calibration_samples": len(calib),
        "weight_bytes": weights, "bits_per_weight": round(weights * 8 / params, 3), "parameters": params,
        "before": _ppl(before), "after": _ppl(after),
        "byte_ppl_increase_pct": round((after.byte_ppl / before.byte_ppl - 1) * 100, 3)})


@step("compress.export_gguf", version=1, reads=("compress.gguf", "compress.prune.ppl_rows"),
      inputs=("model", "dataset"), outputs=("gguf",),
      code=("cogumi_tasks.compress.gguf", "cogumi_tasks.models.convert", "cogumi_tasks.models.nll",
            "cogumi_tasks.models.step_io", "cogumi_tasks.core.verdict"))
def export_gguf(ctx: StepContext) -> StepOutput:
    """llama.cpp's converter to f16 GGUF, then quantization to ``compress.gguf.quant_type`` (Q5_K_M), with the
    plan's validation: greedy token agreement with the unquantized HF model and per-byte perplexity.

    Inputs: ``model`` (the pruned fp32 HF directory: never the AWQ int4 checkpoint, so nothing is quantized
    twice), ``dataset`` (prompts and held-out text). Outputs: ``gguf`` (the quantized file, the serving artifact).
    """
    from transformers import AutoTokenizer

    from cogumi_tasks.compress.gguf import chat_answer, gguf_nll_stats, hf_greedy, quantize_gguf, token_agreement
    from cogumi_tasks.models.convert import convert_hf_to_gguf
    from cogumi_tasks.models.nll import nll_stats

    cfg = compress_config(ctx).gguf
    src = ctx.fetch_dir(ctx.input("model"))
    f16 = convert_hf_to_gguf(src, ctx.tmp_dir / "model-f16.gguf", "f16", cfg.pre_tokenizer)
    quant = quantize_gguf(f16, ctx.out("model.gguf"), cfg.quant_type)
    rows = dataset_rows(ctx)
    prompts = [r["prompt"] for r in shuffled(rows)][: cfg.agreement_prompts]
    _, held = split_texts(rows, AutoTokenizer.from_pretrained(str(src)), 0, compress_config(ctx).prune.ppl_rows)
    log.info("export_gguf: f16 %.1f MB, %s %.1f MB; greedy reference of %d prompts x %d tokens", f16.stat().st_size
             / 1e6, cfg.quant_type, quant.stat().st_size / 1e6, len(prompts), cfg.agreement_tokens)
    reference = hf_greedy(src, prompts, cfg.agreement_tokens)
    agree_f16, agree_q = token_agreement(f16, reference), token_agreement(quant, reference)
    log.info("export_gguf: token agreement f16 %.2f%%, %s %.2f%%; perplexity of %d held-out texts", agree_f16.rate
             * 100, cfg.quant_type, agree_q.rate * 100, len(held))
    params = model_stats(src)["parameters"]
    ppl = {"hf": _ppl(nll_stats(src, held)), "f16": _ppl(gguf_nll_stats(f16, src, held)),
           cfg.quant_type: _ppl(gguf_nll_stats(quant, src, held))}
    agreement = judge(agree_q.rate, ">=", cfg.min_agreement)  # one figure over all positions, compared directly
    metrics = {
        "quant_type": cfg.quant_type, "parameters": params,
        "f16_bytes": f16.stat().st_size, "gguf_bytes": quant.stat().st_size,
        "bits_per_weight": round(quant.stat().st_size * 8 / params, 3),
        "agreement_prompts": len(prompts), "agreement_positions": agree_q.positions,
        "token_agreement": round(agree_q.rate, 5), "token_agreement_f16": round(agree_f16.rate, 5),
        "exact_sequences": agree_q.exact_sequences, "min_agreement": cfg.min_agreement,
        "agreement_gate_passed": agreement.met, "agreement_gate": agreement.as_dict(), "perplexity": ppl,
        "byte_ppl_increase_pct": round((ppl[cfg.quant_type]["byte_ppl"] / ppl["hf"]["byte_ppl"] - 1) * 100, 3),
        "sample_answer": chat_answer(quant, prompts[0] if prompts else "Hello!")[:300],
    }
    if not metrics["agreement_gate_passed"]:
        log.warning("export_gguf: token agreement %.2f%% is under the plan's %.0f%%", agree_q.rate * 100,
                    cfg.min_agreement * 100)
    return StepOutput(files={"gguf": "model.gguf"}, metrics=metrics)


@step("compress.pack_zstd", version=1, reads=("compress.pack",), inputs=("gguf",), outputs=("packed", "dictionary"),
      code=("cogumi_tasks.compress.pack",))
def pack_zstd(ctx: StepContext) -> StepOutput:
    """zstd with a dictionary trained on samples of the file, verified by a full decompress and sha256.

    Inputs: ``gguf``. Outputs: ``packed`` (``.zst``), ``dictionary``. The uncompressed GGUF stays the serving
    artifact: llama.cpp cannot map a compressed file.
    """
    from cogumi_tasks.compress.pack import pack

    cfg = compress_config(ctx).pack
    src = ctx.fetch(ctx.input("gguf"))
    result = pack(src, ctx.out("model.gguf.zst"), ctx.out("model.gguf.zdict"), cfg.level, cfg.dict_kb * 1024)
    if not result.round_trip_ok:
        raise StepFailed(f"pack_zstd: the decompressed file's sha256 differs from {src.name}'s")
    return StepOutput(files={"packed": "model.gguf.zst", "dictionary": "model.gguf.zdict"},
                      metrics={**result.as_dict(), "serving_artifact": ctx.input("gguf")})


@step("compress.calibrate", version=2, reads=("compress.calibrate",), inputs=("gguf", "items", "tokenizer"),
      outputs=("calibrator", "features"), code=("cogumi_tasks.compress.calibration", "cogumi_tasks.core.verdict"))
def calibrate_step(ctx: StepContext) -> StepOutput:
    """Confidence features of the GGUF model's own answers on the evaluation items (mean log-prob, max token
    probability, entropy), correctness from the evaluation harness, temperature and Platt scaling fitted on half
    and scored on the other half: ECE before/after and reliability diagrams.

    Inputs: ``gguf``, ``items`` (``eval.run`` of that GGUF), ``tokenizer`` (the HF directory it came from).
    Outputs: ``calibrator`` (JSON the router applies), ``features`` (per item).
    """
    from cogumi_tasks.compress.calibration import answer_features, calibrate, ece_gate
    from cogumi_tasks.core.records import write_jsonl

    cfg = compress_config(ctx).calibrate
    items = [r for r in iter_jsonl_dicts(ctx.fetch(ctx.input("items"))) if r.get("answer") and r.get("messages")]
    if len(items) < 4:
        raise StepFailed(f"calibrate: {len(items)} answered items in {ctx.input('items')}; need at least 4")
    features = answer_features(ctx.fetch(ctx.input("gguf")), items, ctx.fetch_dir(ctx.input("tokenizer")))
    correct = [bool(r.get("correct")) for r in items]
    report = calibrate(features, correct, cfg.bins, cfg.seed, target=cfg.max_ece)
    report["ece_gate"] = ece_gate(report, cfg.max_ece)
    report["ece_gate_passed"] = report["ece_gate"]["verdict"] == MET
    report["max_ece"] = cfg.max_ece
    write_jsonl(ctx.out("features.jsonl"), [{**f, "correct": c} for f, c in zip(features, correct, strict=True)])
    ctx.out("calibrator.json").write_text(json.dumps({"method": report["method"], **report["calibrator"],
                                                      "feature": "exp(mean answer token log-prob)"}, indent=1))
    return StepOutput(files={"calibrator": "calibrator.json", "features": "features.jsonl"}, metrics=report)


def _manifest_of(ctx: StepContext, name: str) -> dict:
    uri = ctx.input(name)
    manifest = ctx.store.producer_manifest(uri if not uri.endswith("/") else uri + "x")
    if manifest is None:
        raise StepFailed(f"publish: no manifest for input {name} ({uri})")
    return manifest


@step("compress.publish", version=1, inputs=("base", "pruned", "awq", "gguf", "packed", "calibrator", "lora"),
      outputs=("table", "gguf", "calibrator", "pruned", "lora_gguf?"),
      code=("cogumi_tasks.compress.sizes", "cogumi_tasks.compress.gguf", "cogumi_tasks.models.step_io",
            "cogumi_tasks.core.verdict"))
def publish(ctx: StepContext) -> StepOutput:
    """One size/quality table of every stage beside the plan's promised sizes, and the arithmetic of what a
    model of this size can reach.

    Inputs: ``base`` (the Phase 1 model directory), ``pruned``, ``awq``, ``gguf``, ``packed``, ``calibrator``,
    ``lora`` (the recovery GGUF LoRA; their producers' manifests are read). Outputs: ``table`` (JSON); ``gguf``,
    ``calibrator``, ``pruned`` (the HF weights the GGUF was made from: Phase 3 trains its modifiers on them) and
    ``lora_gguf`` passed on.
    """
    from cogumi_tasks.compress.sizes import size_table

    base_dir = ctx.fetch_dir(ctx.input("base"))
    manifests = {k: _manifest_of(ctx, k) for k in ("pruned", "gguf", "packed", "calibrator")}
    for optional in ("awq", "lora"):
        if optional in ctx.inputs:
            manifests[optional] = _manifest_of(ctx, optional)
    table = size_table(model_stats(base_dir), {k: m["metrics"] for k, m in manifests.items()})
    ctx.out("table.json").write_text(json.dumps(table, indent=1))
    files = {"table": "table.json", "gguf": ctx.input("gguf"), "calibrator": ctx.input("calibrator"),
             "pruned": ctx.input("pruned")}
    if "lora" in ctx.inputs:  # the serving pair: prove llama.cpp applies the adapter to this GGUF and answers
        from cogumi_tasks.compress.gguf import chat_answer

        files["lora_gguf"] = ctx.input("lora")
        table["answer_with_lora"] = chat_answer(ctx.fetch(ctx.input("gguf")), "What is 2 + 2?",
                                                lora=ctx.fetch(ctx.input("lora")))[:200]
        ctx.out("table.json").write_text(json.dumps(table, indent=1))
    return StepOutput(files=files, metrics=table)


__all__ = ["calibrate_step", "export_gguf", "pack_zstd", "prune", "publish", "quantize_awq"]
