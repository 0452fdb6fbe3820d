"""A fault-injecting reverse proxy for OpenAI-compatible servers, on loopback only.

With probability ``fault_rate`` a request to ``/v1/chat/completions`` gets, instead of the
upstream's answer, one of: 429 (Retry-After: 0), 500, a hang longer than the client's timeout, or a
200 with a garbage body. Everything else is forwarded. The draw depends only on the seed, the
request body and how many times that body was seen before, so which calls fail is the same whatever
order concurrent calls arrive in. A ``plan`` (fault kinds) fails the first calls to arrive with those
faults, in that order, before any draw: the totals are then exact whatever the timing. At 0% and no
plan it is a request counter. ``POST /_faults`` with ``{"only": "500", "after": n}`` (any fault kind) lets the next
``n`` chat requests through (default 0), then answers every one with that fault until ``{"only": null}``: a teacher
that goes down, then comes back. ``wrong_answers`` plants wrong
answers: the first that many forwarded answers (non-streamed) whose content ends in a line ``Answer: <integer>`` get
that integer plus one, and ``wrong`` in the stats lists each one's last user message and the answer it got.
``GET /_stats`` returns the counts (and, under ``bearers``, how many requests carried each Bearer token, by the
token's sha256: never the token; under ``statuses``, per chat request body (its canonical sha256) what each sending
of it got, in order: the upstream's HTTP status, or the injected fault's kind), ``POST /_reset`` zeroes them.

    python -m tests.servers.fault_proxy --upstream http://127.0.0.1:8080 --port 9000 --fault-rate 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
from pathlib import Path

FAULTS = ("429", "500", "hang", "garbage")
_ANSWER = re.compile(r"^(Answer: )(-?\d+)\s*\Z", re.M)


def _canonical(body: bytes) -> bytes:
    """A JSON body with sorted keys and no spacing, so a client's byte layout does not move the draws."""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return body


def plant_wrong_answer(body: bytes) -> tuple[bytes, str] | None:
    """A chat completion whose answer ends in ``Answer: <n>`` rewritten to ``n + 1``: (new body, new answer), or
    None when the answer has no such line."""
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    m = _ANSWER.search(content or "")
    if not m:
        return None
    wrong = content[: m.start()] + m.group(1) + str(int(m.group(2)) + 1)
    data["choices"][0]["message"]["content"] = wrong
    return json.dumps(data).encode(), wrong


def _last_user(request_body: bytes) -> str:
    try:
        return next(m["content"] for m in reversed(json.loads(request_body)["messages"]) if m["role"] == "user")
    except (ValueError, KeyError, StopIteration, TypeError):
        return ""


