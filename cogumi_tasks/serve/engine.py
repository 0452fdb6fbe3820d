"""The engine behind the gateway: one small interface, and llama.cpp's own server embedded through ``xllamacpp``.

:class:`Engine` is what the gateway calls: ``chat`` with the messages and a scale per adapter, answered whole
(:class:`Completion`) or as an async iterator of :class:`Delta` (``stream=True``), each with the log-probabilities
of the generated tokens. :class:`XllamacppEngine` loads the base GGUF with every LoRA of the release at scale 0
(recovery first) and sends a scale for every adapter on every request: the chosen one at its scale, the
recovery at 1, the rest 0 (an empty list would fall back to the global scales). It listens on 127.0.0.1 with a
generated API key. Production can implement :class:`Engine` on vLLM's multi-LoRA server instead.
"""

from __future__ import annotations

import json
import secrets
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EngineError(RuntimeError):
    """The engine refused or failed a request."""


@dataclass
class Completion:
    """A whole answer: text, the generated tokens' log-probabilities, token count and finish reason."""

    text: str
    logprobs: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    decode_s: float | None = None  # the engine's own generation time (llama.cpp's timings.predicted_ms), if given


@dataclass
class Delta:
    """A piece of a streamed answer (``finish_reason`` set on the last one); ``decode_s`` only when the piece is a
    whole answer whose engine timed its generation."""

    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    decode_s: float | None = None


class Engine:
    """A chat engine serving one base model with LoRA adapters chosen per request."""

    adapters: list[str]

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def chat(self, messages: Sequence[Mapping[str, Any]], adapter_scales: Mapping[str, float], max_tokens: int,
                   stream: bool = False, temperature: float = 0.0, seed: int | None = None,
                   ) -> Completion | AsyncIterator[Delta]:
        """Answer ``messages`` with each adapter at its scale (adapters not named: 0)."""
        raise NotImplementedError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logprobs(choice: Mapping[str, Any]) -> list[float]:
    content = (choice.get("logprobs") or {}).get("content") or []
    return [float(t["logprob"]) for t in content]


class XllamacppEngine(Engine):
    """llama.cpp's server in this process (``xllamacpp.Server``) on 127.0.0.1, reached over HTTP."""

    def __init__(self, base: Path, adapters: Mapping[str, Path], fixed: Mapping[str, float] | None = None,
                 parallel: int = 2, context: int = 2048, threads: int | None = None, port: int | None = None,
                 prompt_cache: bool = False):
        """``adapters``: name -> GGUF LoRA, in id order; ``fixed``: adapters always applied at this scale (the
        recovery LoRA at 1), whatever a request asks; ``prompt_cache``: reuse a slot's KV of a shared prompt prefix
        (off: an answer never depends on the requests before it, see ``ServeConfig.prompt_cache``)."""
        self.base, self.paths = Path(base), dict(adapters)
        self.adapters = list(self.paths)
        self.fixed = dict(fixed or {})
        self.parallel, self.context, self.threads, self.port = parallel, context, threads, port
        self.prompt_cache = prompt_cache
        self.key = secrets.token_urlsafe(24)
        self.url = ""
        self._server: Any = None
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_release(cls, release: Any, config: Any) -> XllamacppEngine:
        """The engine of a release under a ``ServeConfig``: the recovery LoRA (if any) fixed at 1, every modifier
        loaded at 0 until a request picks it."""
        adapters = ({"recovery": release.recovery} if release.recovery else {}) | release.modifiers
        return cls(release.base, adapters, fixed={"recovery": 1.0} if release.recovery else None,
                   parallel=config.parallel, context=config.context, threads=config.threads,
                   prompt_cache=config.prompt_cache)

    def start(self) -> None:
        import xllamacpp

        from cogumi_tasks.models.packaged import gguf_threads

        port = self.port or _free_port()
        p = xllamacpp.CommonParams()
        p.model.path = str(self.base)
        loras = []
        for path in self.paths.values():
            info = xllamacpp.CommonAdapterLoraInfo()
            info.path, info.scale = str(path), 0.0
            loras.append(info)
        p.lora_adapters = loras
        p.n_parallel, p.n_ctx = self.parallel, self.context * self.parallel
        threads = self.threads or gguf_threads()
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
        p.hostnames, p.port, p.api_keys = ["127.0.0.1"], port, [self.key]
        p.endpoint_metrics = True
        p.verbosity = -1
        self._server = xllamacpp.Server(p)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server = None  # deleting the server stops it and frees the port
        self.url = ""

    def scales(self, adapter_scales: Mapping[str, float]) -> list[dict]:
        """The per-request ``lora`` list: every adapter, in id order."""
        unknown = sorted(set(adapter_scales) - set(self.adapters))
        if unknown:
            raise EngineError(f"unknown adapters {unknown}; loaded: {self.adapters}")
        return [{"id": i, "scale": float(self.fixed.get(name, adapter_scales.get(name, 0.0)))}
                for i, name in enumerate(self.adapters)]

    def _body(self, messages: Sequence[Mapping[str, Any]], adapter_scales: Mapping[str, float], max_tokens: int,
              stream: bool, temperature: float, seed: int | None) -> dict:
        body = {"messages": list(messages), "max_tokens": max_tokens, "temperature": temperature, "stream": stream,
                "logprobs": True, "top_logprobs": 1, "lora": self.scales(adapter_scales),
                "cache_prompt": self.prompt_cache}
        if seed is not None:
            body["seed"] = seed
        return body

    def _http(self) -> Any:
        """The HTTP client of the running event loop (an async client is bound to the loop that made it; one
        engine may serve gateways on several loops: tests, a bench)."""
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpx.AsyncClient(
                base_url=self.url, timeout=httpx.Timeout(600.0, connect=10.0),
                headers={"Authorization": f"Bearer {self.key}"})
        return client

    async def chat(self, messages: Sequence[Mapping[str, Any]], adapter_scales: Mapping[str, float], max_tokens: int,
                   stream: bool = False, temperature: float = 0.0, seed: int | None = None,
                   ) -> Completion | AsyncIterator[Delta]:
        if not self.url:
            raise EngineError("engine not started")
        body = self._body(messages, adapter_scales, max_tokens, stream, temperature, seed)
        if stream:
            return self._stream(body)
        resp = await self._http().post("/v1/chat/completions", json=body)
        if resp.status_code != 200:
            raise EngineError(f"engine answered {resp.status_code}: {resp.text[:300]}")
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        lps = _logprobs(choice)
        predicted_ms = (data.get("timings") or {}).get("predicted_ms")
        return Completion(choice["message"].get("content") or "", lps, int(usage.get("completion_tokens", len(lps))),
                          int(usage.get("prompt_tokens", 0)), choice.get("finish_reason"),
                          None if predicted_ms is None else float(predicted_ms) / 1000)

    async def _stream(self, body: dict) -> AsyncIterator[Delta]:
        async with self._http().stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise EngineError(f"engine answered {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    raise EngineError(f"engine stream error: {data['error']}")
                for choice in data.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text or choice.get("finish_reason"):
                        yield Delta(text, _logprobs(choice), choice.get("finish_reason"))

    async def aclose(self) -> None:
        """Close the running loop's HTTP client."""
        import asyncio

        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
