"""% of reference with a paired bootstrap, and the gates on it: hand-computed cases."""

from __future__ import annotations

import math

import pytest

from cogumi_tasks.eval.stats import bootstrap_ratio_ci, check_gates, pct_of_reference


def test_point_is_ratio_of_means():
    point, low, high = bootstrap_ratio_ci([1, 0, 1, 1], [1, 1, 1, 1])
    assert point == pytest.approx(75.0)
    # every replicate has ref mean 1 and ours mean in {0, .25, .5, .75, 1}
    assert 0.0 <= low <= point <= high <= 100.0
    assert low in (0.0, 25.0, 50.0, 75.0) and high in (75.0, 100.0)


def test_ratio_can_exceed_100_and_uses_measured_reference():
    point, low, high = bootstrap_ratio_ci([1, 1, 1, 0], [1, 0, 1, 0])
    assert point == pytest.approx(150.0)  # 0.75 / 0.5
    assert low <= point <= high


def test_fractional_scores():
    point, *_ = bootstrap_ratio_ci([0.5, 0.25], [1.0, 0.5])
    assert point == pytest.approx(0.375 / 0.75 * 100)


def test_deterministic_with_seed_and_varies_without():
    ours, ref = [1, 0, 1, 1, 0, 1, 0, 1], [1, 1, 1, 0, 1, 1, 1, 1]
    assert bootstrap_ratio_ci(ours, ref, seed=3) == bootstrap_ratio_ci(ours, ref, seed=3)
    cis = {bootstrap_ratio_ci(ours, ref, n=200, seed=s)[1:] for s in range(5)}
    assert len(cis) > 1


def test_identical_scores_give_a_degenerate_interval():
    assert bootstrap_ratio_ci([1, 0, 1], [1, 0, 1]) == pytest.approx((100.0, 100.0, 100.0))


def test_zero_reference_raises_clearly():
    with pytest.raises(ValueError, match="reference scored 0; % of reference undefined"):
        bootstrap_ratio_ci([1, 0], [0, 0])
    with pytest.raises(ValueError, match="paired"):
        bootstrap_ratio_ci([1, 0], [1])


def test_pct_of_reference_per_domain_and_all():
    rows = [
        {"id": "c1", "domain": "code", "ours": 1, "reference": 1},
        {"id": "c2", "domain": "code", "ours": 0, "reference": 1},
        {"id": "r1", "domain": "reasoning", "ours": 1, "reference": 1},
        {"id": "r2", "domain": "reasoning", "ours": 1, "reference": 0},
    ]
    table = pct_of_reference(rows, n=500, seed=1)
    assert set(table) == {"code", "reasoning", "all"}
    assert table["code"]["pct"] == pytest.approx(50.0)
    assert table["code"]["ours"] == 0.5 and table["code"]["reference"] == 1.0 and table["code"]["n"] == 2
    assert table["reasoning"]["pct"] == pytest.approx(200.0)
    assert table["all"]["pct"] == pytest.approx(0.75 / 0.75 * 100) and table["all"]["n"] == 4
    for entry in table.values():
        low, high = entry["ci"]
        assert low <= entry["pct"] <= high


def test_pct_domain_with_zero_reference_is_marked_not_raised():
    rows = [{"id": "a", "domain": "code", "ours": 1, "reference": 0},
            {"id": "b", "domain": "general", "ours": 1, "reference": 1}]
    table = pct_of_reference(rows)
    assert table["code"]["pct"] is None and "reference scored 0" in table["code"]["error"]
    assert table["general"]["pct"] == 100.0
    everywhere = pct_of_reference([{"id": "a", "domain": "code", "ours": 1, "reference": 0}])
    assert everywhere["all"]["pct"] is None and everywhere["all"]["error"].startswith("all: reference scored 0")


def test_gates_met_not_met_and_inconclusive_messages():
    table = {"code": {"pct": 41.23, "ci": [30.14, 52.31], "n": 20, "ours": 0.3, "reference": 0.7},
             "reasoning": {"pct": 100.0, "ci": [0.0, 300.0], "n": 10, "ours": 0.1, "reference": 0.1},
             "automation": {"pct": 88.0, "ci": [76.0, 97.5], "n": 30, "ours": 0.88, "reference": 1.0}}
    results = {g.domain: g for g in check_gates(table, {"code": 72, "reasoning": 70, "automation": 75})}
    assert not results["code"].passed and results["code"].verdict == "not met"
    assert results["code"].message == "code: 41.2% of reference (95% CI 30.1-52.3, n=20), gate > 72%: not met"
    assert results["code"].ci == (30.14, 52.31)
    # the demo's "100 (CI 0-300), met": a point above the gate with an interval straddling it is not a pass
    assert not results["reasoning"].passed and results["reasoning"].verdict == "inconclusive"
    assert results["reasoning"].message.endswith("gate > 70%: inconclusive")
    assert "straddles the target (> 70)" in results["reasoning"].reason
    assert results["automation"].passed and results["automation"].verdict == "met"
    assert results["automation"].reason == "88 (95% CI 76-97.5): the lower bound 76 clears > 75"


