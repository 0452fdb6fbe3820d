"""Benchmark: what the bubblewrap sandbox of model-written code costs per run, and how soon its limits end a run.
Prints one JSON object.

    python bench/sandbox.py [--repeats 5] [--out FILE]

Overhead: ``run_python("pass")`` against the strongest plain way to run the same program, a bare
``subprocess.run([sys.executable, "-I", "-c", "pass"])`` (no namespaces, no limits). Limits: seconds from start
to the result for a busy loop (``cpu_s=1``) and a sleeper (``wall_s=1``), against the limit itself, and for a
fork bomb (``Limits(cpu_s=3, wall_s=8)``: the process-count limit ends it first). Every figure is the median,
min and max of ``--repeats`` runs after one warm-up run. These were wall-clock assertions in the tests; they
depend on the machine's load, so they live here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogumi_tasks.world.sandbox import Limits, check_available, run_python  # noqa: E402

PROGRAMS = {
    "busy_loop_cpu_1s": ("while True:\n    pass\n", Limits(cpu_s=1, wall_s=30.0), 1.0),
    "sleep_wall_1s": ("import time\ntime.sleep(60)\n", Limits(cpu_s=5, wall_s=1.0), 1.0),
    # the process-count limit (max_procs) makes fork fail: no time limit is reached
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", Limits(cpu_s=3, wall_s=8.0), None),
}


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """Median/min/max seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    check_available()

    def sandboxed() -> None:
        if not run_python("pass").passed:
            raise RuntimeError("the sandbox failed to run `pass`")

    def bare() -> None:
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)

    o = {"sandbox": timed(sandboxed, args.repeats), "bare_subprocess": timed(bare, args.repeats)}
    result: dict = {"overhead": o}
    o["extra_ms"] = 1000 * (o["sandbox"]["median_s"] - o["bare_subprocess"]["median_s"])
    result["limits"] = {}
    for name, (code, limits, limit_s) in PROGRAMS.items():
        reasons: list[str] = []

        def run(code: str = code, limits: Limits = limits, reasons: list[str] = reasons) -> None:
            reasons.append(run_python(code, limits).reason)

        t = timed(run, args.repeats)
        after = None if limit_s is None else t["median_s"] - limit_s
        result["limits"][name] = {**t, "limit_s": limit_s, "after_limit_s": after, "reasons": sorted(set(reasons))}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
