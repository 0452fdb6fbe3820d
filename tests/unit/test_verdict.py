"""The one verdict rule: met only when the whole interval clears the target, inconclusive when it straddles it,
not met when none of it does, undefined when the figure cannot be computed; plan sizes judged as ratios."""

from __future__ import annotations

import math

import pytest

from cogumi_tasks.core.verdict import INCONCLUSIVE, MET, NOT_MET, UNDEFINED, judge, judge_plan_ratio


@pytest.mark.parametrize(("op", "ci", "verdict"), [
    (">", (78.0, 92.0), MET),
    (">", (0.0, 300.0), INCONCLUSIVE),  # the demo's "reasoning > 70%: 100 (CI 0-300)"
    (">", (70.0, 90.0), INCONCLUSIVE),  # the lower bound equals the target: not cleared
    (">", (50.0, 70.0), NOT_MET),
    (">=", (70.0, 90.0), MET),
    (">=", (50.0, 69.9), NOT_MET),
    ("<", (10.0, 69.0), MET),
    ("<", (60.0, 80.0), INCONCLUSIVE),
    ("<", (70.0, 80.0), NOT_MET),
    ("<=", (60.0, 70.0), MET),
    ("<=", (70.5, 80.0), NOT_MET),
])
def test_interval_decides_both_directions(op, ci, verdict):
    v = judge(75.0, op, 70, ci)
    assert v.verdict == verdict, v.reason
    assert v.met is (verdict == MET)
    assert "95% CI" in v.reason


def test_reasons_name_the_bound_and_the_target():
    assert judge(80, ">", 70, (72, 90)).reason == "80 (95% CI 72-90): the lower bound 72 clears > 70"
    assert judge(0.03, "<", 0.05, (0.01, 0.04)).reason == "0.03 (95% CI 0.01-0.04): the upper bound 0.04 clears < 0.05"
    assert judge(100, ">", 70, (0, 300)).reason == (
        "100 (95% CI 0-300): the interval straddles the target (> 70); the sample cannot tell")
    assert judge(60, ">", 70, (50, 65)).reason == "60 (95% CI 50-65): the whole interval fails > 70"


def test_between_and_equal():
    assert judge(90, "between", [89, 91], (89.5, 90.5)).verdict == MET
    assert judge(90, "between", [89, 91], (85, 95)).verdict == INCONCLUSIVE
    assert judge(80, "between", [89, 91], (75, 85)).verdict == NOT_MET
    assert judge(95, "between", [89, 91], (92, 99)).verdict == NOT_MET
    assert judge(0.8, "==", 0.8).verdict == MET
    assert judge(0.7, "==", 0.8).verdict == NOT_MET
    assert judge(0.8, "==", 0.8, (0.7, 0.9)).verdict == INCONCLUSIVE


def test_without_an_interval_the_figure_is_compared_directly_and_says_so():
    met, not_met = judge(0.04, "<", 0.05), judge(0.5381, "<=", 0.35)
    assert met.verdict == MET and not_met.verdict == NOT_MET
    for v in (met, not_met):
        assert "without an interval, compared directly" in v.reason
    assert not_met.reason.startswith("0.5381 <= 0.35: no")


@pytest.mark.parametrize("value", [None, math.nan])
def test_undefined_is_never_met_nor_zero(value):
    v = judge(value, ">", 70, None, undefined_reason="reasoning: reference scored 0; % of reference undefined")
    assert v.verdict == UNDEFINED and not v.met
    assert v.reason.startswith("reasoning: reference scored 0") and "0%" not in v.reason
    assert judge(75.0, ">", 70, (math.nan, 80.0)).verdict == UNDEFINED


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown comparison"):
        judge(1, "~", 1)
    with pytest.raises(ValueError, match="must be \\[low, high\\]"):
        judge(1, "between", 1)
    with pytest.raises(ValueError, match="must be a number"):
        judge(1, ">", [1, 2])
    with pytest.raises(ValueError, match="low 5.0 > high 1.0"):
        judge(3, ">", 1, (5, 1))


def test_plan_sizes_are_compared_as_the_plans_ratio():
    # the demo's "10 GB -> 3.5 GB: 0.5381, met": a dense pruned 135M model is the size of its start
    v = judge_plan_ratio(0.5381, 0.5381, 3.5, 10.0)
    assert v.verdict == NOT_MET
    assert v.reason == ("0.5381 GB = 1 x start (0.5381 GB) <= the plan's 3.5/10 GB = 0.35 x start "
                        "(= 0.1883 GB for this base): no (sizes on disk: no interval, compared directly)")
    assert judge_plan_ratio(0.18, 0.5381, 3.5, 10.0).verdict == MET  # 0.334 x start
    assert judge_plan_ratio(0.19, 0.5381, 3.5, 10.0).verdict == NOT_MET  # 0.353 x start, under 3.5 GB all the same
    assert judge_plan_ratio(6.0, 100.0, 668, 10_000, unit="MB").verdict == MET  # 0.06 <= 0.0668


def test_plan_ratio_of_a_missing_stage_is_undefined():
    for measured, start in ((None, 0.5), (0.2, None), (0.2, 0)):
        v = judge_plan_ratio(measured, start, 0.9, 10.0)
        assert v.verdict == UNDEFINED and "ratio undefined" in v.reason
