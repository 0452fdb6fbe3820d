"""Recovery after pruning: a conservative LoRA on the examples the pruned model finds hardest, shipped as a GGUF
LoRA that llama.cpp applies at load time on top of the quantized GGUF (the base weights are not touched)."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import shutil
from pathlib import Path

from cogumi_tasks.core.config import SFTConfig
from cogumi_tasks.core.records import write_jsonl
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.models.step_io import dataset_rows
from cogumi_tasks.train.lora import train_lora

log = logging.getLogger("cogumi")

IMPROVE_SYSTEM = (
    "You improve answers written by a small assistant model. Given a request and its answer, write a better "
    "answer: correct, complete, clear and concise. Reply with the improved answer only."
)


def row_byte_ppl(model_dir: Path, rows: list[dict]) -> list[float]:
    """Per-byte perplexity of each chat-formatted (prompt, response) row under the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi_tasks.models.nll import chat_texts, nll_stats

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = chat_texts(tok, [(r["prompt"], r["response"]) for r in rows])
    return [nll_stats(model, [t], tokenizer=tok).byte_ppl for t in texts]


def split_verified(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows whose answer a task checker verified (they carry ``task``) keep that answer: a correct answer needs no
    rewriting, and a cheaper teacher's rewrite could only break it. The others go to the teacher to improve."""
    verified = [{"prompt": r["prompt"], "response": r["response"], "original": r["response"],
                 "teacher": r.get("teacher"), "verified": True} for r in rows if r.get("task") is not None]
    return verified, [r for r in rows if r.get("task") is None]


def improved_answers(ctx: StepContext, rows: list[dict]) -> list[dict]:
    """The recovery teacher rewrites each row's answer; rows whose call failed are dropped (and counted)."""
    from cogumi_tasks.llm.client import ChatRequest, ChatResult
    from cogumi_tasks.llm.step_calls import ask, finish_calls, make_client, make_ledger

    cfg = ctx.config.compress.recover
    teacher = ctx.config.teacher(cfg.teacher) if cfg.teacher else ctx.config.teachers[-1]
    ledger = make_ledger(ctx)
    reqs = [ChatRequest(messages=[{"role": "system", "content": IMPROVE_SYSTEM},
                                  {"role": "user", "content": f"Request:\n{r['prompt']}\n\nAnswer:\n{r['response']}"}],
                        max_tokens=cfg.max_tokens, temperature=0.0, seed=0) for r in rows]

    async def run() -> list:
        client = make_client(ctx, teacher, ledger)
        try:
            return await ask(ctx, client, reqs, tag="recover")
        finally:
            await client.aclose()

    results = asyncio.run(run())
    finish_calls(ctx, ledger, results)
    return [{"prompt": r["prompt"], "response": res.text.strip(), "original": r["response"], "teacher": teacher.name}
            for r, res in zip(rows, results, strict=True) if isinstance(res, ChatResult) and res.text.strip()]


@step("compress.recover", version=2, reads=("compress.recover", "train.sft", "teachers", "llm"),
      inputs=("model", "dataset"), outputs=("adapter?", "lora_gguf?", "examples?", "metrics?"),
      code=("cogumi_tasks.llm.step_calls", "cogumi_tasks.train.lora", "cogumi_tasks.train.sft",
            "cogumi_tasks.models.convert", "cogumi_tasks.models.nll", "cogumi_tasks.models.step_io",
            "cogumi_tasks.compress.steps", "cogumi_tasks.llm.client"))
def recover(ctx: StepContext) -> StepOutput:
    """Pick the hardest Phase 0 rows by per-byte perplexity under the pruned model (``hardest_fraction``, at least
    ``min_examples``), keep the answers a task checker verified and have the teacher improve the others, train a
    conservative LoRA (rank 64, lr 8e-7, 2 epochs in the plan) and export it as a GGUF LoRA.

    Inputs: ``model`` (the pruned HF directory), ``dataset``. Outputs: ``adapter`` (peft), ``lora_gguf`` (for
    ``Llama(lora_path=...)``), ``examples``. Metrics: per-byte perplexity of the hard rows as trained on and of
    other rows, before and after (the merged model). ``compress.publish`` checks that llama.cpp applies the
    adapter to the GGUF.
    """
    from transformers import AutoTokenizer

    from cogumi_tasks.compress.steps import compress_config
    from cogumi_tasks.models.convert import convert_lora_to_gguf
    from cogumi_tasks.models.nll import chat_texts, nll_stats

    cfg = compress_config(ctx).recover
    if not cfg.enabled:  # before any download
        return StepOutput(files={}, metrics={"enabled": False})
    model_dir = ctx.fetch_dir(ctx.input("model"))
    rows = dataset_rows(ctx)
    ppl = row_byte_ppl(model_dir, rows)
    n_hard = min(len(rows), max(cfg.min_examples, math.ceil(cfg.hardest_fraction * len(rows))))
    order = sorted(range(len(rows)), key=lambda i: -ppl[i])
    hard = [rows[i] for i in order[:n_hard]]
    others = [rows[i] for i in order[n_hard:]]
    random.Random(0).shuffle(others)
    others = others[:16]
    verified, to_improve = split_verified(hard)
    improved = improved_answers(ctx, to_improve) if to_improve else []
    examples = verified + improved
    if not examples:
        raise StepFailed("recover: the teacher improved none of the hardest examples")
    write_jsonl(ctx.out("examples.jsonl"), examples)
    base_sft = ctx.config.train.sft if ctx.config.train else SFTConfig()
    sft_cfg = base_sft.model_copy(update={"rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr, "epochs": cfg.epochs,
                                          "max_steps": None})
    training = train_lora(ctx, model_dir, [{"prompt": r["prompt"], "response": r["response"]} for r in examples],
                          sft_cfg)
    convert_lora_to_gguf(ctx.out_dir / "adapter", model_dir, ctx.out("adapter.gguf"))

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hard_texts = chat_texts(tok, [(r["prompt"], r["response"]) for r in examples])
    other_texts = chat_texts(tok, [(r["prompt"], r["response"]) for r in others])
    merged = ctx.out_dir / "merged"
    metrics = {
        "enabled": True, "rows": len(rows), "hardest": n_hard, "improved": len(improved),
        "kept_verified": len(verified),
        "hardest_byte_ppl_threshold": round(ppl[order[n_hard - 1]], 4),
        "hard_byte_ppl_before": round(nll_stats(model_dir, hard_texts).byte_ppl, 5),
        "hard_byte_ppl_after": round(nll_stats(merged, hard_texts).byte_ppl, 5),
        "other_byte_ppl_before": round(nll_stats(model_dir, other_texts).byte_ppl, 5) if other_texts else None,
        "other_byte_ppl_after": round(nll_stats(merged, other_texts).byte_ppl, 5) if other_texts else None,
        "lora_gguf_bytes": ctx.out("adapter.gguf").stat().st_size, "training": training, "cost": ctx.cost,
    }
    shutil.rmtree(merged)  # the served form is the GGUF base + this adapter; the merged copy was for measuring
    return StepOutput(files={"adapter": "adapter/", "lora_gguf": "adapter.gguf", "examples": "examples.jsonl",
                             "metrics": "metrics.json"}, metrics=metrics)
