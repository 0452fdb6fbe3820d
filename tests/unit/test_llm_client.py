"""The LLM client against a scripted OpenAI-compatible stub server (in-process, on loopback).

No model and no S3: the response cache runs on an in-memory store with the ArtifactStore methods
it uses; the S3-backed cache, ledger and batch state are covered in tests/integration.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cogumi_tasks.core.config import EndpointConfig, LLMConfig
from cogumi_tasks.core.ledger import BudgetExceeded, CostLedger, Price, ResponseCache
from cogumi_tasks.llm.client import (
    ChatRequest,
    ChatResult,
    LLMCallFailed,
    LLMClient,
    backoff_delay,
    resolve_api_key,
)

PRICES = {"p": Price(input_per_mtok=1000.0, output_per_mtok=2000.0)}  # 10 in + 5 out tokens = $0.02


class Stub:
    """Answers ``/v1/chat/completions`` by a per-prompt script of actions, then ``ok``."""

    def __init__(self) -> None:
        self.script: dict[str, list[str]] = {}
        self.calls: dict[str, int] = {}
        self.bodies: dict[str, list[dict]] = {}
        self.base_url = ""

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def app(self):
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            self.calls[prompt] = self.calls.get(prompt, 0) + 1
            self.bodies.setdefault(prompt, []).append(body)
            actions = self.script.get(prompt, [])
            action = actions.pop(0) if actions else "ok"
            if action == "429":
                return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"Retry-After": "0.4"})
            if action in ("500", "400"):
                return JSONResponse({"error": {"message": f"stub {action}"}}, int(action))
            if action == "hang":
                await asyncio.sleep(1.5)
            if action == "garbage":
                return Response(b"<html>not json", 200, media_type="application/json")
            if action == "nochoices":
                return JSONResponse({"object": "chat.completion", "choices": []})
            text = action.removeprefix("text:") if action.startswith("text:") else f"answer to {prompt}"
            return JSONResponse({
                "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            })

        return app


@pytest.fixture(scope="module")
def stub():
    from cogumi_tasks.serve.threaded import ThreadedServer

    s = Stub()
    with ThreadedServer(s.app(), timeout_s=10, stop_timeout_s=5) as server:
        s.base_url = f"{server.url}/v1"
        yield s


class MemoryStore:
    """The three ArtifactStore methods ResponseCache uses, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def exists(self, uri: str) -> bool:
        return uri in self.objects

    def get_json(self, uri: str) -> Any:
        return json.loads(self.objects[uri])

    def put_json(self, uri: str, obj: Any) -> None:
        self.objects[uri] = json.dumps(obj)


def make(stub: Stub, *, budget: float = 100.0, concurrency: int = 4, retries: int = 4, cache: bool = False,
         timeout: float = 5.0) -> LLMClient:
    endpoint = EndpointConfig(name="stub", base_url=stub.base_url, model="m", price="p",
                              max_concurrency=concurrency, timeout_s=timeout)
    llm = LLMConfig(max_retries=retries, backoff_base_s=0.01, backoff_max_s=0.5)
    ledger = CostLedger(PRICES, budget)
    store = ResponseCache(MemoryStore(), "s3://b/cache") if cache else None  # type: ignore[arg-type]
    return LLMClient(endpoint, llm, ledger, step="test", cache=store, rng=random.Random(0))


