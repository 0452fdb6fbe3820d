"""Benchmark: the Phase 4 routing decision per query on CPU, one query at a time as serving makes it. Prints JSON.

    python bench/router.py [--queries 1000] [--repeats 5] [--per-domain 100] [--threads 1] [--escalation DIR]
                           [--out FILE]

Router: trained by :func:`cogumi_tasks.routing.router_steps.fit_router` with tiny.yaml's ``routing.router`` on a
planted verdict table (:mod:`cogumi_tasks.routing.planted`: ``--per-domain`` held-out tiny-world prompts per domain
and the general prompts); latency does not depend on what the router learned, only on its shape (128 -> 64 -> 32
-> 4). Queries: the table's queries with their confidences and sessions, cycled to ``--queries``.

Per query, timed separately with ``perf_counter_ns``:
- ``embedding``: MiniLM (sentence-transformers, builtin all-MiniLM-L6-v2) of the query, L2 normalised;
- ``features``: PCA projection + confidence + session features (128 floats);
- ``mlp``: the router's forward pass and the thresholded decision (:meth:`Router.decide`);
- ``escalation``: the escalation LSTM on the query text (:class:`cogumi_tasks.routing.escalation.EscalationDetector`:
  tokenise + 2-layer LSTM), when that module is installed: a trained bundle given by ``--escalation``, else a student
  of ``routing.escalation``'s configured shape with seeded untrained weights and a vocabulary of the bench queries'
  words (latency depends on the shape and the message length, not on the weight values);
- ``decision_given_embedding``: features + mlp + escalation in one timed call (the goal: p99 <= 2 ms);
- ``full``: embedding + decision in one timed call.

Each repeat runs every query once (after 20 warm-up queries); a repeat's p50 and p99 are over its queries, of wall
time and of the thread's CPU time (``cpu_p50``, ``cpu_p99``: without the time spent waiting for a core on a loaded
machine); the figures are the median over ``--repeats`` repeats, with their min and max. torch runs on
``--threads`` threads (1: the embedding, MLP and LSTM all run on the timed thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import summary  # noqa: E402
from cogumi_tasks.core.config import load_config  # noqa: E402
from cogumi_tasks.routing.features import VerdictRow, embed_queries  # noqa: E402
from cogumi_tasks.routing.planted import planted_verdicts  # noqa: E402
from cogumi_tasks.routing.router_steps import fit_router  # noqa: E402
from cogumi_tasks.train.failures import load_embedder  # noqa: E402

WARMUP = 20
PARTS = ("embedding", "features", "mlp", "escalation", "decision_given_embedding", "full")


def escalation_detector(arg: Path | None, texts: list[str], tmp: Path) -> tuple[object | None, str]:
    """(detector, what it is) or (None, why not)."""
    try:
        from cogumi_tasks.routing import escalation as esc
    except ImportError as exc:
        return None, f"not included: cogumi_tasks.routing.escalation is not importable ({exc})"
    if arg is not None:
        return esc.EscalationDetector(arg), f"trained bundle {arg}"
    import torch

    cfg = load_config("tiny").routing.escalation
    vocab = esc.build_vocab(texts, cfg.max_words, cfg.min_count)
    vocab += [f"<word{i}>" for i in range(cfg.pretrained_words)]  # the teacher's words a trained student also has
    torch.manual_seed(cfg.seed)
    model = esc.new_student(len(vocab), cfg.model_dump()).eval()
    esc.save_student(esc.StudentResult(model, vocab, 0, float("nan")), cfg, tmp / "escalation")
    return esc.EscalationDetector(tmp / "escalation"), (
        f"untrained student of the configured shape (embed {cfg.embed_dim}, LSTM {cfg.layers}x{cfg.hidden}, "
        f"{len(vocab)} words, at most {cfg.max_words} per message)")


def stamp() -> tuple[int, int]:
    """(wall ns, this thread's CPU ns): CPU time leaves out the time the thread waited for a core."""
    return time.perf_counter_ns(), time.thread_time_ns()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-domain", type=int, default=100, help="planted training table: prompts per domain")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--escalation", type=Path, default=None, help="a trained escalation bundle (student + vocab)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.queries < 1000 or args.repeats < 5:
        print(f"note: --queries {args.queries} --repeats {args.repeats} (goal: >= 1000 and >= 5)", file=sys.stderr)
    import torch

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny").routing.router
    rows = [VerdictRow.model_validate(r) for r in planted_verdicts(per_domain=args.per_domain, general=74)]
    t0 = time.perf_counter()
    embedder = load_embedder(cfg.embedder)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    router, evaluation = fit_router(rows, embed_queries(embedder, [r.query for r in rows]), cfg)
    fit_s = time.perf_counter() - t0
    picked = [rows[i % len(rows)] for i in range(args.queries)]
    with tempfile.TemporaryDirectory() as tmp:
        detector, escalation_note = escalation_detector(args.escalation, [r.query for r in rows], Path(tmp))
        per_repeat: dict[str, dict[str, list[float]]] = {
            p: {"p50": [], "p99": [], "cpu_p50": [], "cpu_p99": [], "mean": []} for p in PARTS}
        for rep in range(args.repeats):
            times: dict[str, list[tuple[int, int]]] = {p: [] for p in PARTS}
            for i, row in enumerate(picked[:WARMUP] + picked):
                a = stamp()
                emb = embed_queries(embedder, [row.query])
                b = stamp()
                x = router.features(emb, [row.confidence], [row.session])
                c = stamp()
                router.decide(x[0])
                d = stamp()
                if detector is not None:
                    detector.escalate(row.query)
                e = stamp()
                if i < WARMUP:
                    continue
                for name, (u, v) in (("embedding", (a, b)), ("features", (b, c)), ("mlp", (c, d)),
                                     ("escalation", (d, e)), ("decision_given_embedding", (b, e)), ("full", (a, e))):
                    times[name].append((v[0] - u[0], v[1] - u[1]))
            for name, ns in times.items():
                wall, cpu = (np.asarray(ns)[:, j] / 1e6 for j in (0, 1))
                for key, ms in (("p50", wall), ("p99", wall), ("cpu_p50", cpu), ("cpu_p99", cpu)):
                    per_repeat[name][key].append(float(np.percentile(ms, 99 if key.endswith("99") else 50)))
                per_repeat[name]["mean"].append(float(wall.mean()))
            print(f"repeat {rep + 1}/{args.repeats}: decision p99 "
                  f"{per_repeat['decision_given_embedding']['p99'][-1]:.3f} ms, embedding p50 "
                  f"{per_repeat['embedding']['p50'][-1]:.2f} ms", file=sys.stderr)
    latency = {name: {k: summary(v) for k, v in stats.items()} for name, stats in per_repeat.items()
               if name != "escalation" or detector is not None}
    goal_p99 = latency["decision_given_embedding"]["p99"]["median"]
    report = {
        "benchmark": "router", "queries": args.queries, "repeats": args.repeats, "warmup": WARMUP,
        "torch_threads": args.threads, "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "table": {"rows": len(rows), "split": evaluation["split"], "per_domain": args.per_domain, "general": 74},
        "router": {"input_dim": router.dim, "hidden": list(cfg.hidden), "models": router.models,
                   "threshold": router.threshold, "holdout_quality": evaluation["policies"]["router"]["quality"],
                   "holdout_accuracy": evaluation["policies"]["router"]["accuracy"]},
        "escalation": escalation_note,
        "embedder_load_seconds": round(load_s, 2), "fit_seconds_incl_table_embedding": round(fit_s, 2),
        "latency_ms": latency,
        "goal": {"what": "p99 of decision_given_embedding (features + MLP + escalation) <= 2 ms",
                 "p99_ms": goal_p99, "met": goal_p99 <= 2.0,
                 "escalation_included": detector is not None},
    }
    text = json.dumps(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
