"""Greedy decoding of many conversations together in one llama.cpp context.

Each conversation is one sequence of a unified KV cache; every ``llama_decode`` call carries the next token of each
running sequence and the whole prompt of each one that joins, so the weights are read once for up to ``parallel``
tokens. The attention mask keeps sequences apart, so each answer is a greedy answer to its own conversation; the
same conversations in the same order give the same answers. Which others share a step changes the shapes of the
matrix products, so float rounding can differ from decoding alone and now and then flip a near-tie: measured on
2 CPU cores (bench/eval_decode.py), the untrained 135M model as f16 gave 84 of 90 answers equal to one-at-a-time
decoding at 1.9x the speed; as Q4_1, 20 of 90 at 1.1x (so quantized models are not batched,
:class:`cogumi_tasks.eval.backends.GGUFBackend`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Running:
    item: int
    pos: int
    cells: int
    started: float
    last: int = -1
    tokens: list[int] = field(default_factory=list)


class BatchDecoder:
    """A llama.cpp context for ``parallel`` sequences of at most ``n_ctx`` tokens each, sharing ``cells`` KV cells
    (default ``2 * n_ctx``). ``llm`` is a loaded ``llama_cpp.Llama``: its model, tokenizer and chat template are used;
    decoding runs on this object's own context (:attr:`ctx`, where LoRA adapters are set)."""

    def __init__(self, llm: Any, *, parallel: int = 8, n_ctx: int = 4096, cells: int | None = None,
                 n_threads: int = 2):
        import llama_cpp
        from llama_cpp import llama_chat_format

        self.llm, self.parallel, self.n_ctx = llm, max(1, parallel), n_ctx
        self.cells = max(cells or 2 * n_ctx, n_ctx)
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the GGUF has no chat template (tokenizer.chat_template): cannot format conversations")
        eos, bos = llm.token_eos(), llm.token_bos()
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = self.cells, self.parallel, True
        params.n_batch, params.n_ubatch = self.cells + self.parallel, 512
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {self.cells} cells for {self.parallel} "
                               "sequences")
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(self.cells + self.parallel, 0, self.parallel)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The conversation as the model's chat template formats it, tokenized, ready for the answer."""
        r = self.formatter(messages=messages)
        return self.llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)

    def text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="ignore")

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b, i = self.batch, self.batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq
        b.n_tokens = i + 1
        return i

    def decode(self, prompts: list[list[int]], max_tokens: int,
               done: Callable[[int, list[int], float], None]) -> None:
        """Greedy answers to ``prompts`` (each shorter than ``n_ctx``), in any order: ``done(index, tokens,
        seconds)`` is called as each ends (an end-of-generation token, ``max_tokens``, or ``n_ctx``). A prompt
        joins when a sequence is free and the KV cells it may need are."""
        import llama_cpp
        import numpy as np

        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        queue, free = deque(range(len(prompts))), list(range(self.parallel))[::-1]
        running: dict[int, _Running] = {}
        reserved = 0
        while queue or running:
            self.batch.n_tokens = 0
            rows = {}
            for seq, r in running.items():
                rows[seq] = self._add(r.last, r.pos, seq, True)
                r.pos += 1
            while queue and free:
                toks = prompts[queue[0]]
                cells = min(len(toks) + max_tokens, self.n_ctx)
                if running and reserved + cells > self.cells:
                    break
                seq = free.pop()
                running[seq] = _Running(queue.popleft(), len(toks), cells, time.monotonic())
                reserved += cells
                for j, t in enumerate(toks):
                    rows[seq] = self._add(t, j, seq, j == len(toks) - 1)
            rc = llama_cpp.llama_decode(self.ctx, self.batch)
            if rc:
                raise RuntimeError(f"llama_decode returned {rc} for {self.batch.n_tokens} tokens")
            for seq, row in rows.items():
                r = running[seq]
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
                tok = int(logits.argmax())
                end = llama_cpp.llama_vocab_is_eog(self.vocab, tok)
                if not end:
                    r.tokens.append(tok)
                    r.last = tok
                if end or len(r.tokens) >= max_tokens or r.pos >= self.n_ctx:
                    done(r.item, r.tokens, time.monotonic() - r.started)
                    llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
                    del running[seq]
                    free.append(seq)
                    reserved -= r.cells

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
