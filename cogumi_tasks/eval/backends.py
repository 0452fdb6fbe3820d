"""Model backends behind one interface: chat messages in, greedy answers out.

``HFBackend`` (a transformers checkpoint directory, optional peft adapter), ``GGUFBackend``
(llama.cpp in process, GGUF LoRAs applied together with their scales) and ``EndpointBackend`` (any
OpenAI-compatible endpoint through :class:`~cogumi_tasks.llm.client.LLMClient`, so calls are cached, priced,
retried and budgeted). :func:`load_backend` builds one from a :class:`~cogumi_tasks.core.config.ModelRef`.
Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cogumi_tasks.core.config import EndpointConfig, LLMConfig, ModelRef
from cogumi_tasks.core.ledger import BudgetExceeded, CostLedger, ResponseCache
from cogumi_tasks.models.packaged import builtin_gguf, gguf_threads

log = logging.getLogger("cogumi.eval")

PROGRESS_EVERY_S = 5.0


@dataclass
class Generation:
    """One answer. ``seconds`` is this item's share of the wall time; ``error`` is set (and ``text``
    empty) when the model could not answer this item."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    error: str | None = None


class ModelBackend(Protocol):
    name: str

    def generate(self, conversations: list[list[dict]], max_tokens: int) -> list[Generation]:
        """Greedy answers, one per conversation, in order."""
        ...

    def close(self) -> None: ...


