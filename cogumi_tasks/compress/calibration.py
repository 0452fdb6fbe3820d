"""Confidence features of a model's own answers, temperature and Platt scaling, and expected calibration error.

The raw confidence of an answer is its geometric-mean token probability, ``exp(mean log p)``. Temperature
scaling divides its logit by one fitted T; Platt scaling fits ``sigmoid(a * logit + b)`` (scikit-learn's
logistic regression). Both are fitted on one half of the labelled items and scored on the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def calibrate(features: list[dict], correct: list[bool], bins: int = 10, seed: int = 0) -> dict:
    """Fit temperature and Platt scaling on one half, report ECE before/after on the other (with bootstrap
    intervals over the test items); choose the better."""
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
    return report
