"""The one rule by which every target of a run is judged: met, inconclusive, not met or undefined.

A figure measured on a sample comes with an interval ``(low, high)``. The target is **met** only when the
whole interval satisfies it (for ``>``/``>=`` the lower bound clears it, for ``<``/``<=`` the upper bound
does); **not met** when no point of the interval satisfies it; **inconclusive** when the interval straddles
it. A figure without an interval (a file size, a configured value: no sampling noise) is compared directly, and the
reason says so. A figure that cannot be computed (a ratio to a reference that scored 0, a share of an empty set) is
**undefined**: never 0%, never met (a gate "score > k% of the reference" whose reference solved nothing is judged on
the score instead, by ``eval.stats.judge_pct_of_reference``).

Figures the plan wrote for its 8B base (sizes in GB or MB) are compared as the plan's ratio to its starting
size (:func:`judge_plan_ratio`), with the absolute figure that ratio gives for the configured base beside it.
Used by the evaluation gates (``eval.gate``), the Phase 2 size table (``compress.publish``) and the run report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MET, INCONCLUSIVE, NOT_MET, UNDEFINED = "met", "inconclusive", "not met", "undefined"
VERDICTS = (MET, INCONCLUSIVE, NOT_MET, UNDEFINED)
OPS = (">", ">=", "<", "<=", "==", "between")


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    reason: str

    @property
    def met(self) -> bool:
        return self.verdict == MET

    def as_dict(self) -> dict[str, str]:
        return {"verdict": self.verdict, "reason": self.reason}


def num(v: float) -> str:
    """A figure as verdict reasons print it: whole numbers as they are, others to 4 significant digits."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def target_text(op: str, target: float | tuple[float, float] | list[float]) -> str:
    """``"> 70"``, ``"between 89 and 91"``."""
    if op == "between":
        lo, hi = target
        return f"between {num(lo)} and {num(hi)}"
    return f"{op} {num(float(target))}"


def _holds(op: str, v: float, target: Any) -> bool:
    if op == "between":
        return target[0] <= v <= target[1]
    if op == "==":
        return math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12)
    return {">": v > target, ">=": v >= target, "<": v < target, "<=": v <= target}[op]


def _bad(v: Any) -> bool:
    return v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v)


def judge(value: float | None, op: str, target: float | tuple[float, float] | list[float],
          ci: tuple[float, float] | list[float] | None = None, undefined_reason: str | None = None) -> Verdict:
    """The verdict on ``value op target``, with ``ci`` its interval when it was measured on a sample.

    ``value`` None or NaN is undefined (``undefined_reason`` says why). Raises ValueError on an unknown op,
    a malformed target or an interval whose low bound exceeds its high one.
    """
    if op not in OPS:
        raise ValueError(f"unknown comparison {op!r}; expected one of {', '.join(OPS)}")
    pair = isinstance(target, list | tuple)
    if pair != (op == "between") or (pair and (len(target) != 2 or any(map(_bad, target)))) or (
            not pair and _bad(target)):
        shape = "[low, high]" if op == "between" else "a number"
        raise ValueError(f"target for {op!r} must be {shape}, got {target!r}")
    want = target_text(op, target)
    if _bad(value):
        why = undefined_reason or f"the figure is undefined ({value!r})"
        return Verdict(UNDEFINED, f"{why}; target {want} cannot be judged")
    value = float(value)
    if ci is None:
        ok = _holds(op, value, target)
        return Verdict(MET if ok else NOT_MET,
                       f"{num(value)} {want}: {'yes' if ok else 'no'} (a single figure without an interval, "
                       "compared directly)")
    if len(ci) != 2 or _bad(ci[0]) or _bad(ci[1]):
        return Verdict(UNDEFINED, f"{num(value)} with an unusable interval {ci!r}; target {want} cannot be judged")
    low, high = float(ci[0]), float(ci[1])
    if low > high:
        raise ValueError(f"interval low {low} > high {high}")
    span = f"{num(value)} (95% CI {num(low)}-{num(high)})"
    if op == "between":
        lo, hi = target
        all_ok, none_ok = lo <= low and high <= hi, high < lo or low > hi
    elif op == "==":
        all_ok, none_ok = _holds(op, low, target) and _holds(op, high, target), not low <= target <= high
    elif op in (">", ">="):  # the lower bound decides "met", the upper one "not met"
        all_ok, none_ok = _holds(op, low, target), not _holds(op, high, target)
    else:
        all_ok, none_ok = _holds(op, high, target), not _holds(op, low, target)
    if all_ok:
        bound = {">": f"lower bound {num(low)}", ">=": f"lower bound {num(low)}", "<": f"upper bound {num(high)}",
                 "<=": f"upper bound {num(high)}"}.get(op, "whole interval")
        return Verdict(MET, f"{span}: the {bound} clears {want}")
    if none_ok:
        return Verdict(NOT_MET, f"{span}: the whole interval fails {want}")
    return Verdict(INCONCLUSIVE, f"{span}: the interval straddles the target ({want}); the sample cannot tell")


def judge_plan_ratio(measured: float | None, measured_start: float | None, plan: float, plan_start: float,
                     op: str = "<=", unit: str = "GB") -> Verdict:
    """Judge a figure the plan wrote for its own base as the plan's ratio ``plan / plan_start``.

    ``measured / measured_start`` is compared with that ratio (sizes on disk: no interval, compared directly);
    the reason shows both absolute figures and the plan's ratio applied to the configured base.
    """
    plan_ratio = plan / plan_start
    want = f"the plan's {num(plan)}/{num(plan_start)} {unit} = {num(plan_ratio)} x start"
    if _bad(measured) or _bad(measured_start) or not measured_start:
        return judge(None, op, plan_ratio,
                     undefined_reason=f"measured {measured!r} of start {measured_start!r}: ratio undefined ({want})")
    got, start = float(measured), float(measured_start)
    ratio = got / start
    base = judge(ratio, op, plan_ratio)
    return Verdict(base.verdict,
                   f"{num(got)} {unit} = {num(ratio)} x start ({num(start)} {unit}) {op} {want} "
                   f"(= {num(plan_ratio * start)} {unit} for this base): {'yes' if base.met else 'no'} "
                   "(sizes on disk: no interval, compared directly)")
