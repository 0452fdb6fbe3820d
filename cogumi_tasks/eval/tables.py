"""Accuracy per domain with bootstrap intervals: one evaluation's table and Phase 1's before/after table.

Rows are ``eval.run`` items (``score`` of the student, ``reference_score`` of the reference, both 0/1). World
suites count by domain; any other suite (HumanEval, the external check) gets a row of its own, so a domain's
figure is measured on held-out world tasks only. Intervals are 95% percentile bootstraps over items with a
fixed seed; % of reference uses :func:`cogumi_tasks.eval.stats.bootstrap_ratio_ci` and is undefined (never 0%)
when the reference got no item right.
"""

from __future__ import annotations

from collections.abc import Sequence

from cogumi_tasks.eval.stats import bootstrap_mean_ci, bootstrap_ratio_ci


def accuracy(scores: Sequence[float], n: int = 1000, seed: int = 0) -> dict:
    """``{"correct", "n", "accuracy", "ci"}`` of 0/1 scores (accuracy 0-1, 95% bootstrap interval)."""
    point, low, high = bootstrap_mean_ci(scores, n=n, seed=seed)
    return {"correct": int(round(sum(scores))), "n": len(scores), "accuracy": point, "ci": [low, high]}


def pct_entry(ours: Sequence[float], ref: Sequence[float], n: int = 1000, seed: int = 0) -> dict:
    """% of reference with its paired interval; ``pct`` None and why when the reference got nothing right, then with
    ``ours`` and ``score_ci`` (0-1), on which gates are judged
    (:func:`cogumi_tasks.eval.stats.judge_pct_of_reference`)."""
    if not len(ours):
        return {"pct": None, "ci": None, "why": "undefined (no items)"}
    if sum(ref) == 0:
        point, low, high = bootstrap_mean_ci(ours, n=n, seed=seed)
        return {"pct": None, "ci": None, "why": f"undefined (reference 0/{len(ref)})", "ours": point,
                "score_ci": [low, high]}
    point, low, high = bootstrap_ratio_ci(ours, ref, n=n, seed=seed)
    return {"pct": point, "ci": [low, high]}


def paired_difference(ours: Sequence[float], base: Sequence[float], n: int = 1000, seed: int = 0) -> dict:
    """``{"points", "ci"}``: mean of ``ours - base`` in points (0/1 scores of two models on the same items, in the
    same order) with its paired bootstrap interval."""
    if len(ours) != len(base):
        raise ValueError(f"paired difference of {len(ours)} and {len(base)} scores: the items must be the same")
    point, low, high = bootstrap_mean_ci([100 * (a - b) for a, b in zip(ours, base, strict=True)], n=n, seed=seed)
    return {"points": point, "ci": [low, high]}


def table_key(row: dict) -> str:
    """The table row an item counts in: its domain for a world suite, else its suite."""
    suite = str(row.get("suite") or "")
    return str(row.get("domain")) if suite.startswith("world/") else suite


def domain_table(rows: list[dict], n: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per table row: ``n``, the student's and the reference's accuracy with intervals, % of reference."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(table_key(row), []).append(row)
    out: dict[str, dict] = {}
    for key, group in sorted(groups.items()):
        ours = [float(r["score"]) for r in group]
        ref = [float(r["reference_score"]) for r in group]
        out[key] = {"n": len(group), "ours": accuracy(ours, n, seed), "reference": accuracy(ref, n, seed),
                    "pct_of_reference": pct_entry(ours, ref, n, seed)}
    return out


def before_after(models: dict[str, list[dict]], n: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per table row: each model's accuracy with its interval, the rise of every later model over the first in
    points (``rise_<name>``, paired interval), the reference's accuracy and each model's % of reference.

    ``models``: name -> ``eval.run`` items, the baseline first (untrained, sft, distilled); all must hold the
    same items. The reference's scores are the baseline evaluation's."""
    names = list(models)
    by_id = {name: {str(r["id"]): r for r in rows} for name, rows in models.items()}
    for name in names[1:]:
        if set(by_id[name]) != set(by_id[names[0]]):
            differ = sorted(set(by_id[names[0]]) ^ set(by_id[name]))
            raise ValueError(f"evaluations {names[0]} and {name} hold different items, e.g. {differ[:3]}")
    groups: dict[str, list[str]] = {}
    for row in models[names[0]]:
        groups.setdefault(table_key(row), []).append(str(row["id"]))
    out: dict[str, dict] = {}
    for key, ids in sorted(groups.items()):
        scores = {name: [float(by_id[name][i]["score"]) for i in ids] for name in names}
        ref = [float(by_id[names[0]][i]["reference_score"]) for i in ids]
        entry: dict = {"n": len(ids), "reference": accuracy(ref, n, seed)}
        for name in names:
            entry[name] = accuracy(scores[name], n, seed)
        for name in names[1:]:
            entry[f"rise_{name}"] = paired_difference(scores[name], scores[names[0]], n=n, seed=seed)
        entry["pct_of_reference"] = {name: pct_entry(scores[name], ref, n, seed) for name in names}
        out[key] = entry
    return out
