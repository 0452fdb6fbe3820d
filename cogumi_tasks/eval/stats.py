""""% of reference" with a paired bootstrap interval, and the quality gates on it (judged by ``core.verdict``).

The student and the reference answer the same items, so items are resampled in pairs: each
bootstrap replicate draws n item indices with replacement and computes
``mean(ours) / mean(ref) * 100`` on them. The denominator is always the reference's measured
score on the same items, never a hard-coded baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALL = "all"


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
    None and an ``error``: the ratio is undefined, never 0%.
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


def check_gates(table: dict[str, dict], gates: dict[str, float]) -> list[GateResult]:
    """One result per gate (domain -> minimum % of reference), judged by :func:`cogumi_tasks.core.verdict.judge`:
    passed only when the interval's lower bound is above the threshold; an interval that straddles it is
    inconclusive and fails the gate too. A domain absent from the table, with no items, or without a defined
    pct is undefined and fails, saying why.
    """
    from cogumi_tasks.core.verdict import judge

    out = []
    for domain, threshold in sorted(gates.items()):
        entry = table.get(domain) or {}
        n = entry.get("n") or 0
        pct, ci = entry.get("pct") if n else None, entry.get("ci") if n else None
        why = (entry.get("error") or f"{domain}: % of reference undefined") if n else f"{domain}: no evaluated items"
        v = judge(pct, ">", threshold, ci, undefined_reason=why)
        if pct is None:
            shown = f"{why} (n={n})"
        else:
            span = f"95% CI {ci[0]:.1f}-{ci[1]:.1f}, " if ci else "no interval, "
            shown = f"{domain}: {pct:.1f}% of reference ({span}n={n})"
        out.append(GateResult(domain, threshold, math.nan if pct is None else float(pct),
                              tuple(float(x) for x in ci) if pct is not None and ci else (math.nan, math.nan),
                              v.met, f"{shown}, gate > {threshold:g}%: {v.verdict}", v.verdict, v.reason))
    return out
