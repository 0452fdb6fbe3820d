"""Benchmark: what the gateway costs over the bare engine it fronts and over bare llama-cpp-python, on the same
release, prompts and adapter; and a bounded load test through it on loopback. Prints one JSON object.

    python bench/gateway.py --release DIR [--model base] [--prompts 4] [--max-tokens 32] [--repeats 5]
                            [--threads 1] [--parallel 2] [--load 1,4,8] [--load-requests 16] [--out FILE]

Speed. The release's engine (``XllamacppEngine.for_release``: ``--parallel`` slots of 2048 tokens, ``--threads``)
with the gateway (``create_app``, uvicorn on loopback) in front of it, and the release's base GGUF loaded in this
process with ``llama_cpp.Llama`` (the same threads, 2048 tokens of context). Each prompt is sent streamed and greedy
to the three arms in turn: to the engine directly (the request the gateway would send: every adapter's scale),
through the gateway as ``cogumi-<model>`` (a manual override: no base pass, no router), and to
``Llama.create_chat_completion``; the arm that goes first rotates from one prompt to the next (the engine's prompt
cache serves the second of the two engine arms a prompt the first just sent). ``Llama`` takes one LoRA
(``lora_path``, ``lora_scale``): the recovery LoRA at 1 when the release has one, else the model's modifier at the
release's scale; a modifier on top of a recovery (two adapters) is not applied there, and the JSON's
``llama_cpp_python`` entry says which LoRA that arm ran. Per request: time to the first content chunk (TTFT) and
decode tokens/s (content chunks after the first over the time from the first to the last). A repeat's figure is the
median over its prompts; every figure is the median over ``--repeats`` repeats with min and max; the ratios (gateway
/ bare engine, gateway / llama-cpp-python) are of the medians. ``same_as_bare_engine``: whether an arm streamed the
engine's chunk counts and text. Repeated prompts hit both llama.cpp's prompt cache and ``Llama``'s (the longest
common prefix is kept).

Load (``--load`` concurrency levels, ``--load-requests`` requests at each; ``--load ""`` skips it). At each level,
non-streamed greedy requests through the gateway from a thread pool of that many threads: once all as
``cogumi-<model>`` (``single``), once spreading base and every modifier of the release over the requests in turn
(``mixed``: requests in flight together use different adapters). Per run: p50 and p99 latency of the successful
requests (numpy's linear interpolation), requests/s (successes over the run's wall time), errors (count and the
first message) and mismatches: answers that differ from the same request made alone beforehand (greedy; adapters
mixing under concurrency would show here; must be 0). The gateway's rate limit is set far above the load
(``rate_per_minute`` and ``rate_burst`` 10**6) so that no request is refused for rate.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import summary  # noqa: E402
from bench.serving import PROMPTS  # noqa: E402 (the Phase 2 serving bench's prompts: one set for both)

CONTEXT = 2048  # tokens per engine slot and of the Llama's context


def timed(t0: float, chunks: Iterable[dict], what: str) -> dict:
    """TTFT (from ``t0``), decode tokens/s, chunk count and text of a streamed chat completion's chunks."""
    stamps: list[float] = []
    text: list[str] = []
    for data in chunks:
        for choice in data.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
    if not stamps:
        raise RuntimeError(f"{what}: no content streamed")
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"ttft_s": stamps[0] - t0, "decode_tps": decode, "chunks": len(stamps), "text": "".join(text)}


def timed_stream(url: str, headers: dict, body: dict) -> dict:
    """:func:`timed` of one streamed chat completion over HTTP (server-sent events)."""
    import httpx

    t0 = time.perf_counter()
    with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as resp:
        resp.raise_for_status()
        return timed(t0, (json.loads(line[5:]) for line in resp.iter_lines()
                          if line.startswith("data:") and line.strip() != "data: [DONE]"), url)


