"""Offline evaluation of routing policies from the verdict table: no model runs, every model's verdict is known.

A policy is an (n, models) matrix ``R`` of route probabilities per query (one-hot for a deterministic policy).
With ``V`` the verdicts (1 correct), ``c`` the costs and ``y`` the labels:

- quality = mean_i sum_m R_im V_im (share answered correctly), cost = mean_i R_i . c (per query);
- accuracy = mean_i R_{i,y_i} (agreement with the label, with a bootstrap interval);
  confusion[a][b] = sum_i [y_i = a] R_ib (rows: label);
- gain recovered = (quality - quality(always-base)) / (quality(oracle) - quality(always-base)): 1 for the oracle,
  0 for always-base, undefined (None) when the oracle gains nothing.

Policies: ``always_base``; ``always_best_modifier`` (the modifier with the most correct answers on the training
split, ties to the cheaper, then label-map order); ``random_same_cost`` (the base with probability 1 - p, else a
modifier uniformly, p set so the expected cost equals the router's; when the modifiers cost as much as the base,
p = the router's share of modifier routes; figures are exact expectations, no sampling); ``keyword`` (the modifier
with the most configured keyword hits in the lowercased query, ties to label-map order, none: base); ``oracle``
(the label); ``router`` (the MLP's choice, :meth:`cogumi_tasks.routing.router.Router.choose`);
``threshold_<t>`` (the base when its calibrated confidence >= t, else the router's choice).

Curve: the threshold policy at t = 0, 0.01, ..., 1 and the router alone (t above 1). Cost never falls as t rises
(base is the cheapest). APGR = the area under gain recovered against cost over that curve (trapezoids, points in
t order) divided by the cost span; the router's gain recovered when the span is 0.

Intervals: 95% percentile bootstraps over queries (:func:`cogumi_tasks.eval.tables.bootstrap_mean_ci`) of each
policy's quality and of the per-query quality difference router minus each other policy (paired).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cogumi_tasks.eval.tables import bootstrap_mean_ci

CURVE_STEPS = 100


def onehot(routes: np.ndarray, n_models: int) -> np.ndarray:
    out = np.zeros((len(routes), n_models))
    out[np.arange(len(routes)), routes] = 1.0
    return out


def best_modifier(verdicts: np.ndarray, costs: np.ndarray) -> int:
    """Index of the modifier (not the base) with the most correct answers; ties: cheaper, then label-map order."""
    correct = verdicts[:, 1:].sum(axis=0)
    return 1 + min(range(len(correct)), key=lambda j: (-correct[j], costs[1 + j], j))


def keyword_routes(queries: Sequence[str], models: Sequence[str], keywords: Mapping[str, Sequence[str]]) -> np.ndarray:
    out = np.zeros(len(queries), dtype=int)
    for i, q in enumerate(queries):
        text = q.lower()
        hits = [sum(text.count(k.lower()) for k in keywords.get(m, ())) for m in models]
        best = max(range(1, len(models)), key=lambda j: (hits[j], -j))
        out[i] = best if hits[best] > 0 else 0
    return out


def threshold_routes(router_routes: np.ndarray, confidences: np.ndarray, threshold: float) -> np.ndarray:
    """The base (0) where confidence >= threshold, else the router's route."""
    return np.where(np.asarray(confidences) >= threshold, 0, router_routes)


def random_same_cost(router: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, float]:
    """(route probabilities, p) of the random policy whose expected cost equals the router policy ``router``'s."""
    n, k = router.shape
    extra = costs[1:].mean() - costs[0]
    if extra > 0:
        p = float(np.clip(((router @ costs).mean() - costs[0]) / extra, 0.0, 1.0))
    else:
        p = float(router[:, 1:].sum(axis=1).mean())
    row = np.array([1 - p] + [p / (k - 1)] * (k - 1))
    return np.tile(row, (n, 1)), p


def evaluate(routes: np.ndarray, verdicts: np.ndarray, labels: np.ndarray, costs: np.ndarray) -> dict:
    """Quality, cost, accuracy, route mix and confusion matrix of one policy (see the module docstring)."""
    per_item = (routes * verdicts).sum(axis=1)
    confusion = np.zeros((routes.shape[1], routes.shape[1]))
    np.add.at(confusion, labels, routes)
    hits = routes[np.arange(len(labels)), labels]
    return {"quality": float(per_item.mean()), "cost": float((routes @ costs).mean()), "accuracy": float(hits.mean()),
            "route_mix": [float(v) for v in routes.mean(axis=0)],
            "confusion": [[round(float(v), 4) for v in row] for row in confusion], "_per_item": per_item,
            "_hits": hits}


