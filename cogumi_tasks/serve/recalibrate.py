"""Step ``recalibrate.refit``: refit the calibration and the routing threshold on an interval's labels, compare them
with the live release, and publish a calibration release only when it is no worse.

- Live release: the one the registry's ``current`` pointer names now. Nothing is refitted when the interval was
  served by a release with other model files (its confidences describe other models) or when fewer than
  ``recalibrate.min_labelled`` queries were labelled; the reason is recorded.
- Calibration (as Phase 2, :func:`cogumi_tasks.compress.calibration.calibrate`): temperature and Platt scaling fitted
  on one half of the sample (stratified by the base's verdict), the better on the other half chosen.
- Threshold (as Phase 4): each of ``routing.router.thresholds`` on the fit half with the new calibration and the
  release's router (query embedding, calibrated confidence, no session), chosen by
  :func:`cogumi_tasks.routing.policies.choose_threshold` under ``routing.router.cost_budget``.
- Comparison set: the fixed holdout (the test split of the Phase 4 verdict table the live release was built from,
  rows with a raw confidence; none when its lineage names no table) plus the sample's other half. On it: ECE of the
  base's verdict under the live and the new calibrator, and routing quality (share answered correctly by the model
  the thresholded policy picks) with the live and the new (calibrator, threshold).
- Publish when ECE_new <= ECE_live + ``ece_margin`` and quality_new >= quality_live - ``quality_margin`` (and,
  when ``cost_margin`` is set, cost_new <= cost_live x (1 + ``cost_margin``)) and something changed: the live
  release with the new ``calibrator.json`` and threshold becomes release ``r-<sha256(live id, calibrator,
  threshold)>`` in the registry and ``current`` points at it (the pointer written last, only if it still names the
  live release). The id is a digest, so re-running an interval publishes the same
  release, and a run whose refit equals the live release publishes nothing.

Output ``decision`` (JSON, also the metrics): the figures above, ``published`` and ``reason``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step

log = logging.getLogger("cogumi")


def holdout_rows(ctx: StepContext, release: Any) -> tuple[list[dict], str]:
    """(the test-split rows with a raw confidence of the Phase 4 verdict table behind ``release``, where from)."""
    from cogumi_tasks.core.records import iter_jsonl_dicts
    from cogumi_tasks.routing.router import split_of

    routing_uri = (release.manifest.get("lineage") or {}).get("routing") if isinstance(
        release.manifest.get("lineage"), dict) else None
    if not routing_uri or not str(routing_uri).startswith("s3://"):
        return [], "none: the release's lineage names no Phase 4 routing bundle"
    bundle = json.loads(ctx.fetch(routing_uri).read_text())
    if not bundle.get("verdicts"):
        return [], f"none: {routing_uri} names no verdict table"
    rc = ctx.config.routing.router
    rows = [r for r in iter_jsonl_dicts(ctx.fetch(bundle["verdicts"]))
            if r.get("raw_confidence") is not None and split_of(r["id"], rc.holdout, rc.validation, rc.seed) == "test"]
    return rows, f"{bundle['verdicts']} (test split, {len(rows)} rows with a raw confidence)"


def routed_quality(router: Any, embeddings: np.ndarray, raw: np.ndarray, verdicts: np.ndarray, calibrator: Any,
                   threshold: float | None) -> tuple[float, float, list[float]]:
    """(quality, cost, route mix) of the thresholded policy: the base when the calibrated confidence >= threshold,
    else the router's choice (confidence its input)."""
    from cogumi_tasks.routing.policies import onehot, threshold_routes

    conf = calibrator(raw)
    probs = router.probabilities(router.features(embeddings, conf.tolist(), [[] for _ in raw]))
    choice = router.choose(probs)
    routes = choice if threshold is None else threshold_routes(choice, conf, threshold)
    r = onehot(routes, len(router.models))
    costs = np.array([router.costs.get(m, 1.0) for m in router.models])
    return float((r * verdicts).sum(axis=1).mean()), float((r @ costs).mean()), r.mean(axis=0).round(4).tolist()


def refusals(ece_live: float, ece_new: float, q_live: float, q_new: float, changed: bool, ece_margin: float,
             quality_margin: float, cost_live: float = 0.0, cost_new: float = 0.0,
             cost_margin: float | None = None) -> list[str]:
    """Why the refit is not published (empty: publish): worse ECE or routing quality beyond the margins, a cost per
    query above the live one by more than ``cost_margin`` (a share; None: cost is no rule), or no change from the
    live release."""
    why = []
    if not ece_new <= ece_live + ece_margin:  # a NaN ECE (no comparison rows) refuses too
        why.append(f"ECE {ece_new:.4f} > live {ece_live:.4f} + margin {ece_margin}")
    if not q_new >= q_live - quality_margin:
        why.append(f"routing quality {q_new:.4f} < live {q_live:.4f} - margin {quality_margin}")
    if cost_margin is not None and not cost_new <= cost_live * (1 + cost_margin):
        why.append(f"cost per query {cost_new:.4f} > live {cost_live:.4f} x (1 + margin {cost_margin})")
    if not changed:
        why.append("the refit equals the live release's calibrator and threshold")
    return why


