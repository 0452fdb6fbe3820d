"""Benchmark: greedy evaluation answers in llama.cpp one conversation at a time or decoded together. Prints JSON.

    python bench/eval_decode.py [--repeats 5] [--items 6] [--parallel 8] [--out FILE]

Models: the packaged SmolLM2-135M as an f16 GGUF (converted through an HF directory, as eval.run does with
``hf_runtime: llama_cpp``; untrained, so its answers run long) and the packaged Q4_1 GGUF itself (quantized).
Prompts: ``--items`` held-out instances of each world family (code, reasoning, automation), new instances per
repeat (seed = repeat), ``max_tokens`` 96, 2 threads. Ways: ``one_at_a_time`` is the baseline,
:class:`cogumi_tasks.eval.backends.GGUFBackend` with ``parallel=1`` (llama-cpp-python's ``create_chat_completion``
per conversation, temperature 0, reusing the previous prompt's prefix); ``batched`` decodes ``--parallel``
conversations together (:class:`cogumi_tasks.eval.llama_batch.BatchDecoder`). Model load is not timed.
Figures: per model and way the median, min and max seconds over repeats; the speed-up of the medians; how many
batched answers equal the baseline's, and how many equal the same conversations batched in reverse order with
3 slots (an answer that depends on its batch shows there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = ("list_fn", "word_arith", "tool_call")


def conversations(items: int, seed: int) -> list[list[dict]]:
    from cogumi_tasks.world import generate

    return [[{"role": "user", "content": i.prompt}] for f in FAMILIES for i in generate(f, items, seed, part="heldout")]


def one_at_a_time(backend, convs: list[list[dict]]) -> list[str]:
    return [g.text for g in backend.generate(convs, 96)]


def batched(decoder, convs: list[list[dict]]) -> list[str]:
    out = [""] * len(convs)

    def done(i: int, tokens: list[int], _s: float) -> None:
        out[i] = decoder.text(tokens).strip()

    decoder.decode([decoder.prompt(c) for c in convs], 96, done)
    return out


def main() -> None:
    from llama_cpp import Llama

    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.eval.llama_batch import BatchDecoder
    from cogumi_tasks.models.convert import convert_hf_to_gguf, hf_dir_from_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--items", type=int, default=6, help="held-out instances per family and repeat")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        f16 = convert_hf_to_gguf(hf_dir_from_gguf(smollm2_gguf(), Path(tmp) / "hf"), Path(tmp) / "f16.gguf", "f16",
                                 "smollm")
        for label, path in (("f16", f16), ("q4_1", smollm2_gguf())):
            baseline = GGUFBackend(path, parallel=1, n_threads=2)  # create_chat_completion, one at a time
            llm = Llama(model_path=str(path), n_ctx=4096, n_threads=2, n_threads_batch=2, seed=0, verbose=False)
            decoder = BatchDecoder(llm, parallel=args.parallel, n_threads=2)
            small = BatchDecoder(llm, parallel=3, n_threads=2)
            seconds: dict[str, list[float]] = {"one_at_a_time": [], "batched": []}
            same_as_baseline = same_reversed = total = 0
            try:
                for rep in range(args.repeats):
                    convs = conversations(args.items, rep)
                    t0 = time.perf_counter()
                    base = one_at_a_time(baseline, convs)
                    seconds["one_at_a_time"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    got = batched(decoder, convs)
                    seconds["batched"].append(time.perf_counter() - t0)
                    rev = batched(small, convs[::-1])[::-1]
                    same_as_baseline += sum(a == b for a, b in zip(base, got, strict=True))
                    same_reversed += sum(a == b for a, b in zip(got, rev, strict=True))
                    total += len(convs)
                    print(f"{label} repeat {rep}: one at a time {seconds['one_at_a_time'][-1]:.1f} s, batched "
                          f"{seconds['batched'][-1]:.1f} s for {len(convs)} answers", file=sys.stderr)
            finally:
                small.close()
                decoder.close()
                llm.close()
                baseline.close()
            from bench.figures import summary

            results[label] = {
                "ways": {w: summary(s, 2) for w, s in seconds.items()},
                "speedup_median": round(statistics.median(seconds["one_at_a_time"])
                                        / statistics.median(seconds["batched"]), 2),
                "batched_same_as_one_at_a_time": f"{same_as_baseline}/{total}",
                "batched_same_as_reversed_3_slots": f"{same_reversed}/{total}"}
    from bench.figures import emit

    emit({"answers_per_repeat": 3 * args.items, "repeats": args.repeats, "parallel": args.parallel,
          "max_tokens": 96, "threads": 2, "baseline": "one_at_a_time", "models": results}, args.out)


if __name__ == "__main__":
    main()