def req(prompt: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": prompt}], max_tokens=8, **kw)


async def _run(client: LLMClient, coro):
    try:
        return await coro
    finally:
        await client.aclose()


def run(client: LLMClient, coro):
    return asyncio.run(_run(client, coro))


# ---------------------------------------------------------------- pure functions
def test_key_is_stable_and_covers_every_field():
    a = ChatRequest(messages=[{"role": "user", "content": "hi", "name": "x"}], max_tokens=8, seed=1,
                    response_format={"type": "json_object", "schema": {"type": "object", "required": ["a"]}})
    b = ChatRequest(messages=[{"name": "x", "content": "hi", "role": "user"}], max_tokens=8, seed=1,
                    response_format={"schema": {"required": ["a"], "type": "object"}, "type": "json_object"})
    assert a.key("m") == b.key("m") and len(a.key("m")) == 64
    assert a.key("m") != a.key("other-model")
    base = req("hi")
    variants = [req("ho"), req("hi", temperature=0.5), req("hi", seed=3), ChatRequest(base.messages, 9),
                req("hi", response_format={"type": "json_object"})]
    assert len({base.key("m"), *(v.key("m") for v in variants)}) == len(variants) + 1
    # pinned: a change to the hashing scheme would silently invalidate every cached response
    assert req("hi").key("m") == ChatRequest([{"role": "user", "content": "hi"}], 8).key("m")


def test_backoff_is_full_jitter_and_capped():
    rng = random.Random(1)
    for attempt in range(12):
        bound = min(5.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 5.0, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > 0.7 * bound  # spread over the whole window, not a fixed value


def test_resolve_api_key(monkeypatch):
    local = EndpointConfig(name="l", base_url="http://127.0.0.1:1/v1", model="m", price="p")
    assert resolve_api_key(local) == "sk-local"
    remote = EndpointConfig(name="r", base_url="https://api.example.com/v1", model="m", price="p",
                            api_key_env="COGUMI_TEST_KEY")
    monkeypatch.delenv("COGUMI_TEST_KEY", raising=False)
    with pytest.raises(LLMCallFailed, match="COGUMI_TEST_KEY"):
        resolve_api_key(remote)
    monkeypatch.setenv("COGUMI_TEST_KEY", "sk-secret")
    assert resolve_api_key(remote) == "sk-secret"


# ---------------------------------------------------------------- retries
def test_faults_are_retried_and_counted(stub):
    stub.script["faulty"] = ["429", "500", "garbage", "nochoices", "hang"]
    client = make(stub, timeout=0.5, retries=6)
    started = time.monotonic()
    res = run(client, client.chat(req("faulty")))
    assert res.text == "answer to faulty" and res.attempts == 6 and not res.cached
    assert time.monotonic() - started >= 0.4 + 0.5  # Retry-After honoured, then the hang timed out
    s = client.stats
    assert (s["429"], s["5xx"], s["unparseable"], s["timeout"]) == (1, 1, 2, 1)
    assert (s["calls"], s["retries"], s["failed"]) == (6, 5, 0)
    assert len(client.ledger.rows) == 1 and client.ledger.rows[0]["prompt_tokens"] == 10


def test_gives_up_after_max_retries(stub):
    stub.script["down"] = ["500"] * 10
    client = make(stub, retries=2)
    with pytest.raises(LLMCallFailed, match="gave up after 3 attempts; last 5xx"):
        run(client, client.chat(req("down")))
    assert stub.calls["down"] == 3 and client.stats["failed"] == 1 and client.ledger.rows == []


def test_client_errors_are_not_retried(stub):
    stub.script["bad"] = ["400"]
    client = make(stub)
    with pytest.raises(LLMCallFailed, match=r"endpoint stub .*HTTP 400"):
        run(client, client.chat(req("bad")))
    assert stub.calls["bad"] == 1


def test_validation_failure_is_retried_paid_and_not_cached(stub):
    stub.script["judge"] = ["text:not json", 'text:{"score": 4}']
    client = make(stub, cache=True)

    def validate(text: str) -> dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None

    res = run(client, client.chat(req("judge"), validate=validate))
    assert res.parsed == {"score": 4} and res.attempts == 2 and client.stats["unparseable"] == 1
    first, retry = stub.bodies["judge"]
    assert (first["temperature"], "seed" in first) == (0.0, False)
    assert retry["temperature"] == 0.7 and retry["seed"] == 1  # resampled, or temperature 0 repeats itself
    assert [r["cached"] for r in client.ledger.rows] == [False, False]  # both calls were paid for
    assert client.cache.get(req("judge").key("m"))["text"] == '{"score": 4}'


# ---------------------------------------------------------------- cache and budget
def test_cache_hit_makes_no_call_and_costs_nothing(stub):
    client = make(stub, cache=True)
    first = run(client, client.chat(req("cache me")))
    before = stub.total
    again = LLMClient(client.endpoint, client.llm, client.ledger, step="test", cache=client.cache)
    second = run(again, again.chat(req("cache me")))
    assert stub.total == before
    assert second.cached and second.attempts == 0 and second.text == first.text
    assert again.stats["cache_hits"] == 1 and again.stats["calls"] == 0
    paid, cached = client.ledger.rows
    assert paid["usd"] > 0 and not paid["cached"] and cached["usd"] == 0 and cached["cached"]
    assert cached["request_hash"] == paid["request_hash"] == first.request_hash


def test_budget_stops_new_calls_and_keeps_results(stub):
    # each call costs $0.02; after the second the run total ($0.04) reaches the $0.03 budget
    client = make(stub, budget=0.03, concurrency=1, cache=True)
    reqs = [req(f"budget {i}") for i in range(6)]
    seen: list[int] = []
    results = run(client, client.chat_many(reqs, on_result=lambda i, r: seen.append(i)))
    done = [r for r in results if isinstance(r, ChatResult)]
    stopped = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(done) == 2 and len(stopped) == 4 and len(seen) == 2
    assert sum(stub.calls.get(f"budget {i}", 0) for i in range(6)) == 2
    assert "budget of $0.0300 reached" in str(stopped[0])
    assert len(client.cache.store.objects) == 2 and len(client.ledger.rows) == 2


def test_chat_many_isolates_failures(stub):
    stub.script["many 2"] = ["500"] * 10
    stub.script["many 4"] = ["429", "garbage"]
    client = make(stub, retries=2, concurrency=3)
    results = run(client, client.chat_many([req(f"many {i}") for i in range(6)]))
    assert isinstance(results[2], LLMCallFailed)
    assert [r.text for i, r in enumerate(results) if i != 2] == [f"answer to many {i}" for i in (0, 1, 3, 4, 5)]
    assert client.stats["failed"] == 1 and client.stats["429"] == 1 and client.stats["unparseable"] == 1
