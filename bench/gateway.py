"""Benchmark: what the gateway costs over the bare engine it fronts, on the same release, prompts and adapter.
Prints one JSON object.

    python bench/gateway.py --release DIR [--model base] [--prompts 4] [--max-tokens 32] [--repeats 5]
                            [--threads 1] [--out FILE]

One :class:`cogumi_tasks.serve.engine.XllamacppEngine` on the release; the gateway (``create_app``, uvicorn on
loopback) in front of it. Each prompt is sent streamed and greedy, once to the engine directly (the request the
gateway would send: every adapter's scale) and once through the gateway as ``cogumi-<model>`` (a manual override:
no base pass, no router), the two arms taking turns. Per request: time to the first content chunk (TTFT) and
decode tokens/s (content chunks after the first over the time from the first to the last). A repeat's figure is
the median over its prompts; every figure is the median over ``--repeats`` repeats with min and max; the ratios
(gateway / bare) are of the medians. Not measured here: bare llama-cpp-python, the load test (issue 14).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import PROMPTS  # noqa: E402 (the Phase 2 serving bench's prompts: one set for both)


def timed_stream(url: str, headers: dict, body: dict) -> dict:
    """TTFT and decode tokens/s of one streamed chat completion."""
    import httpx

    t0 = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{url}: no content streamed")
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"ttft_s": stamps[0] - t0, "decode_tps": decode, "chunks": len(stamps)}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", required=True, help="a release directory (cogumi_tasks.serve.release)")
    p.add_argument("--model", default="base", help="base or a modifier of the release")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()

    import uvicorn

    from cogumi_tasks.core.config import ServeConfig
    from cogumi_tasks.serve.engine import XllamacppEngine
    from cogumi_tasks.serve.gateway import create_app
    from cogumi_tasks.serve.release import load_release

    release = load_release(Path(args.release))
    if args.model not in release.models:
        raise SystemExit(f"--model {args.model!r}: the release serves {release.models}")
    adapters = ({"recovery": release.recovery} if release.recovery else {}) | release.modifiers
    engine = XllamacppEngine(release.base, adapters, fixed={"recovery": 1.0} if release.recovery else None,
                             parallel=1, context=2048, threads=args.threads)
    engine.start()
    key = secrets.token_hex(16)
    with __import__("tempfile").TemporaryDirectory() as tmp:
        config = ServeConfig(max_tokens=max(args.max_tokens, 1), rate_per_minute=1e6, rate_burst=10**6)
        app = create_app(release, config, engine, keys=[key], memory_path=f"{tmp}/memory.sqlite")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        gw = app.state.gateway
        messages = [[{"role": "user", "content": t}] for t in PROMPTS[: args.prompts]]
        arms = {
            "bare_engine": (f"{engine.url}/v1/chat/completions", {"Authorization": f"Bearer {engine.key}"},
                            lambda m: engine._body(m, gw.scales(args.model), args.max_tokens, True, 0.0, None)),
            "gateway": (f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {key}"},
                        lambda m: {"model": f"cogumi-{args.model}", "messages": m, "max_tokens": args.max_tokens,
                                   "temperature": 0, "stream": True}),
        }
        for url, headers, body in arms.values():  # warm-up
            timed_stream(url, headers, body(messages[0]))
        per: dict[str, dict[str, list[float]]] = {a: {"ttft_s": [], "decode_tps": []} for a in arms}
        chunks: dict[str, list[int]] = {a: [] for a in arms}
        for _ in range(args.repeats):
            runs: dict[str, list[dict]] = {a: [] for a in arms}
            for m in messages:
                for arm, (url, headers, body) in arms.items():
                    runs[arm].append(timed_stream(url, headers, body(m)))
            for arm, rs in runs.items():
                per[arm]["ttft_s"].append(statistics.median(r["ttft_s"] for r in rs))
                per[arm]["decode_tps"].append(statistics.median(r["decode_tps"] for r in rs if r["decode_tps"]))
                chunks[arm] = [r["chunks"] for r in rs]
        server.should_exit = True
        thread.join(timeout=30)
    engine.stop()
    out = {"release": release.id, "model": args.model, "prompts": len(messages), "max_tokens": args.max_tokens,
           "repeats": args.repeats, "threads": args.threads, "same_chunks": chunks["gateway"] == chunks["bare_engine"],
           "arms": {a: {k: summary(v) for k, v in d.items()} for a, d in per.items()}}
    g, b = out["arms"]["gateway"], out["arms"]["bare_engine"]
    out["ratio_gateway_to_bare"] = {"decode_tps": round(g["decode_tps"]["median"] / b["decode_tps"]["median"], 3),
                                    "ttft_s": round(g["ttft_s"]["median"] / b["ttft_s"]["median"], 3)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
