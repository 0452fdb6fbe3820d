"""Benchmark: llama.cpp's server on Phase 3 tier prompts: interleaved or one family after another, with and
without its RAM prompt cache. Prints JSON.

    python bench/prompt_cache.py [--repeats 5] [--items 8] [--out FILE]

Prompts: what tier 1 sends (:func:`cogumi_tasks.modifiers.cascade.teacher_messages`, tiny.yaml's modifiers, 5 worked
examples) for ``--items`` held-out instances of two families (reasoning's word_arith, automation's tool_call).
Each family's calls share their examples (most of each prompt). Ways: interleaved (as tier tasks running side by
side send them, so consecutive calls never share a prefix) without and with the cache, and one family's calls
after the other's without it (as tier tasks taking turns in one pool send them). All ways run the packaged
SmolLM2-135M through :func:`cogumi_tasks.stack.services.start_llama_server` (2 threads), greedy, ``max_tokens`` 96,
one request at a time: ``prompt_cache_bytes`` 0 (the default: llama-cpp-python reuses only the previous request's
prefix) or 512 MiB (states kept, a request resumes from its longest cached prefix; each kept state also holds a
403 MB logits copy that the size does not count, see start_llama_server). Each repeat starts a fresh server per
way (start not timed) on new instances (seed = repeat), so every repeat pays each family's first prefix once, as
a tier does.
Figures: the median, min and max over repeats of the seconds for all calls, and per call; per way the share of
answers equal to the interleaved uncached way's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = (("reasoning", "word_arith"), ("automation", "tool_call"))
BASELINE = "interleaved_previous_prefix_only"
WAYS = {BASELINE: (0, True), "interleaved_ram_cache_512mib": (512 * 2**20, True),
        "by_family_previous_prefix_only": (0, False)}  # way -> (prompt_cache_bytes, interleaved)


def tier_prompts(items: int, seed: int, interleaved: bool = True) -> list[list[dict]]:
    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.modifiers.cascade import teacher_messages
    from cogumi_tasks.world import generate

    mods = {m.name: m for m in load_config("tiny").modifiers}
    per_family = []
    for name, family in FAMILIES:
        rows = [{"id": i.id, "messages": [{"role": "user", "content": i.prompt}], "task": i.to_dict()}
                for i in generate(family, items, seed, part="heldout")]
        msgs = teacher_messages(rows, mods[name], 1, mods[name].tiers[0].shots)
        per_family.append([msgs[r["id"]] for r in rows])
    if not interleaved:
        return [p for family in per_family for p in family]
    return [p for pair in zip(*per_family, strict=True) for p in pair]


def run_way(cache_bytes: int, prompts: list[list[dict]], log: Path) -> tuple[float, list[str], float]:
    import httpx

    from cogumi_tasks.stack.services import free_port, start_llama_server, stop

    port = free_port()
    proc = start_llama_server("smollm2-135m", port, log, prompt_cache_bytes=cache_bytes)
    try:
        answers, tokens, t0 = [], 0, time.perf_counter()
        for messages in prompts:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
                "model": "smollm2-135m", "messages": messages, "max_tokens": 96, "temperature": 0.0, "seed": 0})
            r.raise_for_status()
            body = r.json()
            answers.append(body["choices"][0]["message"]["content"])
            tokens += body["usage"]["prompt_tokens"]
        return time.perf_counter() - t0, answers, tokens / len(prompts)
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--items", type=int, default=8, help="held-out instances per family and repeat")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    seconds: dict[str, list[float]] = {w: [] for w in WAYS}
    same, total, prompt_tokens = dict.fromkeys(WAYS, 0), 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            got = {}
            for way, (cache_bytes, interleaved) in WAYS.items():
                prompts = tier_prompts(args.items, seed=rep, interleaved=interleaved)
                dt, answers, prompt_tokens = run_way(cache_bytes, prompts, Path(tmp) / f"{way}-{rep}.log")
                got[way] = dict(zip((str(p) for p in prompts), answers, strict=True))
                seconds[way].append(dt)
                print(f"repeat {rep} {way}: {dt:.1f} s for {len(prompts)} calls", file=sys.stderr)
            for way in WAYS:
                same[way] += sum(got[way][k] == v for k, v in got[BASELINE].items())
            total += len(got[BASELINE])
    from bench.figures import emit, summary

    calls = 2 * args.items
    base = statistics.median(seconds[BASELINE])
    ways = {w: {"seconds": summary(s, 2), "per_call_median_s": round(statistics.median(s) / calls, 3),
                "speedup_median": round(base / statistics.median(s), 2),
                "same_answers_as_baseline": f"{same[w]}/{total}"}
            for w, s in seconds.items()}
    emit({"calls_per_repeat": calls, "repeats": args.repeats, "prompt_tokens_per_call": round(prompt_tokens, 1),
          "baseline": BASELINE, "ways": ways}, args.out)


if __name__ == "__main__":
    main()
