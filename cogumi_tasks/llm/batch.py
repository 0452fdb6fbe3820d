"""The OpenAI Batch API path, for endpoints configured with ``batch: true``.

Cache hits are served first. The rest go into one JSONL (custom_id = request hash), are uploaded,
and a batch is created; ``{"batch_id", "input_file_id", "custom_ids"}`` is stored at ``state_uri``
*before* polling, so a restarted task resumes polling the same batch and never uploads twice.
Results map back by custom_id, are validated, priced at the batch discount and cached.

Fallback: a request whose batch line failed (non-200, error, missing from the output, batch
failed/expired/cancelled), whose answer fails ``validate``, or that is not in the resumed batch's
custom_ids goes through :meth:`LLMClient.chat_many` (the normal, undiscounted path with retries).
Budget: checked once before creating a batch; if spent, the uncached requests get BudgetExceeded.

Waiting: by default the batch is polled here until done (``llm.batch_poll_s``, ``llm.batch_timeout_s``).
Inside :func:`deferring` (how the Airflow operator runs a step) a batch that is not done raises
:class:`BatchPending` instead, once its state is stored: the operator waits on a trigger that calls
:func:`poll_batch`, then runs the step again, which finds the state and the finished batch.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import EndpointConfig
from cogumi_tasks.core.ledger import BudgetExceeded
from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMCallFailed, LLMClient

log = logging.getLogger("cogumi.llm")

DONE = {"completed", "failed", "expired", "cancelled"}
CHAT_URL = "/v1/chat/completions"

_DEFER: ContextVar[bool] = ContextVar("cogumi_defer_batches", default=False)


class BatchPending(BaseException):
    """A submitted batch is not done and waiting was deferred (see :func:`deferring`).

    Like Airflow's TaskDeferred it derives from BaseException: it is no failure, so ``except Exception``
    (a step's failure record, a caller's error handling) lets it through to whoever defers."""

    def __init__(self, endpoint: EndpointConfig, batch_id: str, state_uri: str, status: str) -> None:
        super().__init__(f"{endpoint.name}: batch {batch_id} is {status} (state at {state_uri})")
        self.endpoint, self.batch_id, self.state_uri, self.status = endpoint, batch_id, state_uri, status


@contextmanager
def deferring() -> Iterator[None]:
    """Within this block (and the event loops it starts) a batch that is not done raises
    :class:`BatchPending` instead of being polled in this process."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def batch_jsonl(client: LLMClient, reqs: list[ChatRequest]) -> bytes:
    """The Batch API input file: one request per line, custom_id = request hash."""
    model = client.endpoint.model
    lines = [json.dumps({"custom_id": r.key(model), "method": "POST", "url": CHAT_URL, "body": r.body(model)},
                        sort_keys=True) for r in reqs]
    return ("\n".join(lines) + "\n").encode()


async def _submit(client: LLMClient, reqs: list[ChatRequest], state_uri: str, store: ArtifactStore) -> dict:
    upload = await client.openai.files.create(file=("batch.jsonl", io.BytesIO(batch_jsonl(client, reqs))),
                                              purpose="batch")
    batch = await client.openai.batches.create(input_file_id=upload.id, endpoint=CHAT_URL, completion_window="24h")
    state = {"batch_id": batch.id, "input_file_id": upload.id, "created": time.time(),
             "endpoint": client.endpoint.name, "custom_ids": [r.key(client.endpoint.model) for r in reqs]}
    await asyncio.to_thread(store.put_json, state_uri, state)
    log.info("%s: batch %s created with %d requests (state at %s)", client.endpoint.name, batch.id, len(reqs),
             state_uri)
    return state


async def batch_status(openai_client: Any, batch_id: str, *, name: str, source: str) -> Any | None:
    """The batch as the endpoint reports it now, or None after a transient error (logged)."""
    import openai

    try:
        return await openai_client.batches.retrieve(batch_id)
    except openai.NotFoundError:
        raise LLMCallFailed(f"{name}: batch {batch_id} (from {source}) is unknown to {openai_client.base_url}; "
                            "delete that state object to submit a new batch") from None
    except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
            openai.RateLimitError) as exc:
        log.warning("%s: polling batch %s failed (%s); trying again", name, batch_id, type(exc).__name__)
        return None