class _Progress:
    """Logs ``done/total`` with throughput at most every PROGRESS_EVERY_S seconds, and at the end."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done, self.tokens = name, total, 0, 0
        self.started = self.last = time.monotonic()

    def add(self, n: int, tokens: int) -> None:
        self.done += n
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            log.info("%s: %d/%d answered (%.2f items/s, %.1f tok/s)", self.name, self.done, self.total,
                     self.done / elapsed, self.tokens / elapsed)


def generate_budgeted(backend: ModelBackend, conversations: list[list[dict]],
                      budgets: Sequence[int]) -> list[Generation]:
    """``backend.generate`` with an answer length per conversation (an item's suite ``max_tokens``): one call per
    distinct length, conversations in their order within it, the answers back in the input order."""
    if len(budgets) != len(conversations):
        raise ValueError(f"{len(budgets)} answer lengths for {len(conversations)} conversations")
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(budgets):
        groups.setdefault(n, []).append(i)
    out: list[Generation | None] = [None] * len(conversations)
    for n, idx in groups.items():
        for i, g in zip(idx, backend.generate([conversations[i] for i in idx], n), strict=True):
            out[i] = g
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- transformers
class HFBackend:
    """A causal LM checkpoint directory (and optional peft adapter directory) on CPU.

    Prompts are rendered with the tokenizer's chat template, sorted by length and answered in
    left-padded batches of ``batch_size``, greedy.
    """

    def __init__(self, path: str | Path, adapter: str | Path | None = None, *, batch_size: int = 4,
                 dtype: str = "float32", name: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or f"hf:{Path(path).name}"
        self.batch_size = max(1, batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    def generate(self, conversations: list[list[dict]], max_tokens: int) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        stop = self._stop_ids()
        gen_cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=sorted(stop))
        out: list[Generation | None] = [None] * len(prompts)
        progress = _Progress(self.name, len(prompts))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            t0 = time.monotonic()
            with torch.inference_mode():
                seqs = self.model.generate(**enc, generation_config=gen_cfg)
            share = (time.monotonic() - t0) / len(idx)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            made = 0
            for i, ids in zip(idx, new, strict=True):
                cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
                made += cut
                text = tok.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                out[i] = Generation(text, lengths[i], cut, share)
            progress.add(len(idx), made)
        return [g for g in out if g is not None]

    def close(self) -> None:
        self.model = None
        import gc

        gc.collect()


# ---------------------------------------------------------------- llama.cpp
FLOAT_FILE_TYPES = {0, 1, 32}  # GGUF general.file_type: all f32, mostly f16, mostly bf16


class GGUFBackend:
    """llama.cpp in process (``llama_cpp.Llama``), greedy (temperature 0).

    A float GGUF (f32, f16, bf16) decodes ``parallel`` conversations together
    (:class:`~cogumi_tasks.eval.llama_batch.BatchDecoder`). A quantized one decodes each conversation alone
    through ``create_chat_completion``, reusing the previous prompt's prefix, in ``min(parallel, n_threads)``
    contexts side by side (``workers``), each with its share of the threads: a one-thread context runs a small
    model's many small operations without waiting for the other threads at each one, so two of them on 2 cores
    answer more per second than one context with both threads (bench/gguf_workers.py: 1.28-1.55x, 90 of 90
    answers equal). Conversation i goes to context i mod ``workers``, which answers its share in order, as a
    one-context backend of its thread count would: the same conversations in the same order give the same answers.
    Against one context answering the whole list they can differ now and then, since the reused prefix of the
    previous prompt differs and so do the shapes, and the rounding, of the prompt's products.
    Batching a quantized GGUF does not pay (bench/eval_decode.py: Q4_1 1.1x with 20 of 90 answers equal).

    ``adapters``: GGUF LoRAs (``convert_lora_to_gguf.py``) applied together, each with its scale, e.g. Phase 2's
    recovery LoRA at 1.0 and a Phase 3 modifier at its ``adapter_scale`` (a bare path: that one at 1.0). Each file
    is loaded once per model (``llama_adapter_lora_init``); :meth:`set_adapters` switches the set on every context
    (``llama_set_adapters_lora``) and drops the cached prompt state, which belongs to the previous set.
    A prompt that does not fit ``n_ctx`` gives an empty answer with ``error`` set.
    """

    def __init__(self, path: str | Path, adapters: Sequence[tuple[str | Path, float]] | str | Path | None = None, *,
                 n_ctx: int = 4096, parallel: int = 8, n_threads: int | None = None, name: str | None = None):
        from llama_cpp import Llama

        from cogumi_tasks.eval.llama_batch import BatchDecoder

        n_threads = n_threads or gguf_threads()
        self.name = name or f"gguf:{Path(path).name}"
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                         seed=0, verbose=False)
        self.workers = [self.llm]
        self._loaded: dict[tuple[int, str], object] = {}  # (worker, resolved path) -> llama_adapter_lora pointer
        self.adapters: list[tuple[str, float]] = []
        file_type = int(self.llm.metadata.get("general.file_type", -1))
        self.decoder = (BatchDecoder(self.llm, parallel=parallel, n_ctx=n_ctx, n_threads=n_threads)
                        if parallel > 1 and file_type in FLOAT_FILE_TYPES else None)
        n_workers = 1 if file_type in FLOAT_FILE_TYPES else max(1, min(parallel, n_threads))
        if n_workers > 1:
            import llama_cpp

            per = n_threads // n_workers
            llama_cpp.llama_set_n_threads(self.llm.ctx, per, per)
            self.workers += [Llama(model_path=str(path), n_ctx=n_ctx, n_threads=per, n_threads_batch=per, seed=0,
                                   verbose=False) for _ in range(n_workers - 1)]
        if isinstance(adapters, str | Path):
            adapters = [(adapters, 1.0)]
        if adapters:
            self.set_adapters(adapters)

    def set_adapters(self, adapters: Sequence[tuple[str | Path, float]]) -> None:
        """Apply exactly these (GGUF LoRA path, scale) pairs from the next answer on; an empty list is the base."""
        import ctypes

        import llama_cpp

        pairs = [(str(Path(p).resolve()), float(s)) for p, s in adapters]
        for w, llm in enumerate(self.workers):
            for p, _ in pairs:
                if (w, p) not in self._loaded:
                    ptr = llama_cpp.llama_adapter_lora_init(llm.model, p.encode())
                    if not ptr:
                        raise RuntimeError(f"llama.cpp could not load the LoRA adapter {p} on {self.name}")
                    self._loaded[(w, p)] = ptr
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(pairs))(*[self._loaded[(w, p)] for p, _ in pairs])
            scales = (ctypes.c_float * len(pairs))(*[s for _, s in pairs])
            ctx = self.decoder.ctx if self.decoder else llm.ctx
            if llama_cpp.llama_set_adapters_lora(ctx, arr, len(pairs), scales):
                raise RuntimeError(f"llama_set_adapters_lora failed for {[p for p, _ in pairs]} on {self.name}")
            llm.reset()  # the prefix cache holds states computed under the previous adapters
        self.adapters = pairs

    def generate(self, conversations: list[list[dict]], max_tokens: int) -> list[Generation]:
        if self.decoder:
            return self._generate_batched(conversations, max_tokens)
        import threading
        from concurrent.futures import ThreadPoolExecutor

        out: list[Generation | None] = [None] * len(conversations)
        progress = _Progress(self.name, len(conversations))
        lock, n = threading.Lock(), len(self.workers)

        def work(k: int) -> None:  # context k answers conversations k, k + n, ... in order
            for i in range(k, len(conversations), n):
                out[i] = gen = self._answer(self.workers[k], conversations[i], max_tokens)
                with lock:
                    progress.add(1, gen.completion_tokens)

        if n == 1:
            work(0)
        else:
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(work, range(n)))  # llama_decode releases the GIL
        return out  # type: ignore[return-value]

    @staticmethod
    def _answer(llm, conv: list[dict], max_tokens: int) -> Generation:
        t0 = time.monotonic()
        try:
            resp = llm.create_chat_completion(messages=conv, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                              top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0)
        except ValueError as exc:  # e.g. "Requested tokens (...) exceed context window"
            return Generation("", 0, 0, time.monotonic() - t0, error=str(exc))
        usage = resp.get("usage") or {}
        text = (resp["choices"][0]["message"].get("content") or "").strip()
        return Generation(text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                          time.monotonic() - t0)

    def _generate_batched(self, conversations: list[list[dict]], max_tokens: int) -> list[Generation]:
        dec = self.decoder
        out: list[Generation | None] = [None] * len(conversations)
        progress = _Progress(self.name, len(conversations))
        prompts = [dec.prompt(c) for c in conversations]
        todo = [i for i, p in enumerate(prompts) if len(p) < dec.n_ctx]
        for i in sorted(set(range(len(prompts))) - set(todo)):
            out[i] = Generation("", len(prompts[i]), 0, 0.0,
                                error=f"Requested tokens ({len(prompts[i])}) exceed context window of {dec.n_ctx}")
            progress.add(1, 0)

        def done(k: int, tokens: list[int], seconds: float) -> None:
            i = todo[k]
            out[i] = Generation(dec.text(tokens).strip(), len(prompts[i]), len(tokens), seconds)
            progress.add(1, len(tokens))

        dec.decode([prompts[i] for i in todo], max_tokens, done)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        workers, self.workers, self.llm = getattr(self, "workers", []), [], None
        if not workers:
            return
        import llama_cpp

        for w, llm in enumerate(workers):
            llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
            if w == 0 and self.decoder:
                self.decoder.close()  # the context the adapters are set on, before the adapters
            for (owner, _), ptr in self._loaded.items():  # before the model they belong to
                if owner == w:
                    llama_cpp.llama_adapter_lora_free(ptr)
            llm.close()
        self._loaded = {}


# ---------------------------------------------------------------- OpenAI-compatible endpoints
class EndpointBackend:
    """Any OpenAI-compatible endpoint through :class:`LLMClient` (cache, ledger, retries, budget).

    A request that still fails after the client's retries gives an empty answer with ``error`` set.
    A spent budget raises :class:`BudgetExceeded` after the other answers are recorded and cached,
    so a re-run resumes from them rather than scoring unanswered items as wrong.
    """

    def __init__(self, endpoint: EndpointConfig, llm: LLMConfig, ledger: CostLedger,
                 cache: ResponseCache | None = None, *, step: str = "eval.run", api_key: str | None = None,
                 seed: int | None = None):
        self.endpoint, self.llm, self.ledger, self.cache = endpoint, llm, ledger, cache
        self.step, self.api_key, self.seed = step, api_key, seed
        self.name = f"endpoint:{endpoint.name}"
        self.stats: dict[str, int] = {}

    async def _run(self, reqs: list) -> list:
        from cogumi_tasks.llm.client import LLMClient

        # One client per event loop: its connection pool and semaphore belong to the loop.
        client = LLMClient(self.endpoint, self.llm, self.ledger, step=self.step, cache=self.cache,
                           api_key=self.api_key, progress=True)
        try:
            return await client.chat_many(reqs)
        finally:
            self.stats = dict(client.stats)
            await client.aclose()

    def generate(self, conversations: list[list[dict]], max_tokens: int) -> list[Generation]:
        from cogumi_tasks.llm.client import ChatRequest

        reqs = [ChatRequest(messages=c, max_tokens=max_tokens, temperature=0.0, seed=self.seed)
                for c in conversations]
        t0 = time.monotonic()
        results = asyncio.run(self._run(reqs))
        share = (time.monotonic() - t0) / max(len(reqs), 1)
        spent = [r for r in results if isinstance(r, BudgetExceeded)]
        if spent:
            done = sum(not isinstance(r, Exception) for r in results)
            raise BudgetExceeded(f"{self.name}: {spent[0]} ({done} of {len(results)} answers kept in the cache)")
        out = []
        for r in results:
            if isinstance(r, Exception):
                out.append(Generation("", 0, 0, share, error=f"{type(r).__name__}: {r}"))
            else:
                out.append(Generation(r.text.strip(), r.prompt_tokens, r.completion_tokens, share))
        failed = sum(g.error is not None for g in out)
        if failed:
            log.warning("%s: %d of %d requests failed after retries", self.name, failed, len(out))
        return out

    def close(self) -> None:
        """Nothing to release: each generate() call closes its own client."""


# ---------------------------------------------------------------- from config
def load_backend(ref: ModelRef, *, endpoints: dict[str, EndpointConfig], llm: LLMConfig, ledger: CostLedger,
                 cache: ResponseCache | None, fetch: Callable[[str], Path], batch_size: int = 4,
                 step: str = "eval.run", hf_runtime: Literal["transformers", "llama_cpp"] = "transformers",
                 pre_tokenizer: str | None = None,
                 work_dir: Path | None = None) -> ModelBackend:
    """The backend a :class:`ModelRef` names. ``fetch`` turns an ``s3://`` URI (a prefix ending in
    ``/`` for a directory) or a local path into a local path. With ``hf_runtime="llama_cpp"`` an HF
    directory is converted to an f16 GGUF under ``work_dir`` and run in llama.cpp."""
    if ref.kind == "endpoint":
        if not ref.endpoint or ref.endpoint not in endpoints:
            raise ValueError(f"model ref names endpoint {ref.endpoint!r}; configured: {sorted(endpoints)}")
        return EndpointBackend(endpoints[ref.endpoint], llm, ledger, cache, step=step)
    if not ref.path:
        raise ValueError(f"a {ref.kind} model ref needs a path")
    if ref.kind == "gguf":
        path = builtin_gguf(ref.path) if ref.path.startswith("builtin:") else fetch(ref.path)
        adapters = [(fetch(ref.adapter), 1.0)] if ref.adapter else []
        return GGUFBackend(path, adapters, parallel=batch_size, name=f"gguf:{ref.path}")
    if ref.kind == "hf":
        def as_dir(uri: str) -> str:
            return uri + "/" if uri.startswith("s3://") and not uri.endswith("/") else uri

        if hf_runtime not in ("transformers", "llama_cpp"):
            raise ValueError(f"unknown hf_runtime {hf_runtime!r}: transformers or llama_cpp")
        if hf_runtime == "llama_cpp":
            from cogumi_tasks.models.convert import convert_hf_to_gguf

            if ref.adapter:
                raise ValueError("hf_runtime llama_cpp takes no adapter: merge it into the model first")
            if work_dir is None:
                raise ValueError("hf_runtime llama_cpp needs a work_dir for the converted GGUF")
            f16 = convert_hf_to_gguf(fetch(as_dir(ref.path)), Path(work_dir) / "hf-f16.gguf", "f16", pre_tokenizer)
            return GGUFBackend(f16, parallel=batch_size, name=f"gguf-f16:{ref.path}")
        adapter = fetch(as_dir(ref.adapter)) if ref.adapter else None
        return HFBackend(fetch(as_dir(ref.path)), adapter, batch_size=batch_size, name=f"hf:{ref.path}")
    raise ValueError(f"unknown model kind {ref.kind!r}")
