"""The strong tier of the tiny config: an OpenAI-compatible chat server that solves the task families exactly.

It stands in for the GPT-5/GPT-4o-class teachers of the production config: where those would be paid API calls,
this server answers on loopback by parsing the prompt back into its task (:func:`instance_from_prompt`) and
returning the family's reference answer, so the tiny pipeline has a teacher that is always right on its world
while SmolLM2 through llama.cpp stays the cheap tier and the reference model. It also answers the distillation
and cascade request "write N new tasks like these" (format: :func:`tasks_request`; reply: :func:`parse_tasks_reply`)
with fresh instances of the examples' family. Anything else is refused with an OpenAI-style 4xx body
``{"error": {"message", "type", "code"}}``; it does not pretend to be a general model.

Usage counts tokens as words and punctuation marks (``\\w+|[^\\w\\s]``) plus 3 per message, an approximation
of a BPE count that is deterministic and good enough for prices in the ledger. ``max_tokens`` is honoured: a
longer answer is cut and reported with ``finish_reason: "length"``, as a real endpoint would.

Run: ``python -m cogumi_tasks.world.strong_tier --host 127.0.0.1 --port 8300``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
import uuid
from typing import Any

from cogumi_tasks.world import FAMILIES, Instance, family, instance_from_prompt, keys_of

MODEL = "strong-tier"
MAX_NEW_TASKS = 50
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WRITE = re.compile(r"^Write (\d+) new tasks? like (?:these|this)(?: \(family: (\w+)\))?\.", re.I)
_EXAMPLE = re.compile(r"<task>\n(.*?)\n</task>", re.S)


class Refusal(Exception):
    """A request the strong tier answers with a 4xx error body."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def truncate(text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut after its ``max_tokens``-th token, and whether it was cut."""
    for i, m in enumerate(_TOKEN.finditer(text)):
        if i == max_tokens:
            return text[: m.start()].rstrip(), True
    return text, False


# ---------------------------------------------------------------------------------------------- request formats


def tasks_request(family_name: str, examples: list[str], n: int) -> str:
    """The user message that asks for ``n`` new tasks like ``examples`` (prompts of family ``family_name``).

    The reply is one JSON object; give the request about 250 tokens of ``max_tokens`` per task (by this server's
    count a task with its answer takes at most about 100 for code and reasoning, 210 for a tool call), or it is
    cut and does not parse."""
    blocks = "\n".join(f"<task>\n{e}\n</task>" for e in examples)
    return (f"Write {n} new tasks like these (family: {family_name}). Reply with a JSON object "
            f'{{"tasks": [{{"prompt": "...", "answer": "..."}}]}}.\n{blocks}')


