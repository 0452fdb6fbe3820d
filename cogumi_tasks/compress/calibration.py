"""Confidence features of a model's own answers, temperature and Platt scaling, and expected calibration error.

The raw confidence of an answer is its geometric-mean token probability, ``exp(mean log p)``. Temperature
scaling divides its logit by one fitted T; Platt scaling fits ``sigmoid(a * logit + b)`` (scikit-learn's
logistic regression). Both are fitted on one half of the labelled items and scored on the other. The ECE of a
perfectly calibrated model on as many items (the floor) says what an ECE target can ask of that sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogumi_tasks.core.verdict import judge, num

EPS = 1e-6


def bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    """Each confidence's equal-width bin; exactly 1.0 falls in the last bin."""
    return np.minimum((conf * bins).astype(int), bins - 1)


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of (bin share) * |accuracy - mean confidence|.
    A confidence of exactly 1.0 falls in the last bin."""
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if conf.size == 0:
        return math.nan
    idx = bin_index(conf, bins)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(hit[mask].mean() - conf[mask].mean())
    return float(total)


def ece_ci(confidence: np.ndarray, correct: np.ndarray, bins: int = 10, n: int = 1000, seed: int = 0,
           alpha: float = 0.05) -> list[float]:
    """95% percentile bootstrap interval of :func:`ece` over items (the confidences held fixed). Resampling
    pushes ECE up on small sets (each bin's gap gets noisier), so the point estimate can sit near the low end."""
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if conf.size == 0:
        return [math.nan, math.nan]
    draws = np.random.default_rng(seed).integers(0, conf.size, size=(n, conf.size))
    # a bin's term (share * |accuracy - mean confidence|) is |sum(hit) - sum(conf)| / items: sum per (draw, bin)
    cell = (bin_index(conf, bins)[draws] + bins * np.arange(n)[:, None]).ravel()
    gap = (np.bincount(cell, hit[draws].ravel(), n * bins) - np.bincount(cell, conf[draws].ravel(), n * bins))
    values = np.abs(gap.reshape(n, bins)).sum(axis=1) / conf.size
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def ece_floor(confidence: np.ndarray, bins: int = 10, items: int | None = None, draws: int = 1000,
              seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model would score: each item's label drawn as a coin with its confidence as
    the chance of heads, ``draws`` times, over ``items`` confidences (resampled from ``confidence``; default its
    own size). On few items a binned ECE stays well above 0 however good the calibration (each bin's accuracy is a
    small-sample estimate), so this is the least an ECE target can ask of that many items.

    Returns ``items``, ``mean``, ``range90`` (5th-95th percentile of the draws) and ``draws`` (every value)."""
    conf = np.asarray(confidence, dtype=float)
    if conf.size == 0:
        return {"items": 0, "mean": math.nan, "range90": [math.nan, math.nan], "draws": []}
    rng = np.random.default_rng(seed)
    n = conf.size if items is None else items
    values = []
    for _ in range(draws):
        c = conf if items is None else conf[rng.integers(0, conf.size, n)]
        values.append(ece(c, rng.random(n) < c, bins))
    low, high = np.quantile(values, [0.05, 0.95])
    return {"items": int(n), "mean": float(np.mean(values)), "range90": [float(low), float(high)],
            "draws": [round(float(v), 5) for v in values]}


def items_for_ece(confidence: np.ndarray, target: float, bins: int = 10, max_items: int = 65536,
                  draws: int = 200, seed: int = 0) -> int | None:
    """The fewest test items, doubling from ``confidence``'s own count, at which a perfectly calibrated model with
    these confidences scores a mean ECE below ``target`` (:func:`ece_floor`); None past ``max_items``."""
    n = max(1, np.asarray(confidence).size)
    while n <= max_items:
        if ece_floor(confidence, bins, items=n, draws=draws, seed=seed)["mean"] < target:
            return n
        n *= 2
    return None


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Per non-empty bin: mean confidence, accuracy and count (the reliability diagram's points)."""
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    idx = bin_index(conf, bins)
    out: dict = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out["confidence"].append(round(float(conf[mask].mean()), 4))
            out["accuracy"].append(round(float(hit[mask].mean()), 4))
            out["count"].append(int(mask.sum()))
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def fit_temperature(confidence: np.ndarray, correct: np.ndarray) -> float:
    """T minimising the log loss of ``sigmoid(logit(c) / T)``, searched in [0.05, 20]."""
    from scipy.optimize import minimize_scalar

    z, y = _logit(confidence), np.asarray(correct, dtype=float)

    def nll(log_t: float) -> float:
        p = np.clip(_sigmoid(z / math.exp(log_t)), EPS, 1 - EPS)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


@dataclass
class Calibrator:
    """What the router applies to a raw confidence: ``method`` temperature (``t``) or platt (``a``, ``b``)."""

    method: str
    t: float = 1.0
    a: float = 1.0
    b: float = 0.0

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        z = _logit(confidence)
        return _sigmoid(z / self.t) if self.method == "temperature" else _sigmoid(self.a * z + self.b)


def fit_platt(confidence: np.ndarray, correct: np.ndarray) -> Calibrator:
    """Platt scaling; raises ValueError when the labels hold a single class (nothing to separate)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(correct, dtype=int)
    if len(set(y.tolist())) < 2:
        raise ValueError(f"Platt scaling needs both correct and wrong answers; all {len(y)} labels are {y[0]}")
    lr = LogisticRegression(C=1e4).fit(_logit(confidence).reshape(-1, 1), y)
    return Calibrator("platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


def split_halves(n: int, correct: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fit half and a test half, stratified by the label."""
    rng = np.random.default_rng(seed)
    fit, test = [], []
    for label in (0, 1):
        idx = np.flatnonzero(np.asarray(correct, dtype=int) == label)
        rng.shuffle(idx)
        fit += idx[: (len(idx) + 1) // 2].tolist()
        test += idx[(len(idx) + 1) // 2:].tolist()
    return np.array(sorted(fit), dtype=int), np.array(sorted(test), dtype=int)


def answer_features(gguf_path: Path, items: list[dict], hf_tokenizer_dir: Path) -> list[dict]:
    """Teacher-forced features of each item's own answer under the GGUF model: mean log-probability, mean
    max token probability, mean entropy (over the answer tokens), and the raw confidence exp(mean log p)."""
    from transformers import AutoTokenizer

    from cogumi_tasks.compress.gguf import load_gguf

    tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    llm = load_gguf(gguf_path, n_ctx=2048)
    out = []
    try:
        for item in items:
            prompt = tok.apply_chat_template(item["messages"], tokenize=False, add_generation_prompt=True)
            p_ids = tok.encode(prompt, add_special_tokens=False)
            a_ids = tok.encode(item["answer"], add_special_tokens=False)[:256] or [tok.eos_token_id]
            ids = (p_ids + a_ids)[-2000:]
            start = len(ids) - len(a_ids)
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[start - 1: len(ids) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            probs = np.exp(logp)
            token_lp = logp[np.arange(len(a_ids)), a_ids]
            mean_lp = float(token_lp.mean())
            out.append({"id": item["id"], "mean_logprob": mean_lp, "max_prob": float(probs.max(axis=1).mean()),
                        "entropy": float(-(probs * logp).sum(axis=1).mean()), "confidence": math.exp(mean_lp),
                        "tokens": len(a_ids)})
    finally:
        llm.close()
    return out


def calibrate(features: list[dict], correct: list[bool], bins: int = 10, seed: int = 0,
              target: float | None = None) -> dict:
    """Fit temperature and Platt scaling on one half, report ECE before/after on the other (with bootstrap
    intervals over the test items); choose the better. ``ece_floor`` is :func:`ece_floor` at the calibrated test
    confidences, with the share of its draws at or above the observed ECE and, given an ECE ``target``, the test
    items a perfectly calibrated model would need to score below it on average (:func:`items_for_ece`)."""
    conf = np.array([f["confidence"] for f in features], dtype=float)
    y = np.array(correct, dtype=int)
    fit, test = split_halves(len(y), y, seed)
    report: dict = {"items": int(len(y)), "correct": int(y.sum()), "fit_items": int(len(fit)),
                    "test_items": int(len(test)), "test_correct": int(y[test].sum()), "bins": bins,
                    "ece_before": ece(conf[test], y[test], bins), "reliability_before": reliability(conf[test], y[test],
                                                                                                   bins)}
    candidates = {"temperature": Calibrator("temperature", t=fit_temperature(conf[fit], y[fit]))}
    try:
        candidates["platt"] = fit_platt(conf[fit], y[fit])
    except ValueError as exc:
        report["platt_error"] = str(exc)
    for name, cal in candidates.items():
        report[f"ece_{name}"] = ece(cal(conf[test]), y[test], bins)
    best = min(candidates, key=lambda k: report[f"ece_{k}"])
    chosen = candidates[best]
    after = chosen(conf[test])
    report.update(method=best, calibrator=vars(chosen), ece_after=report[f"ece_{best}"],
                  ece_before_ci=ece_ci(conf[test], y[test], bins, seed=seed),
                  ece_after_ci=ece_ci(after, y[test], bins, seed=seed),
                  reliability_after=reliability(after, y[test], bins))
    floor = ece_floor(after, bins, seed=seed)
    report["ece_floor"] = {k: floor[k] for k in ("items", "mean", "range90")}
    # how often a perfectly calibrated model scores at least the observed ECE: small means miscalibrated
    report["ece_floor"]["share_at_least_observed"] = float(np.mean(np.array(floor["draws"]) >= report["ece_after"]))
    if target is not None:
        report["ece_floor"].update(items_for_target=items_for_ece(chosen(conf), target, bins, seed=seed),
                                   all_items=int(conf.size))
    return report


def floor_text(floor: dict, target: float) -> str:
    """One sentence on :func:`calibrate`'s ``ece_floor``: what a perfectly calibrated model scores on this many
    test items, how usual the observed ECE is for it, and how many items its mean needs to fall below ``target``."""
    low, high = floor["range90"]
    need = floor.get("items_for_target")
    return (f"a perfectly calibrated model with these confidences scores ECE {num(floor['mean'])} on "
            f"{floor['items']} test items (90% of draws {num(low)}-{num(high)}) and at least the observed ECE in "
            f"{floor['share_at_least_observed']:.0%} of draws; its mean first falls below {num(target)} at "
            + (f"{need} test items (sizes doubled from the {floor['all_items']} calibration items)" if need
               else "no size up to 65,536 test items"))


def ece_gate(report: dict, max_ece: float) -> dict:
    """:func:`calibrate`'s ECE after calibration judged ``< max_ece`` on its interval (``core.verdict.judge``), with
    the figure, interval and check beside the verdict (the run report shows it as judged here) and
    :func:`floor_text` added to the reason. ``report`` must come from ``calibrate(..., target=max_ece)``."""
    gate = judge(report["ece_after"], "<", max_ece, ci=report["ece_after_ci"])
    return {"value": report["ece_after"], "ci": report["ece_after_ci"], "check": {"op": "<", "value": max_ece},
            "verdict": gate.verdict, "reason": f"{gate.reason}; {floor_text(report['ece_floor'], max_ece)}"}
