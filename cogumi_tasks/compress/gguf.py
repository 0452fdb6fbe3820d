"""GGUF export checks: quantization, token agreement, perplexity and a chat answer, through llama-cpp-python in
process (the HF -> GGUF conversion itself is :mod:`cogumi_tasks.models.convert`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cogumi_tasks.models.nll import NLLStats

log = logging.getLogger("cogumi")

# llama.cpp file types by name (llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


def quantize_gguf(src: Path, dst: Path, qtype: str, threads: int | None = None) -> Path:
    """Quantize a GGUF file to ``qtype`` (e.g. Q5_K_M) with llama.cpp."""
    import llama_cpp

    name = qtype.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown GGUF quant type {qtype!r}; known: {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise RuntimeError(f"llama_model_quantize {src.name} -> {qtype} failed (code {rc})")
    return dst


def load_gguf(path: Path, n_ctx: int = 1024, lora: Path | None = None):
    """A llama.cpp model with every position's logits kept (for teacher-forced scoring)."""
    from llama_cpp import Llama

    from cogumi_tasks.models.packaged import gguf_threads

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=gguf_threads(), lora_path=str(lora) if lora else None)


def gguf_nll_stats(path: Path, hf_tokenizer_dir: Path, texts: list[str], max_len: int = 256) -> NLLStats:
    """Per-token and per-byte NLL of ``texts`` under a GGUF model, tokenized by the HF tokenizer exactly as
    :func:`cogumi_tasks.models.nll.nll_stats` does, so the figures compare with the HF model's."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    llm = load_gguf(path, n_ctx=max_len + 8)
    bos = llm.token_bos()
    nll, n_tokens, n_bytes = 0.0, 0, 0
    try:
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)[:max_len]
            if not ids:
                continue
            llm.reset()
            llm.eval([bos, *ids])
            logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
            logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
            nll += float((logz - logits[np.arange(len(ids)), ids]).sum())
            n_tokens += len(ids)
            n_bytes += len(tok.decode(ids, skip_special_tokens=False).encode("utf-8"))
    finally:
        llm.close()
    return NLLStats(token_ppl=math.exp(nll / max(n_tokens, 1)), bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
                    tokens=n_tokens, bytes=n_bytes)


@dataclass
class Agreement:
    """Greedy token agreement of a GGUF model with the HF reference, teacher-forced on the reference's output."""

    prompts: int
    positions: int
    agreeing: int
    exact_sequences: int  # prompts whose every position agreed

    @property
    def rate(self) -> float:
        return self.agreeing / self.positions if self.positions else math.nan


def hf_greedy(model_dir: Path, prompts: list[str], new_tokens: int, batch_size: int = 8) -> list[tuple[list, list]]:
    """(prompt ids, greedy continuation ids) per chat-formatted prompt, from the HF model in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    stop = {tok.pad_token_id, tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            seqs = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for row, mask in zip(seqs.tolist(), enc["attention_mask"].tolist(), strict=True):
            cont = row[width:]
            end = next((k + 1 for k, t in enumerate(cont) if t in stop), len(cont))  # through the first stop token
            out.append((row[mask.index(1):width], cont[:end]))
        log.info("hf_greedy: %d/%d prompts", len(out), len(texts))
    return out


def token_agreement(gguf_path: Path, reference: list[tuple[list, list]]) -> Agreement:
    """At each position of the reference continuation, does the GGUF model's argmax (given the same prefix)
    equal the reference's greedy token? Teacher-forced, so one early difference does not cascade."""
    import numpy as np

    n_ctx = max(len(p) + len(c) for p, c in reference) + 8
    llm = load_gguf(gguf_path, n_ctx=n_ctx)
    positions = agreeing = exact = 0
    try:
        for prompt_ids, cont in reference:
            llm.reset()
            llm.eval(prompt_ids + cont[:-1])
            scores = np.asarray(llm.scores[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(cont)])
            same = (scores.argmax(axis=1) == np.asarray(cont)).tolist()
            positions += len(same)
            agreeing += sum(same)
            exact += all(same)
    finally:
        llm.close()
    return Agreement(prompts=len(reference), positions=positions, agreeing=agreeing, exact_sequences=exact)


def chat_answer(gguf_path: Path, prompt: str, max_tokens: int = 48, lora: Path | None = None) -> str:
    """One greedy chat answer from a GGUF file: proof that llama.cpp loads it and answers."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=512, verbose=False, seed=0, lora_path=str(lora) if lora else None)
    try:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
        return out["choices"][0]["message"]["content"] or ""
    finally:
        llm.close()
