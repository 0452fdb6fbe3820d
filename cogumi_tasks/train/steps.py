"""Phase 1 steps: the base model as an HF directory, vocabulary trimming, LoRA/QLoRA SFT.

A model is a directory output (``model/``): its URI ends in ``/`` and ``ctx.fetch_dir`` downloads it,
sha256-checked. A step that leaves a model unchanged (trimming disabled or failing its gate) passes the
input's URI on instead of copying it. SFT checkpoints go to the step's ``_work/`` as they are written,
so a killed or cleared task resumes from the last one.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

from cogumi_tasks.core.config import TrainConfig
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.models.step_io import dataset_rows, model_stats, pass_on
from cogumi_tasks.train.lora import train_lora

log = logging.getLogger("cogumi")


def train_config(ctx: StepContext) -> TrainConfig:
    if ctx.config.train is None:
        raise StepFailed(f"config {ctx.config.name} has no train section")
    return ctx.config.train


@step("train.base_model", version=2, reads=("train.base_model",), outputs=("model",),
      code=("cogumi_tasks.models.convert", "cogumi_tasks.models.packaged", "cogumi_tasks.models.step_io"))
def base_model(ctx: StepContext) -> StepOutput:
    """The base model as an HF directory.

    Config ``train.base_model``: a GGUF (``builtin:smollm2-135m`` or a file), dequantized to fp32; an HF
    directory in S3 (passed on as is) or on disk; or a hub name (production only: nothing is downloaded
    in the tiny config). Outputs: ``model`` (directory). Metrics: parameters, bytes, vocabulary.
    """
    ref = train_config(ctx).base_model
    dest = ctx.out_dir / "model"
    if ref.kind == "gguf" and ref.path:
        from cogumi_tasks.models.convert import hf_dir_from_gguf
        from cogumi_tasks.models.packaged import builtin_gguf

        gguf = builtin_gguf(ref.path) if ref.path.startswith("builtin:") else ctx.fetch(ref.path)
        hf_dir_from_gguf(gguf, dest)
    elif ref.kind == "hf" and ref.path and ref.path.startswith("s3://"):
        return StepOutput(files={"model": ref.path.rstrip("/") + "/"}, metrics={"source": ref.path})
    elif ref.kind == "hf" and ref.path and Path(ref.path).is_dir():
        shutil.copytree(ref.path, dest)
    elif ref.kind == "hf" and ref.path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("base_model: loading %s from the hub", ref.path)
        AutoModelForCausalLM.from_pretrained(ref.path, dtype="auto").save_pretrained(str(dest))
        AutoTokenizer.from_pretrained(ref.path).save_pretrained(str(dest))
    else:
        raise StepFailed(f"train.base_model: cannot load kind={ref.kind} path={ref.path!r} (a GGUF or an HF model)")
    return StepOutput(files={"model": "model/"}, metrics={"source": ref.path, **model_stats(dest)})


@step("train.vocab_trim", version=1, reads=("train.vocab_trim",), inputs=("model", "dataset", "heldout"),
      outputs=("model",), code=("cogumi_tasks.train.vocab", "cogumi_tasks.models.nll", "cogumi_tasks.models.step_io",
                                "cogumi_tasks.models.convert", "cogumi_tasks.core.verdict"),
      config_inputs={"heldout": "train.vocab_trim.heldout"})
def vocab_trim(ctx: StepContext) -> StepOutput:
    """Keep the tokens covering ``coverage`` of the dataset's chat text (plus the held-out English prompts),
    rebuild the tokenizer, slice embeddings and lm_head; gate on per-byte perplexity of held-out dataset rows.

    Inputs: ``model`` (HF directory), ``dataset`` (Phase 0 JSONL), ``heldout`` (prompts; from config).
    Outputs: ``model`` (the trimmed directory, or the input model when the gate fails and the config says
    ``continue_untrimmed``), metrics with vocabulary, coverage, bytes saved and perplexity before/after.
    """
    from transformers import AutoTokenizer

    from cogumi_tasks.core.verdict import judge
    from cogumi_tasks.models.nll import chat_texts, nll_stats
    from cogumi_tasks.train.vocab import (
        TokenizerBroken,
        check_round_trip,
        load_prompt_texts,
        ppl_increase_pct,
        trim_gate,
        trim_model,
    )

    cfg = train_config(ctx).vocab_trim
    src_uri = ctx.input("model")
    if not cfg.enabled:  # before any download
        return StepOutput(files={"model": pass_on(ctx, src_uri)}, metrics={"enabled": False, "used": "untrimmed"})
    src = ctx.fetch_dir(src_uri)
    tok = AutoTokenizer.from_pretrained(str(src))
    rows = dataset_rows(ctx)
    random.Random(0).shuffle(rows)
    n_held = max(1, round(len(rows) * cfg.ppl_fraction))
    held, counted = rows[:n_held], rows[n_held:]
    extra = load_prompt_texts(ctx.fetch(ctx.input("heldout")), tok)[: cfg.heldout_limit]
    texts = chat_texts(tok, [(r["prompt"], r["response"]) for r in counted]) + extra
    ppl_texts = chat_texts(tok, [(r["prompt"], r["response"]) for r in held])
    metrics: dict = {"enabled": True, "counted_texts": len(texts), "ppl_texts": len(ppl_texts),
                     "coverage_target": cfg.coverage, "max_ppl_increase_pct": cfg.max_ppl_increase_pct}
    trimmed = ctx.out_dir / "model"
    try:
        result = trim_model(src, trimmed, texts, cfg.coverage)
        check_round_trip(trimmed, ppl_texts)
    except TokenizerBroken as exc:
        metrics.update(gate_passed=False, refused=str(exc),
                       gate=judge(None, "<=", cfg.max_ppl_increase_pct, undefined_reason=str(exc)).as_dict())
    else:
        before, after = nll_stats(src, ppl_texts), nll_stats(trimmed, ppl_texts)
        new_tok = AutoTokenizer.from_pretrained(str(trimmed))
        metrics.update(
            vocab_before=result.vocab_before, vocab_after=result.vocab_after, coverage=round(result.coverage, 6),
            texts_longer=result.texts_longer, texts_total=result.texts_total,
            heldout_texts_longer=sum(len(new_tok.encode(t, add_special_tokens=False))
                                     > len(tok.encode(t, add_special_tokens=False)) for t in ppl_texts),
            param_bytes_saved=result.param_bytes_saved, llama_cpp_pre_tokenizer=result.pre_tokenizer,
            token_ppl_before=before.token_ppl, token_ppl_after=after.token_ppl,
            byte_ppl_before=before.byte_ppl, byte_ppl_after=after.byte_ppl,
            bits_per_byte_before=before.bits_per_byte, bits_per_byte_after=after.bits_per_byte,
            ppl_increase_pct=round(ppl_increase_pct(before, after), 4),
        )
        gate = trim_gate(before, after, cfg.max_ppl_increase_pct)
        metrics.update(gate_passed=gate.met, gate=gate.as_dict())
    if metrics["gate_passed"]:
        metrics["used"] = "trimmed"
        log.info("vocab_trim: %d -> %d tokens, per-byte perplexity %+.2f%%: using the trimmed model",
                 metrics["vocab_before"], metrics["vocab_after"], metrics["ppl_increase_pct"])
        return StepOutput(files={"model": "model/"}, metrics=metrics)
    why = metrics.get("refused") or (f"per-byte perplexity rose {metrics['ppl_increase_pct']:.2f}% "
                                     f"(gate <= {cfg.max_ppl_increase_pct}%)")
    if cfg.on_gate_fail == "fail":
        raise StepFailed(f"vocab_trim: {why}")
    log.warning("vocab_trim: gate FAILED: %s; continuing with the untrimmed model as configured", why)
    shutil.rmtree(trimmed, ignore_errors=True)
    metrics.update(used="untrimmed", gate_message=why)
    return StepOutput(files={"model": pass_on(ctx, src_uri, src)}, metrics=metrics)


@step("train.sft", version=1, reads=("train.sft",), inputs=("model", "dataset"),
      outputs=("adapter", "model", "metrics"), code=("cogumi_tasks.train.lora", "cogumi_tasks.train.sft",
                                                 "cogumi_tasks.models.step_io"))
def sft(ctx: StepContext) -> StepOutput:
    """LoRA SFT on the chat-formatted dataset (QLoRA on CUDA), loss on assistant tokens only.

    Inputs: ``model`` (HF directory), ``dataset`` (Phase 0 JSONL). Outputs: ``adapter`` (peft directory),
    ``model`` (merged onto the unquantized weights), ``metrics`` (loss curves, eval loss, steps).
    """
    cfg = train_config(ctx).sft
    metrics = train_lora(ctx, ctx.fetch_dir(ctx.input("model")), dataset_rows(ctx), cfg)
    return StepOutput(files={"adapter": "adapter/", "model": "merged/", "metrics": "metrics.json"}, metrics=metrics)