def refit(ctx: StepContext, labels: list[dict], live: Any) -> dict:
    """The decision (module docstring) for ``labels`` against the ``live`` release."""
    from cogumi_tasks.compress.calibration import Calibrator, calibrate, ece, split_halves
    from cogumi_tasks.routing.features import embed_queries
    from cogumi_tasks.routing.policies import choose_threshold
    from cogumi_tasks.routing.router import Router
    from cogumi_tasks.train.failures import load_embedder

    cfg, rc = ctx.config.recalibrate, ctx.config.routing.router
    router = Router.load(live.router_dir)
    models = router.models
    hold, hold_from = holdout_rows(ctx, live)
    y = np.array([r["verdicts"]["base"] for r in labels], dtype=int)
    raw = np.array([r["raw_confidence"] for r in labels], dtype=float)
    report = calibrate([{"confidence": c} for c in raw], y.tolist(), seed=cfg.seed)
    new_cal = Calibrator(**report["calibrator"])
    fit, test = split_halves(len(y), y, cfg.seed)
    embedder = load_embedder(router.embedder)
    emb = embed_queries(embedder, [r["query"] for r in labels])
    v = np.array([[r["verdicts"].get(m, False) for m in models] for r in labels], dtype=float)
    sweep = []
    for t in rc.thresholds:
        q, c, mix = routed_quality(router, emb[fit], raw[fit], v[fit], new_cal, t)
        sweep.append({"threshold": t, "quality": q, "cost": c, "route_mix": mix})
    chosen = choose_threshold(sweep, rc.cost_budget)
    e_raw = np.concatenate([raw[test], np.array([r["raw_confidence"] for r in hold], dtype=float)])
    e_y = np.concatenate([y[test], np.array([r["verdicts"]["base"] for r in hold], dtype=int)])
    e_v = np.concatenate([v[test], np.array([[r["verdicts"].get(m, False) for m in models] for r in hold],
                                            dtype=float).reshape(-1, len(models))])
    e_emb = np.concatenate([emb[test], embed_queries(embedder, [r["query"] for r in hold]) if hold
                            else np.zeros((0, emb.shape[1]), dtype=emb.dtype)])
    live_cal = live.calibrator()
    q_live, c_live, mix_live = routed_quality(router, e_emb, e_raw, e_v, live_cal, live.threshold)
    q_new, c_new, mix_new = routed_quality(router, e_emb, e_raw, e_v, new_cal, chosen["threshold"])
    ece_live, ece_new = ece(live_cal(e_raw), e_y), ece(new_cal(e_raw), e_y)
    changed = vars(new_cal) != vars(live_cal) or chosen["threshold"] != live.threshold
    why = refusals(ece_live, ece_new, q_live, q_new, changed, cfg.ece_margin, cfg.quality_margin, c_live, c_new,
                   cfg.cost_margin)
    return {"live": live.id, "labelled": len(labels), "fit_n": len(fit), "compare_n": len(e_y),
            "holdout": {"n": len(hold), "from": hold_from}, "calibration": report,
            "calibrator": {"live": vars(live_cal), "new": vars(new_cal)},
            "threshold": {"live": live.threshold, "new": chosen["threshold"], "sweep": sweep, "chosen": chosen},
            "ece": {"live": ece_live, "new": ece_new, "margin": cfg.ece_margin},
            "quality": {"live": q_live, "new": q_new, "margin": cfg.quality_margin, "cost_live": c_live,
                        "cost_new": c_new, "cost_margin": cfg.cost_margin, "route_mix_live": mix_live,
                        "route_mix_new": mix_new},
            "publish": not why, "reason": "; ".join(why) or "no worse on ECE and routing quality, and changed"}


