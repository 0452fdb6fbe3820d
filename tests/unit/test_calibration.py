"""Calibration maths on hand-computed cases: ECE, reliability bins, temperature and Platt scaling."""

from __future__ import annotations

import numpy as np
import pytest

from cogumi_tasks.compress.calibration import (
    Calibrator,
    calibrate,
    ece,
    ece_ci,
    ece_floor,
    fit_platt,
    fit_temperature,
    floor_text,
    items_for_ece,
    reliability,
    split_halves,
)


def test_ece_matches_a_hand_computed_case():
    conf = [0.1, 0.15, 0.85, 0.95, 0.55]
    correct = [0, 1, 1, 1, 0]
    # bin [0.1,0.2): acc 0.5, conf 0.125 -> 0.375 * 2/5 = 0.15; bin [0.5,0.6): 0.55 * 1/5 = 0.11
    # bin [0.8,0.9): 0.15 * 1/5 = 0.03; bin [0.9,1.0]: 0.05 * 1/5 = 0.01
    assert ece(conf, correct, bins=10) == pytest.approx(0.30)
    assert reliability(conf, correct, bins=10) == {"confidence": [0.125, 0.55, 0.85, 0.95],
                                                   "accuracy": [0.5, 0.0, 1.0, 1.0], "count": [2, 1, 1, 1]}


def test_ece_edges():
    assert ece([1.0, 1.0], [1, 1]) == 0.0  # 1.0 lands in the last bin
    assert ece([0.0, 0.0], [0, 0]) == 0.0
    assert ece([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0)
    assert ece([0.9] * 4, [0] * 4, bins=5) == pytest.approx(0.9)
    assert np.isnan(ece([], []))


def test_ece_interval_is_ordered_deterministic_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    widths = []
    for n in (48, 960):
        conf = rng.uniform(0, 1, n)
        hit = (rng.uniform(0, 1, n) < conf).astype(int)  # calibrated by construction
        low, high = ece_ci(conf, hit, seed=3)
        assert 0 <= low <= high <= 1 and ece_ci(conf, hit, seed=3) == [low, high]
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert ece_ci(np.array([0.9, 0.9]), np.array([1, 1])) == [pytest.approx(0.1), pytest.approx(0.1)]
    assert all(np.isnan(ece_ci([], [])))


def test_temperature_softens_an_overconfident_score():
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.05, 0.95, 4000)
    y = (rng.uniform(size=true_p.size) < true_p).astype(int)
    z = np.log(true_p / (1 - true_p))
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits three times too large
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.15)
    cal = Calibrator("temperature", t=t)
    assert ece(cal(overconfident), y) < ece(overconfident, y) / 3


def test_platt_fits_and_refuses_a_single_class():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.01, 0.99, 2000)
    y = (rng.uniform(size=conf.size) < 0.2 + 0.3 * conf).astype(int)  # badly calibrated score
    cal = fit_platt(conf, y)
    assert ece(cal(conf), y) < 0.03 < ece(conf, y)
    with pytest.raises(ValueError, match="all 3 labels are 0"):
        fit_platt(np.array([0.2, 0.4, 0.6]), np.array([0, 0, 0]))


def test_split_is_stratified_and_disjoint():
    y = np.array([0] * 10 + [1] * 4)
    fit, test = split_halves(len(y), y)
    assert sorted(fit.tolist() + test.tolist()) == list(range(14))
    assert y[fit].sum() == 2 and y[test].sum() == 2


def test_calibrate_reports_before_after_and_picks_the_better():
    rng = np.random.default_rng(2)
    conf = rng.uniform(0.3, 0.99, 400)
    y = (rng.uniform(size=conf.size) < conf - 0.25).astype(int)
    report = calibrate([{"confidence": c} for c in conf], y.tolist(), bins=10)
    assert report["ece_after"] == min(report["ece_temperature"], report["ece_platt"]) < report["ece_before"]
    assert report["method"] in ("temperature", "platt") and report["test_items"] + report["fit_items"] == 400
    assert sum(report["reliability_after"]["count"]) == report["test_items"]
    for key in ("ece_before_ci", "ece_after_ci"):
        low, high = report[key]
        assert 0 <= low <= high <= 1
    assert report["ece_after_ci"][1] < report["ece_before_ci"][0]  # 200 test items tell the two apart


def test_ece_interval_agrees_with_ece_on_each_draw():
    """The vectorised bootstrap computes the same ECE as :func:`ece` on each resample."""
    rng = np.random.default_rng(5)
    conf, hit = rng.uniform(0, 1, 30), rng.integers(0, 2, 30)
    draws = np.random.default_rng(7).integers(0, 30, size=(200, 30))
    by_hand = np.quantile([ece(conf[d], hit[d]) for d in draws], [0.025, 0.975])
    assert ece_ci(conf, hit, n=200, seed=7) == pytest.approx(by_hand.tolist())


def test_ece_floor_is_the_ece_of_coin_flips_at_the_stated_confidences():
    """At a constant confidence of 0.5 every item sits in one bin, so a calibrated model's ECE is |heads/n - 0.5|,
    whose mean is sqrt(0.25 / n) * sqrt(2 / pi) = 0.0399 at n = 100 and 0.0126 at n = 1000."""
    assert ece_floor(np.full(100, 0.5), draws=2000)["mean"] == pytest.approx(0.0399, abs=0.003)
    thousand = ece_floor(np.full(10, 0.5), items=1000, draws=2000)
    assert thousand["items"] == 1000 and thousand["mean"] == pytest.approx(0.0126, abs=0.001)
    low, high = thousand["range90"]
    assert low < thousand["mean"] < high and len(thousand["draws"]) == 2000
    assert ece_floor(np.array([0.0, 1.0] * 20))["mean"] == 0.0  # certain answers: nothing to draw
    assert ece_floor(np.full(50, 0.5), seed=4) == ece_floor(np.full(50, 0.5), seed=4)
    # mean below 0.05 needs n > (0.3989 / 0.05)^2 = 63.7: doubling from 10 tries 10, 20, 40, 80
    assert items_for_ece(np.full(10, 0.5), 0.05) == 80
    assert items_for_ece(np.full(10, 0.5), 0.001, max_items=5000) is None


def test_calibrate_reports_the_floor_and_its_sentence():
    rng = np.random.default_rng(6)
    conf = rng.uniform(0.05, 0.95, 96)
    y = (rng.uniform(size=conf.size) < conf).astype(int)  # calibrated by construction
    report = calibrate([{"confidence": c} for c in conf], y.tolist(), target=0.05)
    floor = report["ece_floor"]
    assert floor["items"] == report["test_items"] and floor["all_items"] == 96
    assert floor["mean"] > 0.05 and floor["items_for_target"] > 96  # 48 test items cannot show ECE < 0.05
    assert 0.05 < floor["share_at_least_observed"] <= 1  # an observed ECE a calibrated model often reaches
    after = Calibrator(**report["calibrator"])(conf[split_halves(96, y)[1]])
    draws = np.array(ece_floor(after)["draws"])
    assert floor["share_at_least_observed"] == np.mean(draws >= report["ece_after"]) < 1
    text = floor_text(floor, 0.05)
    assert f"on {floor['items']} test items" in text and f"at {floor['items_for_target']} test items" in text
    assert "items_for_target" not in calibrate([{"confidence": c} for c in conf], y.tolist())["ece_floor"]
