""""% of reference" with a paired bootstrap interval, and the quality gates on it (judged by ``core.verdict``).

The student and the reference answer the same items, so items are resampled in pairs: each
bootstrap replicate draws n item indices with replacement and computes
``mean(ours) / mean(ref) * 100`` on them. The denominator is always the reference's measured
score on the same items, never a hard-coded baseline.

A reference that solved none of its items leaves the ratio undefined (printed so, never 0%), but not a gate
"score > k% of the reference": k% of 0 is 0, so such a gate is judged on the score itself, met only when the
score's interval clears 0 (:func:`judge_pct_of_reference`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALL = "all"


def bootstrap_mean_ci(values: Sequence[float], n: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high) of ``mean(values)``, percentile interval of a bootstrap over items. Per-item
    differences of two models on the same items give the paired interval of the difference."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("no items: mean undefined")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n, v.size))
    low, high = np.quantile(v[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(low), float(high)


def bootstrap_ratio_ci(ours: Sequence[float], ref: Sequence[float], n: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high) of ``mean(ours) / mean(ref) * 100``, percentile interval of a paired bootstrap.

    Replicates whose resampled reference mean is 0 are dropped (the ratio is undefined there).
    Raises ValueError when the lists differ in length, are empty, or the reference scored 0.
    """
    o, r = np.asarray(ours, dtype=float), np.asarray(ref, dtype=float)
    if o.shape != r.shape or o.ndim != 1:
        raise ValueError(f"ours and ref must be paired 1-d lists (got {o.shape} and {r.shape})")
    if o.size == 0:
        raise ValueError("no items: % of reference undefined")
    if r.mean() == 0:
        raise ValueError("reference scored 0; % of reference undefined")
    point = float(o.mean() / r.mean() * 100)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, o.size, size=(n, o.size))
    num, den = o[idx].mean(axis=1), r[idx].mean(axis=1)
    keep = den > 0
    if not keep.any():
        return point, point, point
    ratios = num[keep] / den[keep] * 100
    low, high = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)


def pct_of_reference(per_item: list[dict], domain_key: str = "domain", n: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, dict]:
    """Per domain and ``"all"``: ``{"ours", "reference", "pct", "ci": [low, high], "n"}``.

    Rows carry ``ours`` and ``reference`` scores (0/1 or fractions) for the same item. A domain
    (``"all"`` included) whose reference scored 0, or that has no items, gets ``pct`` and ``ci`` of
    None and an ``error``: the ratio is undefined, never 0%. A domain whose reference scored 0 also gets
    ``score_ci``, the interval of ``ours`` (0-1), on which its gates are judged.
    """
    groups: dict[str, list[dict]] = {}
    for row in per_item:
        groups.setdefault(str(row[domain_key]), []).append(row)
    groups[ALL] = list(per_item)
    table: dict[str, dict] = {}
    for domain, rows in sorted(groups.items()):
        ours = [float(x["ours"]) for x in rows]
        ref = [float(x["reference"]) for x in rows]
        entry: dict = {"ours": float(np.mean(ours)) if rows else math.nan,
                       "reference": float(np.mean(ref)) if rows else math.nan, "n": len(rows)}
        try:
            point, low, high = bootstrap_ratio_ci(ours, ref, n=n, seed=seed, alpha=alpha)
        except ValueError as exc:
            entry.update(pct=None, ci=None, error=f"{domain}: {exc}")
            if rows:
                entry["score_ci"] = list(bootstrap_mean_ci(ours, n=n, seed=seed, alpha=alpha)[1:])
        else:
            entry.update(pct=point, ci=[low, high])
        table[domain] = entry
    return table


@dataclass
class GateResult:
    domain: str
    threshold: float
    pct: float
    ci: tuple[float, float]
    passed: bool  # the verdict is "met"
    message: str
    verdict: str
    reason: str


def judge_pct_of_reference(entry: dict, op: str, target: float, undefined_reason: str | None = None):
    """The verdict (:class:`cogumi_tasks.core.verdict.Verdict`) on the gate ``score op target % of the reference``.

    ``entry`` is a % of reference entry (``pct``, ``ci``; :func:`pct_of_reference` or ``tables.pct_entry``). With a
    defined ``pct`` the gate is judged on it and its interval. Where the reference solved none of the items
    (``pct`` None and ``score_ci`` present) the ratio stays undefined, but ``target`` % of 0 is 0: the gate is judged
    as ``score > 0`` on the score's interval (strictly, for ``>=`` as well: a score of 0 passes no gate), and the
    reason says so. Anything else without a ``pct`` is undefined (``undefined_reason`` or the entry's own).
    """
    from cogumi_tasks.core.verdict import Verdict, judge, num

    why = undefined_reason or entry.get("error") or entry.get("why") or "% of reference undefined"
    score_ci = entry.get("score_ci")
    if entry.get("pct") is not None or not score_ci:
        return judge(entry.get("pct"), op, target, entry.get("ci"), undefined_reason=why)
    low, high = (100 * float(x) for x in score_ci)
    point = 100 * float(entry["ours"])
    v = judge(point, ">", 0.0, [low, high])
    return Verdict(v.verdict, f"{why}: {num(target)}% of a reference that solved nothing is 0, so the gate "
                              f"({op} {num(target)}% of reference) asks for a score above 0; score in % {v.reason}")


def check_gates(table: dict[str, dict], gates: dict[str, float]) -> list[GateResult]:
    """One result per gate (domain -> minimum % of reference), judged by :func:`cogumi_tasks.core.verdict.judge`:
    passed only when the interval's lower bound is above the threshold; an interval that straddles it is
    inconclusive and fails the gate too. A domain whose reference solved nothing is judged on its score
    (:func:`judge_pct_of_reference`). A domain absent from the table, with no items, or otherwise without a defined
    pct is undefined and fails, saying why.
    """
    out = []
    for domain, threshold in sorted(gates.items()):
        entry = table.get(domain) or {}
        n = entry.get("n") or 0
        pct, ci = entry.get("pct") if n else None, entry.get("ci") if n else None
        why = (entry.get("error") or f"{domain}: % of reference undefined") if n else f"{domain}: no evaluated items"
        v = judge_pct_of_reference(entry if n else {}, ">", threshold, undefined_reason=why)
        if pct is None and n and entry.get("score_ci"):
            low, high = (100 * x for x in entry["score_ci"])
            shown = (f"{domain}: score {100 * entry['ours']:.1f}% (95% CI {low:.1f}-{high:.1f}), reference 0, % of "
                     f"reference undefined (n={n})")
        elif pct is None:
            shown = f"{why} (n={n})"
        else:
            span = f"95% CI {ci[0]:.1f}-{ci[1]:.1f}, " if ci else "no interval, "
            shown = f"{domain}: {pct:.1f}% of reference ({span}n={n})"
        out.append(GateResult(domain, threshold, math.nan if pct is None else float(pct),
                              tuple(float(x) for x in ci) if pct is not None and ci else (math.nan, math.nan),
                              v.met, f"{shown}, gate > {threshold:g}%: {v.verdict}", v.verdict, v.reason))
    return out
