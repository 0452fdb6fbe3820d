"""The gateway on loopback over the embedded llama.cpp engine with a real small release (tests/serve_release.py):
the openai client streaming, routing by the trained router, adapters that never mix under concurrency, auth and
limits refused OpenAI-style while serving goes on, escalation on a follow-up, /metrics and the S3 query log."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

KEY = "test-key-" + uuid.uuid4().hex
# a held-out instance of the tiny world's code family (the router learned the planted code queries' family)
CODE_PROMPT = ("Write a Python function `max_doubles_ltm1(xs)` that returns the largest of the doubles of the numbers "
               "less than -1 in xs, or 0 if there are none.")


@pytest.fixture(scope="module")
def world(serve_world):
    """The session's small release, engine and store (tests/conftest.py: built once for this module and the chat
    UI's)."""
    return serve_world


def _serve(world, name: str, **kw):
    """The app on a free port in a uvicorn thread; returns (base URL, gateway state, a function that stops it: the
    app's shutdown runs the query log's last flush, while S3 still runs)."""
    from cogumi_tasks.serve.gateway import create_app
    from cogumi_tasks.serve.threaded import ThreadedServer

    prefix = world["store"].uri(name, "query-logs")
    app = create_app(world["release"], world["config"], world["engine"], store=world["store"], log_prefix=prefix,
                     keys=[KEY], memory_path=str(world["tmp"] / f"{name}.sqlite"), embedder=world["embedder"], **kw)
    server = ThreadedServer(app, timeout_s=30).start()
    return server.url, app.state.gateway, server.stop


@pytest.fixture(scope="module")
def gateway(world):
    url, gw, stop = _serve(world, f"gw-{uuid.uuid4().hex[:6]}")
    yield url, gw
    stop()


def _post(url: str, body: dict | bytes, key: str | None = KEY, headers: dict | None = None):
    import httpx

    h = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=content, timeout=300,
                      headers={"Content-Type": "application/json", **h, **(headers or {})})


