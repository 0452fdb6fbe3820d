"""Phase 4 step ``routing.publish``: the routing bundle serving loads, and every Phase 4 figure beside the plan's.

Figures (all measured here or by the steps before): the router's holdout accuracy with its interval (plan 97%),
its decision latency alone and with the query's embedding (plan < 5 ms), every policy's quality and cost, the
threshold sweep and the chosen threshold (plan: 0.75 / 0.80 / 0.85 tried, 0.80 expected), the route mix at that
threshold against the plan's ranges (sweep, threshold and mix over the cross-validated routes when the shipped
router was refitted on every row: ``shipped``), and the escalation detector's teacher and student (plan: 94%,
3 MB, < 3 ms).
Whether the router beats always-base and the random router at equal cost is judged on the holdout split and on the
cross-validation over every query (:func:`beats`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from cogumi_tasks.core.records import iter_jsonl_dicts
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.core.verdict import judge, num

log = logging.getLogger("cogumi")

PLAN = {"router_accuracy": 0.97, "router_ms": 5.0, "escalation_accuracy": 0.94, "escalation_bytes": 3e6,
        "escalation_ms": 3.0, "thresholds": [0.75, 0.80, 0.85], "threshold": 0.80,
        "route_mix": {"base": [0.45, 0.55], "code": [0.20, 0.25], "reasoning": [0.15, 0.20],
                      "automation": [0.10, 0.15]}}
# The goals for the distilled detector (the plan gives none): within 5 points of the teacher, 20x smaller.
ESCALATION_GOALS = {"gap_points": 5.0, "size_ratio": 20.0}


def route_mix(evaluation: dict, threshold: float | None) -> dict[str, Any]:
    """Share of queries per model at ``threshold`` (the sweep's row of ``evaluation``: the holdout split's, or the
    cross-validation's when the shipped router was refitted), each against the plan's range."""
    models = evaluation["models"]
    row = next((s for s in evaluation["sweep"] if s["threshold"] == threshold), evaluation["policies"]["router"])
    out = {}
    for m, share in zip(models, row["route_mix"], strict=True):
        lo_hi = PLAN["route_mix"].get(m)
        out[m] = {"share": share, "plan": lo_hi,
                  **(judge(share, "between", lo_hi).as_dict() if lo_hi else {"verdict": "no plan figure"})}
    return out


def router_latency(ctx: StepContext, queries: list[str], confidences: list[float], n: int) -> dict[str, Any]:
    """p50/p99 milliseconds of one decision: the MLP on ready features, and embedding + features + MLP."""
    from cogumi_tasks.routing.escalation import latency_ms
    from cogumi_tasks.routing.features import embed_queries
    from cogumi_tasks.routing.router import Router
    from cogumi_tasks.train.failures import load_embedder

    router = Router.load(ctx.fetch_dir(ctx.input("router")))
    embedder = load_embedder(router.embedder)
    conf = dict(zip(queries, confidences, strict=True))
    feats = {q: router.features(embed_queries(embedder, [q]), [conf[q]], [[]]) for q in queries}

    def decide(q: str) -> str:
        return router.decide(feats[q])[0]

    def embed_and_decide(q: str) -> str:
        return router.decide(router.features(embed_queries(embedder, [q]), [conf[q]], [[]]))[0]

    return {"mlp": latency_ms(decide, queries, n), "with_embedding": latency_ms(embed_and_decide, queries, n)}


def why_not_better(ev: dict, d: dict, n: int | None) -> str:
    """Why "router minus a policy > 0" is not met on one evaluation, from its own figures: how many paired queries
    there were and, for a positive difference, about how many would put the lower bound above 0 were the difference
    to hold (the interval's width shrinks as 1/sqrt(n)); the headroom (the oracle, each query to the cheapest model
    that was right, over always-base); the fixed policies that did better than the router on the same queries."""
    points, low = float(d["points"]), float(d["ci"][0])
    why = []
    if points > 0 and n:
        need = max(n + 1, math.ceil(n * ((points - low) / points) ** 2))  # a lower bound at 0 needs more than n
        why.append(f"{n} paired queries; were the difference to hold, about {need} would put the lower bound above 0")
    elif points <= 0:
        why.append(f"on these {n or 'few'} queries the router did not do better")
    pol = ev.get("policies") or {}
    quality = {k: p.get("quality") for k, p in pol.items() if isinstance(p.get("quality"), int | float)}
    pct = {k: f"{num(round(100 * q, 1))}%" for k, q in quality.items()}
    if "oracle" in quality and "always_base" in quality:
        why.append(f"headroom: the oracle {pct['oracle']} vs always-base {pct['always_base']}")
    if "router" in quality:
        above = [f"{k} {pct[k]}" for k, q in quality.items() if k not in ("router", "oracle") and q > quality["router"]]
        if above:
            why.append(f"above the router's {pct['router']}: {', '.join(above)}")
    return "why: " + "; ".join(why)


def beats(evaluation: dict) -> dict:
    """Does the router beat always-base and the random router at equal cost? Per comparison and per evaluation (the
    holdout split; the cross-validation on every query, when it ran): the verdict on "router minus policy > 0
    points", met only when the paired interval's lower bound clears 0; otherwise the reason ends with
    :func:`why_not_better`."""
    out: dict[str, dict] = {}
    cv = evaluation.get("cross_validation") or {}
    for where, ev, n in (("holdout", evaluation, (evaluation.get("split") or {}).get("test")),
                         ("cross_validation", cv, cv.get("n"))):
        for name in ("always_base", "random_same_cost"):
            d = (ev.get("differences") or {}).get(f"router_minus_{name}")
            if d:
                v = judge(d["points"], ">", 0, d["ci"])
                reason = v.reason if v.met else f"{v.reason}; {why_not_better(ev, d, n)}"
                out.setdefault(name, {})[where] = {"points": d["points"], "ci": d["ci"], "verdict": v.verdict,
                                                   "reason": reason}
    return out


@step("routing.publish", version=3, reads=("routing.router.costs",),
      inputs=("router", "evaluation", "verdicts", "stats", "escalation", "escalation_metrics", "calibrator"),
      outputs=("table", "bundle"),
      code=("cogumi_tasks.routing.escalation", "cogumi_tasks.routing.router", "cogumi_tasks.routing.features",
            "cogumi_tasks.train.failures"))
def publish(ctx: StepContext) -> StepOutput:
    """The routing table and bundle.

    Inputs: ``router`` (bundle dir) and ``evaluation`` (``routing.train_router``), ``verdicts`` and ``stats``
    (``routing.labels``), ``escalation`` (the student bundle dir) and ``escalation_metrics``
    (``routing.escalation``), ``calibrator`` (Phase 2's). Outputs: ``table`` (JSON, also the metrics: the figures in
    the module docstring with verdicts), ``bundle`` (JSON: the URIs serving loads, the threshold, models, costs).
    """
    if ctx.config.routing is None:
        raise StepFailed(f"config {ctx.config.name} has no routing section")
    evaluation = json.loads(ctx.fetch(ctx.input("evaluation")).read_text())
    stats = json.loads(ctx.fetch(ctx.input("stats")).read_text())
    esc = json.loads(ctx.fetch(ctx.input("escalation_metrics")).read_text())
    rows = list(iter_jsonl_dicts(ctx.fetch(ctx.input("verdicts"))))
    pol = evaluation["policies"]
    shipped = evaluation.get("shipped") or {"refit": False, "threshold": evaluation["chosen"]["threshold"]}
    # the shipped router's threshold, sweep and route mix: the cross-validated ones when it was refitted on every row
    swept = evaluation["cross_validation"] if shipped["refit"] else evaluation
    chosen = shipped["threshold"]
    latency = router_latency(ctx, [r["query"] for r in rows][:50], [r["confidence"] for r in rows][:50], 200)
    router = pol["router"]
    student, teacher = esc["student"], esc["teacher"]
    table = {
        "labels": {k: stats[k] for k in ("queries", "domain_queries", "general_queries", "confidence_ms",
                                         "per_domain", "sessions")},
        "router": {"accuracy": router["accuracy"], "accuracy_ci": router["accuracy_ci"], "n": evaluation["n"],
                   "plan": PLAN["router_accuracy"],
                   **judge(router["accuracy"], ">=", PLAN["router_accuracy"], router["accuracy_ci"]).as_dict(),
                   "label_mix": dict(zip(evaluation["models"], evaluation["label_mix"], strict=True)),
                   "confusion": router["confusion"], "latency": latency,
                   "latency_verdict": judge(latency["mlp"]["p99_ms"], "<", PLAN["router_ms"]).as_dict()},
        "models": evaluation["models"],
        "policies": {name: {k: p[k] for k in ("quality", "quality_ci", "cost", "accuracy", "gain_recovered",
                                              "route_mix")} for name, p in pol.items()},
        "differences": evaluation["differences"], "apgr": evaluation["apgr"],
        "beats": beats(evaluation),
        "cross_validation": evaluation.get("cross_validation"),
        "thresholds": {"sweep": [{k: s[k] for k in ("threshold", "quality", "cost", "route_mix", "gain_recovered")}
                                 for s in swept["sweep"]],
                       "chosen": swept["chosen"], "plan_tried": PLAN["thresholds"],
                       "plan_expected": PLAN["threshold"],
                       "over": "cross-validated routes of every query" if shipped["refit"] else "the holdout split"},
        "route_mix": route_mix(swept, chosen),
        "shipped": shipped,
        "escalation": {
            "data": esc.get("data"), "examples": esc.get("examples"),
            "teacher": {k: teacher[k] for k in ("accuracy", "ci", "n", "bytes", "parameters") if k in teacher}
            | {"p99_ms": teacher["latency"]["p99_ms"]},
            "student": {k: student[k] for k in ("accuracy", "ci", "n", "bytes", "parameters") if k in student}
            | {"p50_ms": student["latency"]["p50_ms"], "p99_ms": student["latency"]["p99_ms"]},
            "size_ratio": esc.get("size_ratio"),
            "size_ratio_verdict": judge(esc.get("size_ratio"), ">=", ESCALATION_GOALS["size_ratio"]).as_dict(),
            "gap_points": esc.get("accuracy_gap_points"), "gap_ci": esc.get("accuracy_gap_ci"),
            "gap_verdict": judge(esc.get("accuracy_gap_points"), "<=", ESCALATION_GOALS["gap_points"],
                                 esc.get("accuracy_gap_ci"),
                                 undefined_reason="no accuracy gap in the escalation metrics").as_dict(),
            "accuracy_verdict": judge(student["accuracy"], ">=", PLAN["escalation_accuracy"],
                                      student["ci"]).as_dict(),
            "bytes_verdict": judge(student["bytes"], "<=", PLAN["escalation_bytes"]).as_dict(),
            "latency_verdict": judge(student["latency"]["p99_ms"], "<", PLAN["escalation_ms"]).as_dict()},
        "plan": PLAN,
    }
    bundle = {"router": ctx.input("router"), "escalation": ctx.input("escalation"),
              "calibrator": ctx.input("calibrator"), "verdicts": ctx.input("verdicts"), "threshold": chosen,
              "models": evaluation["models"],
              "costs": dict(zip(evaluation["models"], evaluation["costs"], strict=True))}
    ctx.out("table.json").write_text(json.dumps(table, indent=1))
    ctx.out("bundle.json").write_text(json.dumps(bundle, indent=1))
    log.info("routing: accuracy %.3f %s (plan %.2f: %s), threshold %s, mix %s, escalation student %.3f",
             router["accuracy"], router["accuracy_ci"], PLAN["router_accuracy"], table["router"]["verdict"], chosen,
             {m: round(v["share"], 3) for m, v in table["route_mix"].items()}, student["accuracy"])
    return StepOutput(files={"table": "table.json", "bundle": "bundle.json"}, metrics=table)