def llama_cpp_arm(release: Any, model: str, threads: int, max_tokens: int) -> tuple[Callable[[list], dict], dict]:
    """The release's base GGUF in this process with ``llama_cpp.Llama`` and the one LoRA it takes (module doc):
    (a function timing one streamed greedy answer, what the arm ran)."""
    import llama_cpp

    scale = float(release.manifest["models"][model]["scale"])
    lora = (("recovery", release.recovery, 1.0) if release.recovery
            else (model, release.modifiers[model], scale) if model != "base" else None)
    llm = llama_cpp.Llama(str(release.base), n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads,
                          lora_path=str(lora[1]) if lora else None, lora_scale=lora[2] if lora else 1.0,
                          verbose=False)
    info = {"lora": lora[0] if lora else None, "lora_scale": lora[2] if lora else None,
            "model_applied": model == "base" or (lora is not None and lora[0] == model)}
    if not info["model_applied"]:
        info["note"] = (f"llama_cpp.Llama takes one LoRA (lora_path): this arm ran the release's base with its "
                        f"recovery LoRA, not {model!r} on top of it")

    def run(messages: list) -> dict:
        t0 = time.perf_counter()
        return timed(t0, llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stream=True),
                     "llama_cpp")

    return run, info


def speed(arms: dict[str, Callable[[list], dict]], messages: list[list], repeats: int) -> dict:
    """Every arm on every prompt in turn, ``repeats`` times after one warm-up each (module doc)."""
    for run in arms.values():
        run(messages[0])
    per: dict[str, dict[str, list[float]]] = {a: {"ttft_s": [], "decode_tps": []} for a in arms}
    last: dict[str, list[dict]] = {}
    names = list(arms)
    for rep in range(repeats):
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for i, m in enumerate(messages):
            turn = (rep * len(messages) + i) % len(names)  # who goes first rotates (module doc)
            for arm in names[turn:] + names[:turn]:
                runs[arm].append(arms[arm](m))
        for arm, rs in runs.items():
            per[arm]["ttft_s"].append(statistics.median(r["ttft_s"] for r in rs))
            per[arm]["decode_tps"].append(statistics.median(r["decode_tps"] for r in rs if r["decode_tps"]))
        last = runs
    out: dict[str, Any] = {"arms": {a: {k: summary(v) for k, v in d.items()} for a, d in per.items()}}
    ref = last["bare_engine"]
    out["same_as_bare_engine"] = {a: {k: [r[k] for r in rs] == [r[k] for r in ref] for k in ("chunks", "text")}
                                  for a, rs in last.items() if a != "bare_engine"}
    g = out["arms"]["gateway"]
    for other in ("bare_engine", "llama_cpp_python"):
        o = out["arms"][other]
        out[f"ratio_gateway_to_{other}"] = {k: round(g[k]["median"] / o[k]["median"], 3)
                                            for k in ("decode_tps", "ttft_s")}
    return out


