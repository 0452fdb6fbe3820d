"""One async client for every OpenAI-compatible teacher or judge.

Bounded concurrency; retries (tenacity) with full-jitter exponential backoff on 429, 5xx, timeouts,
connection errors and unparseable output, each fault counted by kind in ``stats``; a response cache keyed
by request hash (a retried or re-run step never pays twice); a cost-ledger row per paid call; the run
budget checked before every network call.

Budget semantics of :meth:`LLMClient.chat_many`: once :class:`BudgetExceeded` is raised, no new
request starts; requests in flight finish and are recorded (and cached); every request that did not
start gets the ``BudgetExceeded`` instance in its slot of the returned list. Nothing is re-raised:
the caller keeps the completed results and fails the task with the budget message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from cogumi_tasks.core.config import EndpointConfig, LLMConfig
from cogumi_tasks.core.ledger import BudgetExceeded, CostLedger, ResponseCache

log = logging.getLogger("cogumi.llm")

LOOPBACK = ("http://127.0.0.1", "http://localhost", "http://[::1]")
FAULT_KINDS = ("429", "5xx", "timeout", "connection", "unparseable")
FLUSH_EVERY = 25
RESAMPLE_TEMPERATURE = 0.7  # after a rejected answer; at temperature 0 a retry would repeat it
PROGRESS_EVERY_S = 5.0


class LLMCallFailed(RuntimeError):
    """A call that still failed after every retry, or was refused for a reason retries cannot fix."""


class LLMRefused(LLMCallFailed):
    """The endpoint refused the request (a 4xx other than 408/429): asking again would get the same answer."""


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.retry_after = kind, retry_after


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request; ``response_format`` is passed to the endpoint as given."""

    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    response_format: dict | None = None

    def key(self, model: str) -> str:
        """Stable hash of the model and every field: the cache key and the batch custom_id."""
        body = json.dumps({"model": model, **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()

    def body(self, model: str) -> dict:
        """The JSON body of ``POST /v1/chat/completions``."""
        out: dict[str, Any] = {"model": model, "messages": self.messages, "max_tokens": self.max_tokens,
                               "temperature": self.temperature}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.response_format is not None:
            out["response_format"] = self.response_format
        return out


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    attempts: int
    request_hash: str
    parsed: Any = None


def resolve_api_key(endpoint: EndpointConfig) -> str:
    """The key from the environment variable the endpoint names (``endpoint.key_env``: its ``api_key_env``, or
    the variable the provider fills from its ``conn_id`` connection); loopback servers get ``sk-local``."""
    loopback = endpoint.base_url.startswith(LOOPBACK)
    if endpoint.api_key_env or endpoint.conn_id:
        key = os.environ.get(endpoint.key_env)
        if key:
            return key
        if not loopback:
            raise LLMCallFailed(f"endpoint {endpoint.name}: environment variable {endpoint.key_env} is not "
                                "set (or give the endpoint an Airflow connection with conn_id)")
    if loopback:
        return "sk-local"
    raise LLMCallFailed(f"endpoint {endpoint.name}: no api_key_env or conn_id for {endpoint.base_url}")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2**attempt)))


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (numeric form only)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is not None:
            try:
                return max(0.0, float(raw) * scale)
            except ValueError:
                continue
    return None