def _ask(model: str, prompt: str, max_tokens: int = 12, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def test_openai_client_streams_and_matches_the_whole_answer(gateway):
    from openai import OpenAI

    url, _ = gateway
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["cogumi-auto", "cogumi-base", "cogumi-code",
                                                    "cogumi-reasoning", "cogumi-automation"]
    msgs = [{"role": "user", "content": CODE_PROMPT}]
    pieces, meta = [], None
    for chunk in client.chat.completions.create(model="cogumi-code", messages=msgs, max_tokens=12, temperature=0,
                                                stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            meta = chunk.model_extra["cogumi"]
    assert len([p for p in pieces if p]) >= 2  # streamed in pieces
    assert meta["route"] == "code" and meta["reason"] == "override" and meta["release"] == "test-release"
    assert meta["ttft_s"] > 0 and meta["decode_s"] > 0  # two or more pieces: time between the first and the last
    raw = client.chat.completions.with_raw_response.create(model="cogumi-code", messages=msgs, max_tokens=12,
                                                           temperature=0)
    whole = raw.parse()
    assert whole.choices[0].message.content == "".join(pieces)
    assert raw.headers["X-Cogumi-Route"] == "code" and raw.headers["X-Cogumi-Release"] == "test-release"
    assert whole.model_extra["cogumi"]["request_id"] == raw.headers["X-Cogumi-Request-Id"]
    assert whole.model_extra["cogumi"]["decode_s"] > 0  # a whole answer: llama.cpp's own generation time


def test_auto_routes_code_to_code_and_general_to_base(gateway, world):
    from cogumi_tasks.routing.planted import general_prompts

    url, gw = gateway
    general = general_prompts()[0]
    for prompt, want in ((CODE_PROMPT, "code"), (general, "base")):
        r = _post(url, _ask("cogumi-auto", prompt))
        assert r.status_code == 200, r.text
        meta = r.json()["cogumi"]
        assert r.headers["X-Cogumi-Route"] == want, (prompt, meta)
        assert meta["reason"] == "router" and meta["confidence"] < gw.brain.threshold
        assert float(r.headers["X-Cogumi-Confidence"]) == pytest.approx(meta["confidence"], abs=1e-4)
    # the same release with a threshold every answer meets: the base's own answer stands
    url2, _, stop = _serve(world, f"confident-{uuid.uuid4().hex[:6]}", threshold=0.0)
    try:
        r = _post(url2, _ask("cogumi-auto", CODE_PROMPT))
        assert r.headers["X-Cogumi-Route"] == "base" and r.json()["cogumi"]["reason"] == "confident"
        assert r.json()["choices"][0]["message"]["content"] == _post(url, _ask("cogumi-base", CODE_PROMPT)).json()[
            "choices"][0]["message"]["content"]
    finally:
        stop()


MODELS = ["cogumi-base", "cogumi-code", "cogumi-reasoning", "cogumi-automation"]


def _alone_then_together(url: str, together_models: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each model's answer asked alone, then ``together_models`` asked all at once (one thread each)."""
    prompt = "List three colours."

    def text(model: str) -> str:
        r = _post(url, _ask(model, prompt, max_tokens=10))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = {m: text(m) for m in MODELS}
    assert len(set(alone.values())) >= 3, alone  # the adapters do change the answer
    with ThreadPoolExecutor(len(together_models)) as pool:
        return alone, list(pool.map(text, together_models))


def test_concurrent_requests_with_different_adapters_never_mix(gateway):
    """Two slots, every adapter in flight at once, twice: each answer equals the same request made alone. llama.cpp
    never puts requests with unequal adapters in one batch, so each is decoded as it is alone. (Requests with equal
    adapters can share a batch, where llama.cpp's kernels are not batch-invariant: such an answer may differ from
    the one made alone at a near-tie. That is numerics, not mixing; the next test serves with 1 slot.)"""
    url, _ = gateway
    for _ in range(2):
        alone, together = _alone_then_together(url, MODELS)
        assert together == [alone[m] for m in MODELS]


def test_one_slot_answers_as_alone_whatever_runs_beside_it(world):
    """The tiny config's engine (serve.parallel 1): eight requests at once, each adapter twice, all equal to the same
    requests made alone."""
    from cogumi_tasks.serve.engine import XllamacppEngine

    one_slot = world["config"].model_copy(update={"parallel": 1, "context": 1024, "threads": 1})
    engine = XllamacppEngine.for_release(world["release"], one_slot)
    engine.start()
    url, _, stop = _serve({**world, "engine": engine}, f"one-slot-{uuid.uuid4().hex[:6]}")
    try:
        alone, together = _alone_then_together(url, MODELS * 2)
        assert together == [alone[m] for m in MODELS * 2]
    finally:
        stop()
        engine.stop()


def test_an_answer_does_not_depend_on_the_requests_before_it(gateway):
    """Every (prompt, adapter) pair asked one at a time in one order, then in the reverse order: each answer is the
    same. With llama.cpp's prompt cache on, a request reuses the KV a slot kept from the previous request's prompt
    (another adapter's, or a prefix computed in another batch), and greedy answers changed with the order."""
    url, _ = gateway
    from bench.serving import PROMPTS

    models = ("cogumi-base", "cogumi-code", "cogumi-reasoning", "cogumi-automation")

    def text(pair: tuple[str, str]) -> str:
        r = _post(url, _ask(pair[1], pair[0], max_tokens=24))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    first = {(p, m): text((p, m)) for p in PROMPTS[:3] for m in models}  # prompt by prompt
    assert {(p, m): text((p, m)) for m in reversed(models) for p in PROMPTS[:3]} == first  # adapter by adapter


def test_auth_and_limits_are_refused_openai_style_and_serving_goes_on(gateway):
    url, gw = gateway
    before = gw.metrics.sample("cogumi_errors_total", {"kind": "auth"})
    for key in (None, "wrong-key"):
        r = _post(url, _ask("cogumi-base", "hi"), key=key)
        assert r.status_code == 401
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert gw.metrics.sample("cogumi_errors_total", {"kind": "auth"}) == before + 2
    big = _post(url, _ask("cogumi-base", "x" * 5000))
    assert big.status_code == 413 and "exceeds the limit of 4096 bytes" in big.json()["error"]["message"]
    many = _post(url, _ask("cogumi-base", "hi", max_tokens=10000))
    assert many.status_code == 400 and "max_tokens 10000 exceeds this server's limit of 64" in many.json()[
        "error"]["message"]
    bad = _post(url, b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    unknown = _post(url, _ask("cogumi-nope", "hi"))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    ok = _post(url, _ask("cogumi-base", "hi", max_tokens=4))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_dissatisfied_follow_up_escalates_and_is_recorded(gateway):
    import httpx

    from cogumi_tasks.routing.escalation_data import generate

    url, gw = gateway
    unhappy = max((e.text for e in generate(200, (0.5, 1 / 3, 1 / 6), seed=0) if e.label == 1),
                  key=gw.brain.detector.predict)
    assert gw.brain.escalates(unhappy)
    session = f"s-{uuid.uuid4().hex[:8]}"
    first = _post(url, _ask("cogumi-auto", CODE_PROMPT), headers={"X-Cogumi-Session": session})
    first_route = first.headers["X-Cogumi-Route"]
    def escalations() -> float:
        return sum(gw.metrics.sample("cogumi_escalations_total", {"from_route": first_route, "to_route": m}) or 0
                   for m in ("code", "reasoning", "automation"))

    before = escalations()
    second = _post(url, _ask("cogumi-auto", unhappy, user=session))
    meta = second.json()["cogumi"]
    assert meta["reason"] == "escalation" and meta["escalated"] and second.headers["X-Cogumi-Escalated"] == "true"
    assert meta["route"] != "base" and meta["route"] != first_route  # the stronger choice, never the same model
    turns = httpx.get(f"{url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {KEY}"}).json()["turns"]
    assert [t["outcome"] for t in turns] == ["pending", "escalated"]  # newest first
    assert [t["route"] for t in turns] == [meta["route"], first_route]
    assert escalations() == before + 1


def test_metrics_and_query_log_in_s3(gateway, world):
    import httpx

    url, gw = gateway
    labels = {"model": "cogumi-reasoning", "route": "reasoning", "status": "200"}
    before = gw.metrics.sample("cogumi_requests_total", labels) or 0
    r = _post(url, _ask("cogumi-reasoning", "What is 2 + 3?", max_tokens=6, stream=True))
    rid = r.headers["X-Cogumi-Request-Id"]
    assert r.text.rstrip().endswith("data: [DONE]")
    fb = httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "value": "up"},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert fb.status_code == 200
    text = httpx.get(f"{url}/metrics").text
    for series in ("cogumi_requests_total", "cogumi_request_seconds_bucket", "cogumi_ttft_seconds_bucket",
                   "cogumi_completion_tokens_total", "cogumi_decode_tokens_per_second_bucket", "cogumi_routes_total",
                   "cogumi_escalations_total", "cogumi_cost_usd_total", "cogumi_errors_total",
                   "cogumi_feedback_total", 'cogumi_release_info{release="test-release"} 1.0'):
        assert series in text, series
    assert gw.metrics.sample("cogumi_feedback_total", {"route": "reasoning", "value": "up"}) == 1
    assert gw.metrics.sample("cogumi_requests_total", labels) == before + 1
    written = gw.querylog.flush()
    assert written and all("/query-logs/dt=" in u and "/hour=" in u and u.endswith(".jsonl") for u in written)
    lines = [json.loads(x) for u in written for x in world["store"].get_bytes(u).decode().splitlines()]
    answer = next(x for x in lines if x.get("request_id") == rid and "route" in x)
    assert answer["route"] == "reasoning" and answer["reason"] == "override" and answer["completion_tokens"] >= 1
    assert answer["query"] == "What is 2 + 3?" and answer["key_id"] == gw.keys.hashes.copy().pop()[:12]
    assert {"request_id": rid, "feedback": "up"}.items() <= next(x for x in lines if "feedback" in x and
                                                                  x.get("route") is None).items()
    assert all(KEY not in json.dumps(x) for x in lines)