def gain_recovered(quality: float, base: float, oracle: float) -> float | None:
    return None if oracle <= base else (quality - base) / (oracle - base)


def _apgr(curve: list[dict], router_gain: float | None) -> float | None:
    costs = np.array([p["cost"] for p in curve])
    gains = [p["gain_recovered"] for p in curve]
    if any(g is None for g in gains):
        return None
    span = costs[-1] - costs[0]
    if span <= 0:
        return router_gain
    g = np.array(gains, dtype=float)
    return float(np.sum((g[1:] + g[:-1]) / 2 * np.diff(costs)) / span)


def choose_threshold(sweep: list[dict], budget: float | None) -> dict:
    """``max_quality_within_budget``: the most quality at cost <= budget (ties: lower cost, then lower threshold);
    when no threshold fits the budget, the cheapest (``within_budget`` False)."""
    fits = [s for s in sweep if budget is None or s["cost"] <= budget + 1e-12]
    if fits:
        pick = min(fits, key=lambda s: (-s["quality"], s["cost"], s["threshold"]))
    else:
        pick = min(sweep, key=lambda s: (s["cost"], -s["quality"], s["threshold"]))
    return {"threshold": pick["threshold"], "objective": "max_quality_within_budget", "cost_budget": budget,
            "within_budget": bool(fits), "quality": pick["quality"], "cost": pick["cost"]}


def evaluate_policies(*, models: Sequence[str], costs: Mapping[str, float], verdicts: np.ndarray, labels: np.ndarray,
                      router_routes: np.ndarray, confidences: np.ndarray, queries: Sequence[str],
                      train_verdicts: np.ndarray, keywords: Mapping[str, Sequence[str]], thresholds: Sequence[float],
                      cost_budget: float | None, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every policy, the differences, the curve, the threshold sweep and the chosen threshold, on the holdout rows
    (``verdicts`` (n, models) 0/1, ``labels``, the router's routes, the base's confidences, the queries);
    ``train_verdicts`` picks the best modifier."""
    k = len(models)
    c = np.array([costs[m] for m in models], dtype=float)
    v = np.asarray(verdicts, dtype=float)
    labels = np.asarray(labels, dtype=int)
    conf = np.asarray(confidences, dtype=float)
    router_routes = np.asarray(router_routes, dtype=int)
    best = best_modifier(np.asarray(train_verdicts, dtype=float), c)
    router = onehot(router_routes, k)
    random_routes, p = random_same_cost(router, c)
    policies = {"always_base": onehot(np.zeros(len(v), dtype=int), k),
                "always_best_modifier": onehot(np.full(len(v), best), k),
                "random_same_cost": random_routes,
                "keyword": onehot(keyword_routes(queries, models, keywords), k),
                "oracle": onehot(labels, k), "router": router}
    table = {name: evaluate(r, v, labels, c) for name, r in policies.items()}
    q_base, q_oracle = table["always_base"]["quality"], table["oracle"]["quality"]
    differences = {}
    for name, row in table.items():
        point, low, high = bootstrap_mean_ci(row["_per_item"], n=bootstrap, seed=seed)
        row["quality_ci"] = [low, high]
        row["accuracy_ci"] = list(bootstrap_mean_ci(row.pop("_hits"), n=bootstrap, seed=seed)[1:])
        row["gain_recovered"] = gain_recovered(row["quality"], q_base, q_oracle)
        if name != "router":
            diff = table["router"]["_per_item"] - row["_per_item"]
            point, low, high = bootstrap_mean_ci(diff, n=bootstrap, seed=seed)
            differences[f"router_minus_{name}"] = {"points": 100 * point, "ci": [100 * low, 100 * high]}

    def point(t: float | None) -> dict:
        r = router if t is None else onehot(threshold_routes(router_routes, conf, t), k)
        row = evaluate(r, v, labels, c)
        row.pop("_per_item"), row.pop("_hits")
        return {"threshold": t, **row, "gain_recovered": gain_recovered(row["quality"], q_base, q_oracle)}

    curve = [point(i / CURVE_STEPS) for i in range(CURVE_STEPS + 1)] + [point(None)]
    for row in curve:
        row.pop("confusion")
    sweep = [point(float(t)) for t in thresholds]
    for row in table.values():
        row.pop("_per_item")
    return {"n": len(v), "models": list(models), "costs": c.tolist(), "label_mix": np.bincount(labels, minlength=k)
            .tolist(), "best_modifier": models[best], "random_modifier_share": p, "policies": table,
            "differences": differences, "curve": curve, "apgr": _apgr(curve, table["router"]["gain_recovered"]),
            "sweep": sweep, "chosen": choose_threshold(sweep, cost_budget)}