def publish_calibration(ctx: StepContext, live: Any, decision: dict) -> str:
    """Build the live release with the new calibrator and threshold, copy it to the registry and point ``current``
    at it; returns its id (nothing is rewritten when the registry has it already)."""
    from cogumi_tasks.core.artifacts import sha256_json
    from cogumi_tasks.serve.deploy import release_id
    from cogumi_tasks.serve.release import build_release, publish_release

    cal, threshold = decision["calibrator"]["new"], decision["threshold"]["new"]
    rid = release_id({"parent": live.id, "calibrator": cal, "threshold": threshold})
    out = ctx.tmp_dir / "new-release"
    out.mkdir(parents=True)
    card = live.root / "MODEL_CARD.md"
    if card.is_file():
        (out / "MODEL_CARD.md").write_text(card.read_text() + f"\nRe-calibrated from {live.id} on served traffic "
                                           f"{ctx.params['start']} .. {ctx.params['end']}: ECE "
                                           f"{decision['ece']['live']:.4f} -> {decision['ece']['new']:.4f}.\n")
    models = live.manifest["models"]
    mods = {n: p for n, p in live.modifiers.items()}
    build_release(out, base=live.base, modifiers=mods, router=live.router_dir, escalation=live.escalation_dir,
                  calibrator=cal, recovery=live.recovery, threshold=threshold, costs=live.costs,
                  domains={n: models[n].get("domain") or n for n in mods},
                  scales={n: models[n]["scale"] for n in mods}, release_id=rid,
                  lineage={**(live.manifest.get("lineage") or {}), "recalibrated_from": live.id,
                           "interval": [ctx.params["start"], ctx.params["end"]], "labels": ctx.input("labels")},
                  figures={**(live.manifest.get("figures") or {}),
                           "recalibration": {"ece": decision["ece"], "quality": decision["quality"],
                                             "decision": sha256_json(decision)[:12]}})
    publish_release(ctx.store, out, ctx.store.uri(ctx.config.name, "releases"), expect_current=live.id,
                    extra={"recalibrated": [ctx.params["start"], ctx.params["end"]]})
    return rid


@step("recalibrate.refit", version=1,
      reads=("recalibrate", "routing.router.thresholds", "routing.router.cost_budget", "routing.router.holdout",
             "routing.router.validation", "routing.router.seed"),
      inputs=("labels",), outputs=("decision",),
      code=("cogumi_tasks.compress.calibration", "cogumi_tasks.routing.policies", "cogumi_tasks.routing.router",
            "cogumi_tasks.routing.features", "cogumi_tasks.serve.release", "cogumi_tasks.serve.deploy",
            "cogumi_tasks.train.failures"))
def refit_step(ctx: StepContext) -> StepOutput:
    """Refit, compare with the live release, publish only when no worse.

    Params: ``start``, ``end`` (the data interval, as ``recalibrate.label``). Inputs: ``labels``
    (``recalibrate.label``'s). Outputs: ``decision`` (JSON, also the metrics: module docstring).
    """
    from cogumi_tasks.core.artifacts import join_uri
    from cogumi_tasks.core.records import iter_jsonl_dicts
    from cogumi_tasks.serve.release import CURRENT

    cfg = ctx.config.recalibrate
    if cfg is None or ctx.config.routing is None:
        raise StepFailed(f"config {ctx.config.name} needs recalibrate and routing sections")
    labels = list(iter_jsonl_dicts(ctx.fetch(ctx.input("labels"))))
    registry = ctx.store.uri(ctx.config.name, "releases")
    decision: dict[str, Any] = {"interval": [ctx.params.get("start"), ctx.params.get("end")], "labelled": len(labels),
                                "publish": False, "published": None}
    if len(labels) < cfg.min_labelled:
        decision["reason"] = f"{len(labels)} labelled queries, fewer than recalibrate.min_labelled {cfg.min_labelled}"
    else:
        decision.update(_compare_and_publish(ctx, labels, registry))
    pointer = join_uri(registry, CURRENT)
    decision["current"] = (ctx.store.get_json(pointer) or {}).get("id") if ctx.store.exists(pointer) else None
    text = json.dumps(decision, indent=1, default=float)  # numpy scalars become floats in the metrics too
    ctx.out("decision.json").write_text(text)
    log.info("recalibrate %s: %s (%s)", decision["interval"], f"published {decision['published']}"
             if decision["published"] else "nothing published", decision["reason"])
    return StepOutput(files={"decision": "decision.json"}, metrics=json.loads(text))


def _compare_and_publish(ctx: StepContext, labels: list[dict], registry: str) -> dict:
    from cogumi_tasks.serve.release import ReleaseError, resolve_release

    try:
        live = resolve_release("current", ctx.tmp_dir / "live", ctx.store, registry)
    except ReleaseError as exc:
        raise StepFailed(f"recalibrate: no live release to compare with: {exc}") from None
    served = {r["release"] for r in labels}
    if served != {live.id} and any(_model_files(ctx, registry, rid) != live.model_files for rid in served):
        return {"live": live.id, "reason": f"the interval was served by {sorted(served)}, whose model files differ "
                f"from the live release {live.id}: its confidences describe other models"}
    decision = refit(ctx, labels, live)
    if decision["publish"]:
        decision["published"] = publish_calibration(ctx, live, decision)
    return decision


def _model_files(ctx: StepContext, registry: str, rid: str) -> dict[str, str]:
    from cogumi_tasks.core.artifacts import join_uri
    from cogumi_tasks.serve.release import MANIFEST, Release

    manifest = ctx.store.get_json(join_uri(registry, rid, MANIFEST))
    return Release(Path("."), manifest).model_files
