"""The OpenAI Batch API path, for teachers configured with ``batch: true``.

Cache hits are served first. The rest go into one JSONL (custom_id = request hash), are uploaded,
and a batch is created; its id is stored at ``state_uri`` *before* polling, so a restarted task
resumes polling the same batch and never uploads twice. Results map back by custom_id, are
validated, priced at the batch discount and cached. Requests that failed inside the batch or fail
validation fall back to the normal per-request path.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMCallFailed, LLMClient

log = logging.getLogger("cogumi.llm")

DONE = {"completed", "failed", "expired", "cancelled"}


def batch_jsonl(client: LLMClient, reqs: list[ChatRequest]) -> bytes:
    lines = [
        json.dumps({"custom_id": r.key(client.endpoint.model), "method": "POST", "url": "/v1/chat/completions",
                    "body": r.body(client.endpoint.model)}, sort_keys=True)
        for r in reqs
    ]
    return ("\n".join(lines) + "\n").encode()


async def _submit(client: LLMClient, reqs: list[ChatRequest], state_uri: str, store: ArtifactStore) -> dict:
    client.ledger.check_budget()
    upload = await client.openai.files.create(file=("batch.jsonl", io.BytesIO(batch_jsonl(client, reqs))),
                                              purpose="batch")
    batch = await client.openai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")
    state = {"batch_id": batch.id, "input_file_id": upload.id, "created": time.time(),
             "custom_ids": [r.key(client.endpoint.model) for r in reqs]}
    await asyncio.to_thread(store.put_json, state_uri, state)
    log.info("%s: batch %s created with %d requests", client.endpoint.name, batch.id, len(reqs))
    return state


async def _wait(client: LLMClient, batch_id: str) -> Any:
    deadline = time.monotonic() + client.llm.batch_timeout_s
    while True:
        batch = await client.openai.batches.retrieve(batch_id)
        counts = batch.request_counts
        log.info("%s: batch %s %s (%s/%s done)", client.endpoint.name, batch_id, batch.status,
                 getattr(counts, "completed", "?"), getattr(counts, "total", "?"))
        if batch.status in DONE:
            return batch
        if time.monotonic() > deadline:
            raise LLMCallFailed(f"{client.endpoint.name}: batch {batch_id} not done after "
                                f"{client.llm.batch_timeout_s:.0f}s (still {batch.status}); a re-run resumes it")
        await asyncio.sleep(client.llm.batch_poll_s)


async def _read_output(client: LLMClient, file_id: str | None) -> dict[str, dict]:
    if not file_id:
        return {}
    content = await client.openai.files.content(file_id)
    out = {}
    for line in content.text.splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["custom_id"]] = row
    return out


async def run_batch(client: LLMClient, reqs: list[ChatRequest], *, state_uri: str, store: ArtifactStore,
                    validate: Callable[[str], Any] | None = None) -> list[ChatResult | Exception]:
    """Answer ``reqs`` through the provider's Batch API (see the module docstring)."""
    results: list[ChatResult | Exception | None] = [None] * len(reqs)
    todo: list[int] = []
    for i, req in enumerate(reqs):
        hit = await asyncio.to_thread(client._from_cache, req, req.key(client.endpoint.model), validate)
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    if todo:
        state = await asyncio.to_thread(store.get_json, state_uri) if store.exists(state_uri) else None
        if state is None:
            state = await _submit(client, [reqs[i] for i in todo], state_uri, store)
        else:
            log.info("%s: resuming batch %s", client.endpoint.name, state["batch_id"])
        batch = await _wait(client, state["batch_id"])
        rows = await _read_output(client, batch.output_file_id)
        fallback = []
        for i in todo:
            key = reqs[i].key(client.endpoint.model)
            row = rows.get(key)
            response = (row or {}).get("response") or {}
            if response.get("status_code") != 200:
                fallback.append(i)
                continue
            body = response["body"]
            text = body["choices"][0]["message"].get("content") or ""
            usage = body.get("usage") or {}
            p_tok, c_tok = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            try:
                parsed = validate(text) if validate else None
            except ValueError:
                client.stats["unparseable"] += 1
                fallback.append(i)
                continue
            await asyncio.to_thread(client.store_result, key, text, p_tok, c_tok, True)
            results[i] = ChatResult(text, p_tok, c_tok, False, 1, key, parsed)
        if fallback:
            log.info("%s: %d batch requests failed or were unparseable; retrying them one by one",
                     client.endpoint.name, len(fallback))
            again = await client.chat_many([reqs[i] for i in fallback], validate=validate)
            for i, res in zip(fallback, again, strict=True):
                results[i] = res
        client.ledger.flush()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