def load_test(url: str, key: str, model: str, models: list[str], messages: list[list], max_tokens: int,
              levels: list[int], requests: int) -> dict:
    """The bounded load test through the gateway (module doc)."""
    import httpx
    import numpy as np

    headers = {"Authorization": f"Bearer {key}"}

    def ask(client: httpx.Client, pair: tuple[str, int]) -> str:
        body = {"model": f"cogumi-{pair[0]}", "messages": messages[pair[1]], "max_tokens": max_tokens,
                "temperature": 0, "stream": False}
        r = client.post(url, json=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["message"]["content"]

    def timed_ask(client: httpx.Client, pair: tuple[str, int]) -> tuple[float, str | None, str | None]:
        t0 = time.perf_counter()
        try:
            text, error = ask(client, pair), None
        except Exception as exc:  # noqa: BLE001 -- counted and reported, the run goes on
            text, error = None, f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - t0, text, error

    plans = {"single": [(model, i % len(messages)) for i in range(requests)],
             "mixed": [(models[i % len(models)], i // len(models) % len(messages)) for i in range(requests)]}
    with httpx.Client(timeout=600) as client:
        alone = {pair: ask(client, pair) for pair in sorted(set(plans["single"] + plans["mixed"]))}
    out: dict[str, dict] = {}
    for level in levels:
        out[str(level)] = {}
        for variant, plan in plans.items():
            with (httpx.Client(timeout=600, limits=httpx.Limits(max_connections=level)) as client,
                  ThreadPoolExecutor(level) as pool):
                t0 = time.perf_counter()
                results = list(pool.map(lambda pair, c=client: timed_ask(c, pair), plan))
                wall = time.perf_counter() - t0
            ok = [lat for lat, text, _ in results if text is not None]
            errors = [e for _, _, e in results if e]
            mismatches = sum(t is not None and t != alone[pair] for pair, (_, t, _) in zip(plan, results, strict=True))
            p50, p99 = (round(float(x), 4) for x in np.percentile(ok, [50, 99])) if ok else (None, None)
            out[str(level)][variant] = {
                "requests": len(plan), "p50_s": p50, "p99_s": p99, "requests_per_s": round(len(ok) / wall, 3),
                "errors": len(errors), "first_error": errors[0] if errors else None,
                "mismatches": mismatches}
    return {"requests_per_level": requests, "stream": False, "max_tokens": max_tokens,
            "mixed_models": [f"cogumi-{m}" for m in models], "levels": out,
            "mismatches_total": sum(v["mismatches"] for lv in out.values() for v in lv.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", required=True, help="a release directory (cogumi_tasks.serve.release)")
    p.add_argument("--model", default="base", help="base or a modifier of the release")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2, help="engine slots (ServeConfig.parallel's default)")
    p.add_argument("--load", default="1,4,8", help='concurrency levels, comma separated ("": no load test)')
    p.add_argument("--load-requests", type=int, default=16, help="requests at each concurrency level")
    p.add_argument("--out")
    args = p.parse_args()
    levels = [int(x) for x in args.load.split(",") if x.strip()]

    from cogumi_tasks.core.config import ServeConfig
    from cogumi_tasks.serve.engine import XllamacppEngine
    from cogumi_tasks.serve.gateway import create_app
    from cogumi_tasks.serve.release import load_release
    from cogumi_tasks.serve.threaded import ThreadedServer

    release = load_release(Path(args.release))
    if args.model not in release.models:
        raise SystemExit(f"--model {args.model!r}: the release serves {release.models}")
    config = ServeConfig(max_tokens=max(args.max_tokens, 1), rate_per_minute=1e6, rate_burst=10**6,
                         parallel=args.parallel, context=CONTEXT, threads=args.threads)
    engine = XllamacppEngine.for_release(release, config)
    engine.start()
    key = secrets.token_hex(16)
    messages = [[{"role": "user", "content": t}] for t in PROMPTS[: args.prompts]]
    llama_run, llama_info = llama_cpp_arm(release, args.model, args.threads, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(release, config, engine, keys=[key], memory_path=f"{tmp}/memory.sqlite")
        server = ThreadedServer(app, stop_timeout_s=30).start()
        url = f"{server.url}/v1/chat/completions"
        scales = app.state.gateway.scales(args.model)
        engine_headers = {"Authorization": f"Bearer {engine.key}"}
        arms = {
            "bare_engine": lambda m: timed_stream(f"{engine.url}/v1/chat/completions", engine_headers,
                                                  engine._body(m, scales, args.max_tokens, True, 0.0, None)),
            "gateway": lambda m: timed_stream(url, {"Authorization": f"Bearer {key}"}, {
                "model": f"cogumi-{args.model}", "messages": m, "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True}),
            "llama_cpp_python": llama_run,
        }
        out: dict[str, Any] = {"release": release.id, "model": args.model, "prompts": len(messages),
                               "max_tokens": args.max_tokens, "repeats": args.repeats, "threads": args.threads,
                               "parallel": args.parallel, "context": CONTEXT, "llama_cpp_python": llama_info}
        out |= speed(arms, messages, args.repeats)
        del arms, llama_run  # the Llama's memory, before the load test
        if levels:
            out["load"] = load_test(url, key, args.model, release.models, messages, args.max_tokens, levels,
                                    args.load_requests)
            out["load"]["rate_limit"] = {"rate_per_minute": config.rate_per_minute, "rate_burst": config.rate_burst}
        server.stop()
    engine.stop()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