async def poll_batch(openai_client: Any, batch_id: str, *, name: str, source: str, poll_s: float,
                     timeout_s: float | None = None, progress: bool = True) -> Any:
    """Poll until the batch is done and return it; transient errors are logged and polled again.
    Past ``timeout_s`` (None: no limit) LLMCallFailed says a re-run resumes polling."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_status = None
    while True:
        batch = await batch_status(openai_client, batch_id, name=name, source=source)
        if batch is not None:
            if batch.status != last_status or progress:
                counts = batch.request_counts
                log.info("%s: batch %s %s (%s/%s done, %s failed)", name, batch_id, batch.status,
                         getattr(counts, "completed", "?"), getattr(counts, "total", "?"),
                         getattr(counts, "failed", "?"))
                last_status = batch.status
            if batch.status in DONE:
                return batch
        if deadline is not None and time.monotonic() > deadline:
            raise LLMCallFailed(f"{name}: batch {batch_id} not done after {timeout_s:.0f}s; "
                                "a re-run resumes polling it")
        await asyncio.sleep(poll_s)


async def _wait(client: LLMClient, state: dict, state_uri: str) -> Any:
    """The finished batch: polled here, or (inside :func:`deferring`) BatchPending unless it is done now."""
    name, batch_id = client.endpoint.name, state["batch_id"]
    if not _DEFER.get():
        return await poll_batch(client.openai, batch_id, name=name, source=state_uri, poll_s=client.llm.batch_poll_s,
                                timeout_s=client.llm.batch_timeout_s, progress=client.progress)
    batch = await batch_status(client.openai, batch_id, name=name, source=state_uri)
    if batch is None or batch.status not in DONE:
        raise BatchPending(client.endpoint, batch_id, state_uri, batch.status if batch is not None else "unknown")
    return batch


async def _read_lines(client: LLMClient, file_id: str | None) -> dict[str, dict]:
    if not file_id:
        return {}
    content = await client.openai.files.content(file_id)
    rows = (json.loads(line) for line in content.text.splitlines() if line.strip())
    return {row["custom_id"]: row for row in rows}


def _answer(row: dict | None) -> tuple[str, int, int] | str:
    """(text, prompt_tokens, completion_tokens) from an output line, or why there is none."""
    if row is None:
        return "missing from the batch output"
    if row.get("error"):
        return f"batch error {row['error']}"
    response = row.get("response") or {}
    if response.get("status_code") != 200:
        return f"batch line HTTP {response.get('status_code')}"
    try:
        body = response["body"]
        text = body["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError):
        return "batch line body is not a chat completion"
    usage = body.get("usage") or {}
    return text, int(usage.get("prompt_tokens", 0) or 0), int(usage.get("completion_tokens", 0) or 0)


async def run_batch(client: LLMClient, reqs: list[ChatRequest], *, state_uri: str, store: ArtifactStore,
                    validate: Callable[[str], Any] | None = None) -> list[ChatResult | Exception]:
    """Answer ``reqs`` through the endpoint's Batch API (see the module docstring for fallback)."""
    model = client.endpoint.model
    results: list[ChatResult | Exception | None] = [None] * len(reqs)
    todo: list[int] = []
    for i, req in enumerate(reqs):
        hit = await asyncio.to_thread(client._from_cache, req.key(model), validate)
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    if not todo:
        await asyncio.to_thread(client.ledger.flush)
        return results  # type: ignore[return-value]

    state = await asyncio.to_thread(store.get_json, state_uri) if await asyncio.to_thread(
        store.exists, state_uri) else None
    if state is None:
        try:
            await asyncio.to_thread(client.ledger.check_budget)
        except BudgetExceeded as exc:
            for i in todo:
                results[i] = exc
            await asyncio.to_thread(client.ledger.flush)
            return results  # type: ignore[return-value]
        state = await _submit(client, [reqs[i] for i in todo], state_uri, store)
    else:
        log.info("%s: resuming batch %s from %s", client.endpoint.name, state["batch_id"], state_uri)
    batch = await _wait(client, state, state_uri)
    rows = await _read_lines(client, batch.output_file_id)
    rows.update({k: v for k, v in (await _read_lines(client, batch.error_file_id)).items() if k not in rows})

    fallback: list[int] = []
    for i in todo:
        key = reqs[i].key(model)
        got = _answer(rows.get(key))
        if isinstance(got, str):
            log.debug("%s: %s: %s", client.endpoint.name, key[:12], got)
            fallback.append(i)
            continue
        text, p_tok, c_tok = got
        try:
            parsed = validate(text) if validate else None
        except ValueError:
            client.stats["unparseable"] += 1
            client.record_paid(key, p_tok, c_tok, True)  # paid for, though unusable
            fallback.append(i)
            continue
        await asyncio.to_thread(client.store_result, key, text, p_tok, c_tok, True)
        results[i] = ChatResult(text, p_tok, c_tok, False, 1, key, parsed)
    log.info("%s: batch %s %s: %d answers, %d to retry one by one", client.endpoint.name, state["batch_id"],
             batch.status, len(todo) - len(fallback), len(fallback))
    if fallback:
        again = await client.chat_many([reqs[i] for i in fallback], validate=validate)
        for i, res in zip(fallback, again, strict=True):
            results[i] = res
    await asyncio.to_thread(client.ledger.flush)
    return results  # type: ignore[return-value]