class LLMClient:
    """Chat completions against one endpoint, with retries, cache, ledger and budget."""

    def __init__(self, endpoint: EndpointConfig, llm: LLMConfig, ledger: CostLedger, *, step: str,
                 cache: ResponseCache | None = None, api_key: str | None = None, progress: bool = False,
                 rng: random.Random | None = None):
        from openai import AsyncOpenAI

        self.endpoint, self.llm, self.ledger, self.step, self.cache = endpoint, llm, ledger, step, cache
        self.progress = progress
        self.rng = rng or random.Random()
        self.openai = AsyncOpenAI(base_url=endpoint.base_url, api_key=api_key or resolve_api_key(endpoint),
                                  timeout=endpoint.timeout_s, max_retries=0)
        self._sem = asyncio.Semaphore(endpoint.max_concurrency)
        # no_usage: calls that ended before an answer with usage (a fault or a refusal), so without a ledger row;
        # a provider may still bill a timed-out call, but no one can know its tokens
        self.stats: dict[str, int] = {k: 0 for k in (*FAULT_KINDS, "calls", "no_usage", "cache_hits", "retries",
                                                     "failed")}

    async def aclose(self) -> None:
        await self.openai.close()

    # ------------------------------------------------------------ cache and ledger
    def _from_cache(self, key: str, validate: Callable[[str], Any] | None) -> ChatResult | None:
        """A cached answer (ledger row with cost 0), or None. A cached text validate() rejects is a miss."""
        if self.cache is None:
            return None
        hit = self.cache.get(key)
        if hit is None:
            return None
        try:
            parsed = validate(hit["text"]) if validate else None
        except ValueError as exc:
            log.warning("%s: cached answer %s fails validation (%s); asking again", self.endpoint.name,
                        key[:12], exc)
            return None
        self.stats["cache_hits"] += 1
        self.ledger.record(step=self.step, endpoint=self.endpoint.name, model=self.endpoint.model,
                           price=self.endpoint.price, prompt_tokens=hit["prompt_tokens"],
                           completion_tokens=hit["completion_tokens"], cached=True, request_hash=key)
        return ChatResult(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], True, 0, key, parsed)

    def record_paid(self, key: str, prompt_tokens: int, completion_tokens: int, batch: bool) -> None:
        self.ledger.record(step=self.step, endpoint=self.endpoint.name, model=self.endpoint.model,
                           price=self.endpoint.price, prompt_tokens=prompt_tokens,
                           completion_tokens=completion_tokens, batch=batch, request_hash=key)

    def store_result(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, batch: bool) -> None:
        """Ledger row and cache entry for a paid, validated answer (also used by the batch path)."""
        self.record_paid(key, prompt_tokens, completion_tokens, batch)
        if self.cache is not None:
            self.cache.put(key, {"text": text, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "model": self.endpoint.model, "created": time.time()})

    # ------------------------------------------------------------ one call
    @staticmethod
    def resample(req: ChatRequest, n: int) -> ChatRequest:
        """The request for the retry after the ``n``-th rejected answer: another seed, and a
        temperature of at least RESAMPLE_TEMPERATURE (the cache key stays the original's)."""
        return replace(req, seed=(req.seed or 0) + n, temperature=max(req.temperature, RESAMPLE_TEMPERATURE))

    async def _once(self, req: ChatRequest) -> tuple[str, int, int]:
        import openai

        try:
            raw = await self.openai.chat.completions.with_raw_response.create(**req.body(self.endpoint.model))
        except openai.APITimeoutError as exc:
            raise _Retryable("timeout", str(exc)) from None
        except openai.APIConnectionError as exc:
            raise _Retryable("connection", str(exc)) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status == 429:
                raise _Retryable("429", f"HTTP 429: {exc.message}", _retry_after(exc.response.headers)) from None
            if status >= 500:
                raise _Retryable("5xx", f"HTTP {status}: {exc.message}") from None
            if status == 408:
                raise _Retryable("timeout", "HTTP 408") from None
            self.stats["failed"] += 1
            raise LLMRefused(f"endpoint {self.endpoint.name} ({self.endpoint.base_url}) refused the request: "
                             f"HTTP {status}: {exc.message}") from None
        try:
            resp = raw.parse()
            text = resp.choices[0].message.content or ""
            usage = resp.usage
        except Exception as exc:  # a 200 whose body is not a chat completion
            raise _Retryable("unparseable", f"bad response body ({type(exc).__name__})") from None
        return text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0

    async def chat(self, req: ChatRequest, validate: Callable[[str], Any] | None = None) -> ChatResult:
        """One answer: from the cache, or from the endpoint with retries.

        Raises :class:`BudgetExceeded` (never retried) before a network call once the run's budget is
        spent, :class:`LLMCallFailed` after the last retry or on a 4xx other than 408/429.
        ``validate(text)`` raising ValueError counts as unparseable output and is retried with
        :meth:`resample` (the paid call is still in the ledger); only validated answers are cached,
        under the original request's key.
        """
        key = req.key(self.endpoint.model)
        cached = await asyncio.to_thread(self._from_cache, key, validate)
        if cached is not None:
            return cached
        rejected, sent = 0, req
        async with self._sem:
            try:
                async for attempt in self._retrying():
                    with attempt:
                        await asyncio.to_thread(self.ledger.check_budget)
                        self.stats["calls"] += 1
                        try:
                            text, p_tok, c_tok = await self._once(sent)
                        except (_Retryable, LLMCallFailed):
                            self.stats["no_usage"] += 1
                            raise
                        parsed = None
                        if validate:
                            try:
                                parsed = validate(text)
                            except ValueError as exc:
                                self.record_paid(key, p_tok, c_tok, False)
                                rejected += 1
                                sent = self.resample(req, rejected)
                                raise _Retryable("unparseable", f"validation: {exc}") from None
                        await asyncio.to_thread(self.store_result, key, text, p_tok, c_tok, False)
                        return ChatResult(text, p_tok, c_tok, False, attempt.retry_state.attempt_number, key, parsed)
            except _Retryable as last:  # the last attempt's fault
                self.stats["failed"] += 1
                raise LLMCallFailed(f"endpoint {self.endpoint.name}: gave up after {self.llm.max_retries + 1} "
                                    f"attempts; last {last.kind}: {last}") from None
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _retrying(self) -> AsyncRetrying:
        """Up to ``max_retries`` retries of a :class:`_Retryable` fault, each fault counted by kind; anything
        else (BudgetExceeded, LLMCallFailed) is raised at once."""

        def count(state: RetryCallState) -> None:
            self.stats[state.outcome.exception().kind] += 1

        def before_sleep(state: RetryCallState) -> None:
            self.stats["retries"] += 1
            exc = state.outcome.exception()
            log.debug("%s: %s: %s; retry %d in %.2fs", self.endpoint.name, exc.kind, exc, state.attempt_number,
                      state.upcoming_sleep)

        return AsyncRetrying(stop=stop_after_attempt(self.llm.max_retries + 1),
                             retry=retry_if_exception_type(_Retryable), wait=self._wait, after=count,
                             before_sleep=before_sleep, reraise=True)

    def _wait(self, state: RetryCallState) -> float:
        """Full-jitter backoff, or the server's Retry-After when that is longer (both capped at backoff_max_s)."""
        delay = backoff_delay(state.attempt_number - 1, self.llm.backoff_base_s, self.llm.backoff_max_s, self.rng)
        retry_after = state.outcome.exception().retry_after
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.llm.backoff_max_s))
        return delay

    # ------------------------------------------------------------ many calls
    async def chat_many(self, reqs: list[ChatRequest], validate: Callable[[str], Any] | None = None,
                        on_result: Callable[[int, ChatResult], None] | None = None) -> list[ChatResult | Exception]:
        """Answer every request concurrently (at most ``max_concurrency`` in flight).

        A failed request yields its exception in its slot; the others go on. Once the budget is
        spent, requests not yet started yield the BudgetExceeded instance while those in flight
        finish and are recorded. ``on_result(i, result)`` is called as each answer arrives.
        """
        results: list[ChatResult | Exception | None] = [None] * len(reqs)
        spent: list[BudgetExceeded] = []
        done = 0
        started = last_log = time.monotonic()

        async def one(i: int, req: ChatRequest) -> None:
            nonlocal done, last_log
            if spent:
                results[i] = spent[0]
                return
            try:
                res: ChatResult | Exception = await self.chat(req, validate)
            except BudgetExceeded as exc:
                spent.append(exc)
                res = exc
            except Exception as exc:  # recorded in its slot; the others go on
                res = exc
            results[i] = res
            if on_result and isinstance(res, ChatResult):
                on_result(i, res)
            done += 1
            if done % FLUSH_EVERY == 0:
                await asyncio.to_thread(self.ledger.flush)
            now = time.monotonic()
            if self.progress and (now - last_log >= PROGRESS_EVERY_S or done == len(reqs)):
                last_log = now
                faults = sum(self.stats[k] for k in FAULT_KINDS)
                log.info("%s [%s]: %d/%d done (%.2f/s), %d from cache, %d faults, %d retries, %d failed, "
                         "$%.5f spent", self.step, self.endpoint.name, done, len(reqs),
                         done / max(now - started, 1e-9), self.stats["cache_hits"], faults,
                         self.stats["retries"], self.stats["failed"], self.ledger.spent_usd)

        try:
            await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        finally:
            await asyncio.to_thread(self.ledger.flush)
        return [r if r is not None else spent[0] for r in results]
