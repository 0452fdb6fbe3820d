"""The gateway: an OpenAI-compatible FastAPI app in front of the engine, routing each request (:mod:`.decide`).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (SSE streaming or not), ``POST /v1/feedback``,
``GET /v1/sessions/{id}`` (API key needed), ``GET /healthz`` and ``GET /metrics`` (open: loopback scraping).
Every refusal is a top-level OpenAI-style body ``{"error": {"message", "type", "code", "param"}}``; a refused
request never stops the gateway. The route, confidence, release and request id go in ``X-Cogumi-*`` headers and
in a ``cogumi`` object (non-streaming: top level; streaming: a last chunk with ``choices: []`` before ``[DONE]``).

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``Request``, imported
inside :func:`create_app`) from the live signatures.
"""

import asyncio
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cogumi_tasks.serve.decide import Brain, Decision, raw_confidence
from cogumi_tasks.serve.engine import Completion, Delta, EngineError
from cogumi_tasks.serve.querylog import now_iso

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cogumi_tasks.core.config import MemoryConfig, ServeConfig
    from cogumi_tasks.serve.access import ApiKeys
    from cogumi_tasks.serve.engine import Engine
    from cogumi_tasks.serve.querylog import QueryLog
    from cogumi_tasks.serve.release import Release

PREFIX = "cogumi-"
AUTO = "cogumi-auto"
REMEMBERED = 10000  # request ids kept for feedback