def test_gate_needs_the_lower_bound_strictly_above():
    table = {"code": {"pct": 90.0, "ci": [72.0, 99.0], "n": 5}}
    assert check_gates(table, {"code": 72})[0].verdict == "inconclusive"
    assert check_gates(table, {"code": 71.9})[0].passed


def test_gate_on_missing_or_undefined_domain_fails():
    table = {"code": {"pct": None, "ci": None, "n": 3, "error": "code: reference scored 0; % of reference undefined"},
             "general": {"pct": 90.0, "ci": [80.0, 100.0], "n": 4}}
    results = {g.domain: g for g in check_gates(table, {"automation": 75, "code": 72})}
    assert not results["automation"].passed and "no evaluated items" in results["automation"].message
    assert math.isnan(results["automation"].pct) and results["automation"].verdict == "undefined"
    assert not results["code"].passed and "reference scored 0" in results["code"].message
    assert results["code"].verdict == "undefined" and results["code"].message.endswith("gate > 72%: undefined")
    assert check_gates(table, {}) == []


def test_gate_against_a_reference_that_solved_nothing_is_judged_on_the_score():
    rows = ([{"id": f"r{i}", "domain": "reasoning", "ours": int(i < 12), "reference": 0} for i in range(20)]
            + [{"id": f"a{i}", "domain": "automation", "ours": 0, "reference": 0} for i in range(20)]
            + [{"id": f"c{i}", "domain": "code", "ours": int(i < 1), "reference": 0} for i in range(20)])
    table = pct_of_reference(rows, n=500, seed=1)
    assert table["reasoning"]["pct"] is None and table["reasoning"]["ci"] is None  # the ratio stays undefined
    low, high = table["reasoning"]["score_ci"]
    assert 0 < low < 0.6 < high <= 1
    results = {g.domain: g for g in check_gates(table, {"reasoning": 70, "automation": 75, "code": 1000})}
    assert results["reasoning"].passed and results["reasoning"].verdict == "met"
    assert "score above 0" in results["reasoning"].reason and "reference 0" in results["reasoning"].message
    assert math.isnan(results["reasoning"].pct)
    # a model that also solved nothing passes no gate, and one solved item out of 20 cannot tell
    assert results["automation"].verdict == "not met" and not results["automation"].passed
    assert results["code"].verdict == "inconclusive"


def test_pct_of_reference_gate_keeps_the_ratio_rule_when_the_reference_solved_something():
    from cogumi_tasks.eval.stats import judge_pct_of_reference
    from cogumi_tasks.eval.tables import pct_entry

    entry = pct_entry([1, 1, 1, 0], [1, 1, 0, 1], n=300, seed=0)
    assert "score_ci" not in entry and entry["pct"] == pytest.approx(100.0)
    assert judge_pct_of_reference(entry, ">=", 100).verdict == "inconclusive"
    zero = pct_entry([1, 1, 1, 1], [0, 0, 0, 0], n=300, seed=0)
    assert zero["pct"] is None and zero["score_ci"] == [1.0, 1.0] and zero["ours"] == 1.0
    # ">=" k% of 0 would hold for any score; the gate still asks for a score above 0
    assert judge_pct_of_reference(zero, ">=", 100).verdict == "met"
    nothing = pct_entry([0, 0], [0, 0])
    assert judge_pct_of_reference(nothing, ">=", 100).verdict == "not met"
    assert pct_entry([], []) == {"pct": None, "ci": None, "why": "undefined (no items)"}
    assert judge_pct_of_reference(pct_entry([], []), ">", 70).verdict == "undefined"


def test_decode_rate_counts_tokens_after_the_first_over_first_to_last_seconds():
    from cogumi_tasks.serve.deploy import decode_rate

    answers = [{"completion_tokens": 11, "seconds": 1.0, "decode_s": 0.2},
               {"completion_tokens": 21, "seconds": 2.0, "decode_s": 0.4},
               {"completion_tokens": 1, "seconds": 0.5, "decode_s": 0.0},  # one token: no decode interval
               {"completion_tokens": 9, "seconds": 0.5, "decode_s": None}]  # not timed (an older gateway)
    out = decode_rate(answers)
    assert out["answers_timed"] == 2
    assert out["decode"] == 50.0 and out["decode_ci"] == [50.0, 50.0]  # (10 + 20) / (0.2 + 0.4), both at 50/s
    assert out["median_end_to_end"] == 10.75  # median of 11, 10.5, 2 and 18 tokens per request second
    none = decode_rate([{"completion_tokens": 0, "seconds": 1.0, "decode_s": None}])
    assert none["decode"] is None and none["decode_ci"] is None and none["median_end_to_end"] is None