def build_app(upstream: str, fault_rate: float, seed: int, hang_s: float, plan: tuple[str, ...] = (),
              wrong_answers: int = 0):
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    unknown = set(plan) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault kinds in the plan: {sorted(unknown)}; known: {FAULTS}")
    seen: dict[str, int] = {}
    stats: dict = {"requests": 0, "forwarded": 0, "in_flight": 0, "faults": {k: 0 for k in FAULTS}, "bearers": {},
                   "wrong": [], "statuses": {}}
    mode: dict = {"only": None, "after": 0}
    client = httpx.AsyncClient(base_url=upstream, timeout=600)

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats)

    async def reset(request: Request) -> Response:
        seen.clear()
        stats.update({"requests": 0, "forwarded": 0, "in_flight": 0, "faults": {k: 0 for k in FAULTS}, "bearers": {},
                      "wrong": [], "statuses": {}})
        return JSONResponse(stats)

    async def set_faults(request: Request) -> Response:
        body = await request.json()
        only = body.get("only")
        if only is not None and only not in FAULTS:
            return JSONResponse({"error": {"message": f"unknown fault kind {only!r}; known: {FAULTS}"}}, 400)
        mode.update(only=only, after=int(body.get("after") or 0))
        return JSONResponse(mode)

    async def proxy(request: Request) -> Response:
        path = request.url.path
        body = await request.body()
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            digest = hashlib.sha256(token.encode()).hexdigest()
            stats["bearers"][digest] = stats["bearers"].get(digest, 0) + 1
        chat = path.endswith("/chat/completions")
        if chat:
            stats["requests"] += 1
            digest = hashlib.sha256(_canonical(body)).hexdigest()
            seen[digest] = attempt = seen.get(digest, 0) + 1
            sent = stats["statuses"].setdefault(digest, [])
            rng = random.Random(f"{seed}:{digest}:{attempt}")
            if mode["only"] and mode["after"] > 0:
                mode["after"] -= 1
                kind = None
            else:
                kind = mode["only"] or (plan[stats["requests"] - 1] if stats["requests"] <= len(plan)
                                        else rng.choice(FAULTS) if rng.random() < fault_rate else None)
            if kind:
                stats["faults"][kind] += 1
                sent.append(kind)
                if kind == "429":
                    return JSONResponse({"error": {"message": "rate limited"}}, 429, headers={"Retry-After": "0"})
                if kind == "500":
                    return JSONResponse({"error": {"message": "injected"}}, 500)
                if kind == "hang":
                    await asyncio.sleep(hang_s)
                    return JSONResponse({"error": {"message": "too late"}}, 504)
                return Response(b"<html>definitely not json", 200, media_type="application/json")
            stats["forwarded"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        stats["in_flight"] += 1  # an upstream call runs to its end even when the caller is gone
        try:
            upstream_resp = await client.request(request.method, path, content=body, headers=headers,
                                                 params=request.query_params)
        finally:
            stats["in_flight"] -= 1
        if chat:
            sent.append(upstream_resp.status_code)
        drop = ("content-length", "transfer-encoding", "content-encoding", "connection")
        content = upstream_resp.content
        if path.endswith("/chat/completions") and upstream_resp.status_code == 200 and \
                len(stats["wrong"]) < wrong_answers and (planted := plant_wrong_answer(content)):
            content = planted[0]
            stats["wrong"].append({"prompt": _last_user(body), "answer": planted[1]})
        return Response(content, upstream_resp.status_code,
                        headers={k: v for k, v in upstream_resp.headers.items() if k.lower() not in drop})

    return Starlette(routes=[
        Route("/_stats", get_stats, methods=["GET"]),
        Route("/_reset", reset, methods=["POST"]),
        Route("/_faults", set_faults, methods=["POST"]),
        Route("/{path:path}", proxy, methods=["GET", "POST", "PUT", "DELETE"]),
    ])


def start_fault_proxy(upstream: str, port: int, fault_rate: float, seed: int, hang_s: float, log_path: Path,
                      plan: tuple[str, ...] = (), wrong_answers: int = 0):
    """Start the proxy as a detached process on 127.0.0.1:port and wait until it answers."""
    from tests.servers.procs import start_test_server

    args = ["--upstream", upstream, "--fault-rate", str(fault_rate), "--seed", str(seed), "--hang-s", str(hang_s)]
    args += ["--plan", ",".join(plan)] if plan else []
    args += ["--wrong-answers", str(wrong_answers)] if wrong_answers else []
    return start_test_server("tests.servers.fault_proxy", port, args, Path(log_path))


def proxy_stats(base: str) -> dict:
    from tests.servers.procs import server_stats

    return server_stats(base)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fault-rate", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-s", type=float, default=30.0)
    p.add_argument("--plan", default="", help="comma-separated fault kinds for the first calls, e.g. 429,hang")
    p.add_argument("--wrong-answers", type=int, default=0, help="plant this many wrong 'Answer: <n>' answers")
    a = p.parse_args()
    plan = tuple(k for k in a.plan.split(",") if k)
    uvicorn.run(build_app(a.upstream, a.fault_rate, a.seed, a.hang_s, plan, a.wrong_answers), host="127.0.0.1",
                port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