class Refused(Exception):
    """A request refused with an OpenAI-style error."""

    def __init__(self, status: int, kind: str, message: str, code: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.code, self.type = status, kind, message, code, type_
        self.headers = headers or {}


def error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


@dataclass
class Turn:
    """One request's state from decision to log line."""

    request_id: str
    model: str
    session: str | None
    query: str
    key_id: str
    decision: Decision
    t0: float
    ttft: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    cost: float = 0.0
    release: str = ""  # the release that decided (a swap mid-request does not change it)
    engine_decode_s: float | None = None  # a whole answer's generation time as its engine timed it

    @property
    def decode_s(self) -> float | None:
        """The answer's decode time: its engine's timing when it came whole, else the seconds from the first streamed
        token to the last (tokens - 1 intervals either way)."""
        if self.engine_decode_s is not None:
            return self.engine_decode_s
        return None if self.t_first is None or self.t_last is None else self.t_last - self.t_first

    def meta(self, release: str) -> dict:
        d = self.decision
        return {"route": d.route, "reason": d.reason, "confidence": d.confidence, "release": release,
                "request_id": self.request_id, "escalated": d.reason == "escalation",
                "ttft_s": None if self.ttft is None else round(self.ttft, 4),
                "decode_s": None if self.decode_s is None else round(self.decode_s, 4)}


def _query_of(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
    return ""


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "bad_request", "'messages' must be a non-empty list", "invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), (str, list)):
            raise Refused(400, "bad_request", f"messages[{i}]: needs a role (system, user, assistant) and a content",
                          "invalid_messages")
    if not _query_of(messages):
        raise Refused(400, "bad_request", "messages: no user message", "invalid_messages")
    return messages


class Gateway:
    """The app's state: release, engine, brain, session memory, keys, limits, metrics and query log."""

    def __init__(self, release: "Release", config: "ServeConfig", engine: "Engine", keys: "ApiKeys", memory: Any,
                 memory_config: "MemoryConfig", querylog: "QueryLog", embedder: Any = None,
                 threshold: float | None = None) -> None:
        from cogumi_tasks.serve.access import RateLimiter
        from cogumi_tasks.serve.metrics import Metrics

        self.release, self.config, self.engine, self.keys = release, config, engine, keys
        self.memory, self.memory_config, self.querylog = memory, memory_config, querylog
        self.threshold = threshold
        self.brain = Brain(release, embedder, threshold)
        self.metrics = Metrics(release.id)
        self.rate = RateLimiter(config.rate_per_minute, config.rate_burst)
        self.models = [AUTO, *(PREFIX + m for m in release.models)]
        self.recent: OrderedDict[str, tuple[str | None, int | None, str]] = OrderedDict()

    def swap(self, new: "Release") -> bool:
        """Answer with ``new`` from the next request when it loads the same model files as the running release (a
        calibration release: calibrator, threshold, router or detector changed); False, nothing changed, otherwise
        (new models need the engine restarted)."""
        if new.model_files != self.release.model_files:
            return False
        self.brain = Brain(new, self.brain._embedder, self.threshold)
        self.release = new
        self.metrics.set_release(new.id)
        return True

    # ------------------------------------------------------------ checks
    def authorize(self, authorization: str | None) -> str:
        h = self.keys.check(authorization)
        if h is None:
            what = "no API key given" if not authorization else "the API key is not valid"
            raise Refused(401, "auth", f"Incorrect API key: {what}; send Authorization: Bearer <key>",
                          "invalid_api_key")
        wait = self.rate.take(h)
        if wait > 0:
            raise Refused(429, "rate", f"rate limit: {self.config.rate_per_minute:g} requests/minute per key "
                          f"(burst {self.config.rate_burst}); retry in {wait:.1f} s", "rate_limit_exceeded",
                          "rate_limit_error", {"Retry-After": str(max(1, round(wait)))})
        return h

    def parse(self, raw: bytes) -> dict:
        if len(raw) > self.config.max_body_bytes:
            raise Refused(413, "limit", f"request body of {len(raw)} bytes exceeds the limit of "
                          f"{self.config.max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, "bad_request", f"request body is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(body, dict):
            raise Refused(400, "bad_request", "request body must be a JSON object", "invalid_json")
        return body

    def scales(self, route: str) -> dict[str, float]:
        m = self.release.manifest["models"][route]
        return {route: float(m["scale"])} if m.get("adapter") else {}

    def cost(self, route: str, tokens: int) -> float:
        return tokens / 1000 * self.config.usd_per_1k_tokens * float(self.release.costs.get(route, 1.0))

    # ------------------------------------------------------------ the request
    async def decide(self, model: str, query: str, session: str | None, messages: list[dict], max_tokens: int,
                     temperature: float, seed: int | None) -> tuple[Decision, Completion | None, float]:
        """(the decision, the base's answer when it is to be reused, the base pass's cost)."""
        if model != AUTO:
            return Decision(model.removeprefix(PREFIX), "override"), None, 0.0
        turns = list(reversed(self.memory.last(session, self.brain.router.window))) if session else []
        if turns and await asyncio.to_thread(self.brain.escalates, query):
            d = await asyncio.to_thread(self.brain.escalation, query, turns)
            self.memory.set_outcome(session, turns[-1].seq, "escalated")
            self.metrics.escalations.labels(from_route=d.escalated_from, to_route=d.route).inc()
            return d, None, 0.0
        if turns and turns[-1].outcome == "pending":
            self.memory.set_outcome(session, turns[-1].seq, "ok")  # a follow-up without dissatisfaction
        base = await self.engine.chat(messages, {}, max_tokens, stream=False, temperature=temperature, seed=seed)
        assert isinstance(base, Completion)
        d = await asyncio.to_thread(self.brain.after_base, query, raw_confidence(base.logprobs), turns)
        if d.route != "base":
            d.base_answer = base.text  # logged: re-calibration labels the base's answer to its confidence
        return d, (base if d.route == "base" else None), self.cost("base", base.completion_tokens)

    async def deltas(self, turn: Turn, ready: Completion | None, messages: list[dict], max_tokens: int,
                     stream: bool, temperature: float, seed: int | None) -> AsyncIterator[Delta]:
        if ready is not None:
            yield Delta(ready.text, ready.logprobs, ready.finish_reason, ready.decode_s)
            return
        out = await self.engine.chat(messages, self.scales(turn.decision.route), max_tokens, stream=stream,
                                     temperature=temperature, seed=seed)
        if isinstance(out, Completion):
            yield Delta(out.text, out.logprobs, out.finish_reason, out.decode_s)
        else:
            async for d in out:
                yield d

    def seen(self, turn: Turn, delta: Delta) -> None:
        now = time.perf_counter()
        if delta.text and turn.ttft is None:
            turn.ttft, turn.t_first = now - turn.t0, now
        turn.t_last = now
        if delta.decode_s is not None:
            turn.engine_decode_s = delta.decode_s
        turn.tokens += len(delta.logprobs) or (1 if delta.text else 0)
        turn.text.append(delta.text)

    def finish(self, turn: Turn, status: int = 200) -> None:
        """Metrics, session memory, the feedback index and the query log line of an answered request."""
        d = turn.decision
        seconds = time.perf_counter() - turn.t0
        turn.cost += self.cost(d.route, turn.tokens)
        self.metrics.answered(turn.model, d.route, status, seconds=seconds, ttft=turn.ttft, tokens=turn.tokens,
                              decode_s=turn.decode_s, cost_usd=turn.cost)
        self.metrics.routes.labels(route=d.route, reason=d.reason).inc()
        seq = None
        if turn.session:
            seq = self.memory.add(turn.session, turn.query, d.route, d.confidence or 0.0)
        self.recent[turn.request_id] = (turn.session, seq, d.route)
        while len(self.recent) > REMEMBERED:
            self.recent.popitem(last=False)
        self.querylog.add({
            "ts": now_iso(), "request_id": turn.request_id, "session": turn.session, "model": turn.model,
            "route": d.route, "reason": d.reason, "confidence": d.confidence, "raw_confidence": d.raw_confidence,
            "release": turn.release, "query": turn.query[: self.memory_config.max_query_chars],
            "answer": "".join(turn.text), "base_answer": d.base_answer, "escalated": d.reason == "escalation",
            "feedback": None,
            "latency_s": round(seconds, 4), "ttft_s": None if turn.ttft is None else round(turn.ttft, 4),
            "decode_s": None if turn.decode_s is None else round(turn.decode_s, 4),
            "completion_tokens": turn.tokens, "key_id": turn.key_id[:12]})

    def headers(self, turn: Turn) -> dict[str, str]:
        d = turn.decision
        return {"X-Cogumi-Route": d.route, "X-Cogumi-Release": turn.release,
                "X-Cogumi-Confidence": "" if d.confidence is None else f"{d.confidence:.4f}",
                "X-Cogumi-Request-Id": turn.request_id, "X-Cogumi-Escalated": str(d.reason == "escalation").lower()}


def create_app(release: "Release", config: "ServeConfig", engine: "Engine", *, store: Any = None,
               log_prefix: str | None = None, keys: list[str] | None = None, memory_path: str | None = None,
               memory_config: "MemoryConfig | None" = None, embedder: Any = None,
               threshold: float | None = None, registry: str | None = None) -> "FastAPI":
    """The gateway app over a started ``engine``. ``keys``: accepted API keys (default: env and
    ``config.api_keys_file``); ``store`` and ``log_prefix`` (``s3://<bucket>/<config name>/query-logs``): where the
    query log goes (none: not written); ``threshold``: overrides the release's; ``registry``
    (``s3://<bucket>/<config name>/releases``, with ``store``): follow its ``current`` pointer every
    ``config.reload_s`` seconds (:mod:`cogumi_tasks.serve.watch`).

    Sets this process's torch to one thread: the router, detector and MiniLM are small, and the engine's llama.cpp
    threads need the cores (serve.validate on 2 cores decoded 37.6 tokens/s with torch's default threads beside
    them, 73.3 with one; docs/phase5.md)."""
    from pathlib import Path

    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from cogumi_tasks.core.config import MemoryConfig
    from cogumi_tasks.routing.memory import InvalidSessionId, SessionMemory, check_session_id
    from cogumi_tasks.serve.access import ApiKeys, read_keys
    from cogumi_tasks.serve.querylog import QueryLog

    torch.set_num_threads(1)
    mcfg = memory_config or MemoryConfig()
    mem_path = Path(memory_path or Path(config.state_dir).expanduser() / "memory.sqlite")
    memory = SessionMemory(mem_path, mcfg)
    qlog = QueryLog(store, log_prefix or "", config.query_log_flush_s, config.query_log_batch)
    gw = Gateway(release, config, engine, ApiKeys(keys if keys is not None else read_keys(config.api_keys_file)),
                 memory, mcfg, qlog, embedder, threshold)
    watcher = None
    if registry and store is not None and config.reload_s > 0:
        from cogumi_tasks.serve.watch import ReleaseWatcher

        watcher = ReleaseWatcher(gw, store, registry, Path(config.state_dir).expanduser() / "releases",
                                 config.reload_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            watcher.stop()
        qlog.close()
        memory.close()

    app = FastAPI(title="cogumi gateway", version=release.id, lifespan=lifespan)
    app.state.gateway, app.state.watcher = gw, watcher

    def refused(exc: Refused, model: str = "") -> JSONResponse:
        gw.metrics.refused(model, exc.status, exc.kind)
        return JSONResponse(error_body(exc.message, exc.type, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return refused(Refused(500, "internal", f"internal error: {type(exc).__name__}", "internal_error",
                               "server_error"))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "release": gw.release.id, "models": gw.models}

    @app.get("/metrics")
    async def metrics() -> Response:
        data, ctype = gw.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            gw.authorize(request.headers.get("authorization"))
        except Refused as exc:
            return refused(exc)
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                         "owned_by": "cogumi"} for m in gw.models]})

    @app.get("/v1/sessions/{session_id}")
    async def session(session_id: str, request: Request) -> Response:
        try:
            gw.authorize(request.headers.get("authorization"))
            turns = gw.memory.last(session_id)
        except Refused as exc:
            return refused(exc)
        except InvalidSessionId as exc:
            return refused(Refused(400, "bad_request", str(exc), "invalid_session"))
        return JSONResponse({"session": session_id, "turns": [
            {"seq": t.seq, "ts": t.ts, "query": t.query, "route": t.route, "confidence": t.confidence,
             "outcome": t.outcome} for t in turns]})

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        try:
            gw.authorize(request.headers.get("authorization"))
            body = gw.parse(await request.body())
            rid, value = body.get("request_id"), body.get("value")
            if value not in ("up", "down"):
                raise Refused(400, "bad_request", f"'value' must be 'up' or 'down', got {value!r}", "invalid_value")
            if rid not in gw.recent:
                raise Refused(404, "bad_request", f"unknown request_id {rid!r} (never answered here, or too old)",
                              "unknown_request")
        except Refused as exc:
            return refused(exc)
        sess, seq, route = gw.recent[rid]
        if sess is not None and seq is not None:
            try:
                gw.memory.set_outcome(sess, seq, "thumbs_up" if value == "up" else "thumbs_down")
            except KeyError:
                pass  # purged since: the log line still records it
        gw.metrics.feedback.labels(route=route, value=value).inc()
        qlog.add({"ts": now_iso(), "request_id": rid, "feedback": value})
        return JSONResponse({"request_id": rid, "feedback": value})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        model = ""
        try:
            key_id = gw.authorize(request.headers.get("authorization"))
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > config.max_body_bytes:
                raise Refused(413, "limit", f"request body of {length} bytes exceeds the limit of "
                              f"{config.max_body_bytes} bytes", "request_too_large")
            body = gw.parse(await request.body())
            model = str(body.get("model") or "")
            if model not in gw.models:
                raise Refused(404, "bad_request", f"model {model!r} does not exist; models: {gw.models}",
                              "model_not_found")
            messages = _check_messages(body.get("messages"))
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or config.default_max_tokens
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise Refused(400, "bad_request", f"max_tokens must be a positive integer, got {max_tokens!r}",
                              "invalid_max_tokens")
            if max_tokens > config.max_tokens:
                raise Refused(400, "limit", f"max_tokens {max_tokens} exceeds this server's limit of "
                              f"{config.max_tokens}", "max_tokens_too_large")
            temperature = float(body.get("temperature") or 0.0)
            seed = body.get("seed")
            stream = bool(body.get("stream"))
            session = request.headers.get("x-cogumi-session") or body.get("user") or None
            if session is not None:
                check_session_id(session)
        except Refused as exc:
            return refused(exc, model)
        except InvalidSessionId as exc:
            return refused(Refused(400, "bad_request", str(exc), "invalid_session"), model)
        except (TypeError, ValueError) as exc:
            return refused(Refused(400, "bad_request", f"invalid request: {exc}", "invalid_request"), model)
        query = _query_of(messages)
        answering = gw.release.id  # the release whose brain decides this request
        try:
            decision, ready, base_cost = await gw.decide(model, query, session, messages, max_tokens, temperature,
                                                         seed)
        except EngineError as exc:
            return refused(Refused(502, "engine", str(exc), "engine_error", "server_error"), model)
        turn = Turn(uuid.uuid4().hex, model, session, query, key_id, decision, t0, cost=base_cost,
                    release=answering)
        gen = gw.deltas(turn, ready, messages, max_tokens, stream, temperature, seed)
        created = int(time.time())
        if not stream:
            finish = None
            try:
                async for d in gen:
                    gw.seen(turn, d)
                    finish = d.finish_reason or finish
            except EngineError as exc:
                return refused(Refused(502, "engine", str(exc), "engine_error", "server_error"), model)
            gw.finish(turn)
            return JSONResponse({
                "id": f"chatcmpl-{turn.request_id}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(turn.text)},
                             "finish_reason": finish or "stop"}],
                "usage": {"completion_tokens": turn.tokens, "prompt_tokens": 0, "total_tokens": turn.tokens},
                "cogumi": turn.meta(turn.release)}, headers=gw.headers(turn))

        def chunk(choices: list, **extra: Any) -> str:
            return "data: " + json.dumps({"id": f"chatcmpl-{turn.request_id}", "object": "chat.completion.chunk",
                                          "created": created, "model": model, "choices": choices, **extra}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            finish = None
            try:
                async for d in gen:
                    gw.seen(turn, d)
                    finish = d.finish_reason or finish
                    if d.text:
                        yield chunk([{"index": 0, "delta": {"content": d.text}, "finish_reason": None}])
            except EngineError as exc:
                gw.metrics.refused(model, 502, "engine", turn.decision.route)
                yield "data: " + json.dumps(error_body(str(exc), "server_error", "engine_error")) + "\n\n"
                return
            yield chunk([{"index": 0, "delta": {}, "finish_reason": finish or "stop"}])
            gw.finish(turn)
            yield chunk([], cogumi=turn.meta(turn.release))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=gw.headers(turn))

    return app