def parse_tasks_reply(text: str) -> list[dict]:
    """The ``[{"prompt", "answer"}]`` list of a reply to :func:`tasks_request`; ValueError if malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tasks reply is not JSON: {exc.msg}") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or not all(
            isinstance(t, dict) and isinstance(t.get("prompt"), str) and isinstance(t.get("answer"), str)
            for t in tasks):
        raise ValueError('tasks reply is not {"tasks": [{"prompt": str, "answer": str}, ...]}')
    return tasks


# ---------------------------------------------------------------------------------------------- answering


def _new_tasks(header: re.Match, text: str, seed: Any) -> str:
    n, named = int(header[1]), header[2]
    if not 1 <= n <= MAX_NEW_TASKS:
        raise Refusal(400, f"can write 1 to {MAX_NEW_TASKS} new tasks per request, not {n}", "too_many_tasks")
    if named is not None and named not in FAMILIES:
        raise Refusal(400, f"unknown task family {named!r} (known: {', '.join(sorted(FAMILIES))})",
                      "unknown_family")
    examples: list[Instance] = []
    for i, ex in enumerate(_EXAMPLE.findall(text), 1):
        inst = instance_from_prompt(ex, named)
        if inst is None:
            raise Refusal(400, f"example {i} is not a prompt of {'family ' + named if named else 'any family'}",
                          "unparseable_example")
        examples.append(inst)
    if not examples:
        raise Refusal(400, "no <task>...</task> examples in the request", "missing_examples")
    names = {e.family for e in examples}
    if len(names) > 1:
        raise Refusal(400, f"examples mix families {sorted(names)}", "mixed_families")
    digest = hashlib.sha256(json.dumps([text, seed]).encode()).hexdigest()
    fresh = family(names.pop()).generate(n, seed=int(digest[:12], 16), exclude=keys_of(examples))
    return json.dumps({"tasks": [{"prompt": t.prompt, "answer": t.reference} for t in fresh]})


def answer(body: dict) -> str:
    """The answer text for a chat completion body; :class:`Refusal` when the request is not one it serves."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refusal(400, "'messages' must be a non-empty list", "missing_messages")
    if body.get("n", 1) != 1:
        raise Refusal(400, "only n=1 is supported", "unsupported_n")
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1] if users else None
    if isinstance(text, list):  # content parts: keep the text ones
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(text, str) or not text.strip():
        raise Refusal(400, "no user message with text content", "missing_messages")
    if header := _WRITE.match(text.strip()):
        return _new_tasks(header, text.strip(), body.get("seed"))
    inst = instance_from_prompt(text)
    if inst is None:
        raise Refusal(400, "the strong tier answers only task-family prompts "
                      f"({', '.join(f'{f.domain}: {f.name}' for f in FAMILIES.values())}) and 'Write N new tasks "
                      "like these' requests; this prompt is neither", "unparseable_prompt")
    return inst.reference


def completion(body: dict, stats: dict[str, int]) -> dict:
    """A ``chat.completion`` object for ``body`` (raises :class:`Refusal`)."""
    text = answer(body)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    cut = False
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise Refusal(400, f"max_tokens must be a positive integer, not {max_tokens!r}", "invalid_max_tokens")
        text, cut = truncate(text, max_tokens)
    prompt_tokens = sum(count_tokens(json.dumps(m.get("content", ""))) + 3 for m in body["messages"]) + 3
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(text),
             "total_tokens": prompt_tokens + count_tokens(text)}
    stats["answered"] += 1
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or MODEL,
            "choices": [{"index": 0, "finish_reason": "length" if cut else "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text}}],
            "usage": usage}


def _sse(resp: dict, include_usage: bool):
    base = {k: resp[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = resp["choices"][0]
    deltas = [{"role": "assistant", "content": ""}, {"content": choice["message"]["content"]}]
    for d in deltas:
        yield f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': d, 'finish_reason': None}]})}\n\n"
    yield f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': {}, 'finish_reason': choice['finish_reason']}]})}\n\n"  # noqa: E501
    if include_usage:
        yield f"data: {json.dumps(base | {'choices': [], 'usage': resp['usage']})}\n\n"
    yield "data: [DONE]\n\n"


def create_app():
    """The ASGI app (Starlette routes: handlers take the request, no annotations to resolve)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    stats = {"requests": 0, "answered": 0, "refused": 0}

    def refuse(exc: Refusal) -> JSONResponse:
        stats["refused"] += 1
        return JSONResponse(exc.body(), exc.status)

    async def chat(request):
        stats["requests"] += 1
        try:
            body = await request.json()
        except ValueError:
            return refuse(Refusal(400, "request body is not JSON", "invalid_json"))
        if not isinstance(body, dict):
            return refuse(Refusal(400, "request body must be a JSON object", "invalid_json"))
        try:
            resp = completion(body, stats)
        except Refusal as exc:
            return refuse(exc)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(resp, include), media_type="text/event-stream")
        return JSONResponse(resp)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "cogumi"}]})

    async def get_stats(request):
        return JSONResponse(stats)

    async def other(request):
        return refuse(Refusal(404, f"no route {request.url.path} (serves POST /v1/chat/completions)", "not_found"))

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/_stats", get_stats, methods=["GET"]),
        Route("/{path:path}", other, methods=["GET", "POST", "PUT", "DELETE"]),
    ])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
