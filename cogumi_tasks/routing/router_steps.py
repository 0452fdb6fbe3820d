"""Phase 4 step ``routing.train_router``: the router MLP from the verdict table, its evaluation and threshold.

:func:`fit_router` does the work on rows and their embeddings (tests and ``bench/router.py`` call it too): split
by id hash (:func:`cogumi_tasks.routing.router.split_of`), PCA on the training split's embeddings, features, MLP
training with early stopping on the validation split, every policy on the holdout split
(:mod:`cogumi_tasks.routing.policies`) and the threshold chosen by the configured objective, stored in the bundle;
then :func:`cross_validate` scores every query of the table with a router of the same recipe that never trained on
it, so the comparison with the baselines rests on the whole table, not on one small holdout split. With ``refit``
the shipped router is trained again on every row (:func:`train_on`), its threshold chosen on the cross-validated
sweep (``evaluation["shipped"]`` says which router ships and where its threshold comes from).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np

from cogumi_tasks.core.config import RouterConfig
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.routing.features import VerdictRow, build_features, fit_pca, label_of, load_verdicts
from cogumi_tasks.routing.policies import evaluate_policies
from cogumi_tasks.routing.router import Router, Training, split_key, split_of, train_mlp

log = logging.getLogger("cogumi")


def fit_router(rows: Sequence[VerdictRow], embeddings: np.ndarray, cfg: RouterConfig) -> tuple[Router, dict]:
    """(the router to ship with its threshold, the evaluation: on the holdout split, cross-validated, ``shipped``)."""
    models = cfg.models
    parts = np.array([split_of(r.id, cfg.holdout, cfg.validation, cfg.seed) for r in rows])
    counts = {p: int((parts == p).sum()) for p in ("train", "val", "test")}
    if min(counts.values()) == 0 or counts["train"] < 2:
        raise ValueError(f"verdict table of {len(rows)} rows splits into {counts}: too few rows for a router")
    labels = np.array([label_of(r.verdicts, models, cfg.costs) for r in rows], dtype=np.int64)
    verdicts = np.array([[r.verdicts[m] for m in models] for r in rows], dtype=np.float32)
    conf = np.array([r.confidence for r in rows], dtype=np.float32)
    train, val, test = (np.flatnonzero(parts == p) for p in ("train", "val", "test"))
    router, x, training = train_on(rows, embeddings, cfg, train, val, labels, verdicts, conf)
    routes = router.choose(router.probabilities(x[test]))
    evaluation = evaluate_policies(
        models=models, costs=cfg.costs, verdicts=verdicts[test], labels=labels[test], router_routes=routes,
        confidences=conf[test], queries=[rows[i].query for i in test], train_verdicts=verdicts[train],
        keywords=cfg.keywords, thresholds=cfg.thresholds, cost_budget=cfg.cost_budget, bootstrap=cfg.bootstrap,
        seed=cfg.seed)
    evaluation["split"] = counts
    evaluation["training"] = {"epochs": training.epochs, "best_epoch": training.best_epoch,
                              "val_loss": training.val_loss, "val_accuracy": training.val_accuracy,
                              "train_accuracy": training.train_accuracy, "class_weights": training.class_weights,
                              "history": training.history}
    evaluation["pca"] = {"dims": cfg.pca_dims, "rank": router.pca.rank, "explained": float(router.pca.explained.sum())}
    evaluation["by_domain"] = _by_domain([rows[i] for i in test], routes, models)
    evaluation["cross_validation"] = cv = cross_validate(rows, embeddings, cfg, labels, verdicts, conf)
    shipped = {"refit": False, "rows": {"train": counts["train"], "val": counts["val"]},
               "threshold": evaluation["chosen"]["threshold"], "threshold_from": "holdout"}
    if cfg.refit and "chosen" in cv:
        part = np.array([split_of(r.id, 0.0, cfg.validation, cfg.seed) for r in rows])
        all_train, all_val = np.flatnonzero(part == "train"), np.flatnonzero(part == "val")
        router, _, refit = train_on(rows, embeddings, cfg, all_train, all_val, labels, verdicts, conf)
        shipped = {"refit": True, "rows": {"train": len(all_train), "val": len(all_val)},
                   "threshold": cv["chosen"]["threshold"], "threshold_from": "cross_validation",
                   "best_epoch": refit.best_epoch, "val_loss": refit.val_loss}
    elif cfg.refit:
        shipped["refit_skipped"] = cv.get("skipped")
    evaluation["shipped"] = shipped
    router.threshold = shipped["threshold"]
    router.info = {"split": counts, "training": {k: v for k, v in evaluation["training"].items() if k != "history"},
                   "holdout": {"accuracy": evaluation["policies"]["router"]["accuracy"],
                               "quality": evaluation["policies"]["router"]["quality"]},
                   "chosen": evaluation["chosen"], "shipped": shipped}
    return router, evaluation


def train_on(rows: Sequence[VerdictRow], embeddings: np.ndarray, cfg: RouterConfig, train: np.ndarray,
             val: np.ndarray, labels: np.ndarray, verdicts: np.ndarray,
             conf: np.ndarray) -> tuple[Router, np.ndarray, Training]:
    """A router of the configured recipe trained on rows ``train`` (PCA fitted on them), early-stopped on ``val``:
    (the router, every row's features under its PCA, what training did)."""
    pca = fit_pca(embeddings[train], cfg.pca_dims)
    x = build_features(pca, embeddings, conf, [r.session for r in rows], cfg.models, cfg.session_window)
    net, training = train_mlp(x[train], labels[train], x[val], labels[val], len(cfg.models), cfg, verdicts[train],
                              verdicts[val])
    return Router(net, pca, cfg.models, dict(cfg.costs), cfg.session_window, cfg.embedder, target=cfg.target,
                  cost_weight=cfg.cost_weight), x, training


def fold_of(row_id: str, folds: int, seed: int) -> int:
    """A row's cross-validation fold, from the same kind of id hash as its split (stable when rows are added)."""
    return int(split_key(f"cv:{seed}:{row_id}") * folds)


def cross_validate(rows: Sequence[VerdictRow], embeddings: np.ndarray, cfg: RouterConfig, labels: np.ndarray,
                   verdicts: np.ndarray, conf: np.ndarray) -> dict:
    """``cv_folds``-fold cross-validation. Per fold, a router is trained on the other folds the way
    :func:`fit_router` trains one (PCA, features, early stopping on a ``validation`` share) and routes that fold,
    so every query of the table is routed by a router that never saw it; every policy is then evaluated on all
    queries, with intervals. ``always_best_modifier`` picks its modifier on the whole table (optimistic for that
    baseline). Returns ``{"folds", "n", "models", "best_modifier", "policies", "differences", "sweep", "chosen"}``
    (the threshold sweep and choice over the out-of-fold routes), or ``{"folds", "skipped"}`` saying why it did not
    run."""
    k = cfg.cv_folds
    if k < 2:
        return {"folds": k, "skipped": "cv_folds is 0"}
    fold = np.array([fold_of(r.id, k, cfg.seed) for r in rows])
    routes = np.zeros(len(rows), dtype=np.int64)
    for f in range(k):
        test = np.flatnonzero(fold == f)
        rest = np.flatnonzero(fold != f)
        part = np.array([split_of(rows[i].id, 0.0, cfg.validation, cfg.seed) for i in rest])
        train, val = rest[part == "train"], rest[part == "val"]
        if len(test) == 0 or len(val) == 0 or len(train) < 2:
            return {"folds": k, "skipped": f"fold {f} of {len(rows)} rows has {len(test)} test, {len(train)} train "
                                           f"and {len(val)} validation rows: too few to cross-validate"}
        router, x, _ = train_on(rows, embeddings, cfg, train, val, labels, verdicts, conf)
        routes[test] = router.choose(router.probabilities(x[test]))
    ev = evaluate_policies(
        models=cfg.models, costs=cfg.costs, verdicts=verdicts, labels=labels, router_routes=routes, confidences=conf,
        queries=[r.query for r in rows], train_verdicts=verdicts, keywords=cfg.keywords, thresholds=cfg.thresholds,
        cost_budget=cfg.cost_budget, bootstrap=cfg.bootstrap, seed=cfg.seed)
    return {"folds": k, "n": ev["n"], "models": ev["models"], "best_modifier": ev["best_modifier"],
            "policies": {name: {key: p[key] for key in ("quality", "quality_ci", "cost", "accuracy", "accuracy_ci",
                                                          "route_mix")} for name, p in ev["policies"].items()},
            "differences": ev["differences"],
            "sweep": [{key: s[key] for key in ("threshold", "quality", "cost", "route_mix", "gain_recovered")}
                      for s in ev["sweep"]], "chosen": ev["chosen"]}


def _by_domain(rows: Sequence[VerdictRow], routes: np.ndarray, models: Sequence[str]) -> dict[str, dict]:
    """Per domain (general: no domain) of the holdout: queries and the router's route counts."""
    out: dict[str, dict] = {}
    for row, r in zip(rows, routes, strict=True):
        entry = out.setdefault(row.domain or "general", {"n": 0, "routes": dict.fromkeys(models, 0)})
        entry["n"] += 1
        entry["routes"][models[int(r)]] += 1
    return dict(sorted(out.items()))


@step("routing.train_router", version=2, reads=("routing.router",), inputs=("verdicts",),
      outputs=("router", "evaluation"),
      code=("cogumi_tasks.routing.features", "cogumi_tasks.routing.policies", "cogumi_tasks.routing.router",
            "cogumi_tasks.train.failures", "cogumi_tasks.eval.tables"))
def train_router(ctx: StepContext) -> StepOutput:
    """Train the router MLP on the verdict table and evaluate every routing policy on its holdout split.

    Inputs: ``verdicts`` (JSONL, the format of :mod:`cogumi_tasks.routing.features`). Outputs: ``router`` (the
    bundle: safetensors + manifest with PCA, label map and the chosen confidence threshold), ``evaluation`` (JSON:
    per policy quality, cost, accuracy, route mix, confusion matrix and gain recovered; router-minus-policy quality
    differences with bootstrap intervals; the quality-cost curve and APGR; the threshold sweep and the choice; the
    cross-validated policies and differences on every query).
    """
    from cogumi_tasks.routing.features import embed_queries
    from cogumi_tasks.train.failures import load_embedder

    if ctx.config.routing is None:
        raise StepFailed(f"config {ctx.config.name} has no routing section")
    cfg = ctx.config.routing.router
    try:
        rows = load_verdicts(ctx.fetch(ctx.input("verdicts")), cfg.models)
        embeddings = embed_queries(load_embedder(cfg.embedder), [r.query for r in rows])
        router, evaluation = fit_router(rows, embeddings, cfg)
    except ValueError as exc:
        raise StepFailed(f"routing.train_router: {exc}") from None
    router.save(ctx.out_dir / "router")
    ctx.out("evaluation.json").write_text(json.dumps(evaluation, indent=1))
    pol = evaluation["policies"]
    log.info("router on %d holdout queries: quality %.3f (always-base %.3f, oracle %.3f), cost %.3f, threshold %s",
             evaluation["n"], pol["router"]["quality"], pol["always_base"]["quality"], pol["oracle"]["quality"],
             pol["router"]["cost"], evaluation["chosen"]["threshold"])
    metrics = {"rows": len(rows), "split": evaluation["split"], "apgr": evaluation["apgr"],
               "chosen": evaluation["chosen"], "best_modifier": evaluation["best_modifier"],
               "policies": {name: {k: p[k] for k in ("quality", "quality_ci", "cost", "accuracy", "accuracy_ci",
                                                     "gain_recovered", "route_mix")} for name, p in pol.items()},
               "differences": evaluation["differences"], "training": router.info["training"],
               "cross_validation": evaluation["cross_validation"]}
    return StepOutput(files={"router": "router/", "evaluation": "evaluation.json"}, metrics=metrics)
