"""The Phase 4 router on a planted verdict table (tiny-world held-out prompts per domain + general prompts, each
domain's modifier right on its domain): 128 features, seeded training, the router against the baselines, the
oracle's and always-base's gain recovered, the bundle round trip, the threshold sweep's guarantees, the step."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cogumi_tasks.core.config import RouterConfig, load_config
from cogumi_tasks.routing.features import (
    OUTCOMES,
    VerdictRow,
    build_features,
    feature_names,
    fit_pca,
    label_of,
    load_verdicts,
    session_features,
)
from cogumi_tasks.routing.planted import MODELS, planted_verdicts
from cogumi_tasks.routing.policies import evaluate, random_same_cost, threshold_routes
from cogumi_tasks.routing.router import Router
from cogumi_tasks.routing.router_steps import fit_router

COSTS = {"base": 1.0, "code": 1.2, "reasoning": 1.2, "automation": 1.2}


@pytest.fixture(scope="module")
def table() -> tuple[list[VerdictRow], np.ndarray]:
    from cogumi_tasks.routing.features import embed_queries
    from cogumi_tasks.train.failures import load_embedder

    rows = [VerdictRow.model_validate(r) for r in planted_verdicts(per_domain=40, general=60, seed=0)]
    return rows, embed_queries(load_embedder("builtin:all-minilm-l6-v2"), [r.query for r in rows])


@pytest.fixture(scope="module")
def fitted(table) -> tuple[Router, dict]:
    rows, emb = table
    return fit_router(rows, emb, load_config("tiny").routing.router)


def test_features_are_the_plans_128_in_the_documented_order(table):
    rows, emb = table
    cfg = load_config("tiny").routing.router
    pca = fit_pca(emb[:100], cfg.pca_dims)
    x = build_features(pca, emb, [r.confidence for r in rows], [r.session for r in rows], MODELS, cfg.session_window)
    assert x.shape == (len(rows), 128) and len(feature_names(cfg.pca_dims, MODELS)) == 128
    assert pca.rank == 99  # 100 centred rows span 99 directions; the other components are zero rows
    assert np.all(x[:, 99:117] == 0)
    np.testing.assert_allclose(x[:, 117], [r.confidence for r in rows], rtol=1e-6)
    turns = [{"route": "code", "outcome": "ok"}, {"route": "base", "outcome": "ok"},
             {"route": "code", "outcome": "escalated"}]
    s = session_features(turns, MODELS, window=2)  # the last two turns: base, code
    assert s.tolist() == [0, 1, 0, 0, 0.5, 0.5, 0, 0, 0, 1]
    assert session_features([], MODELS, window=5).tolist() == [0.0] * 10


def test_session_outcomes_are_session_memorys():
    from cogumi_tasks.routing import memory

    assert set(OUTCOMES) == set(memory.OUTCOMES)


def test_label_is_the_cheapest_right_model_and_base_when_none_is():
    costs = {"base": 1.0, "code": 1.5, "reasoning": 1.2, "automation": 1.2}
    assert label_of({"base": True, "code": True, "reasoning": True, "automation": True}, MODELS, costs) == 0
    assert label_of({"base": False, "code": True, "reasoning": True, "automation": False}, MODELS, costs) == 2
    assert label_of({"base": False, "code": False, "reasoning": True, "automation": True}, MODELS, costs) == 2
    assert label_of(dict.fromkeys(MODELS, False), MODELS, costs) == 0


def test_bad_verdict_rows_name_file_line_and_field(tmp_path):
    good = planted_verdicts(per_domain=1, general=1)[0]
    cases = [({**good, "confidence": 1.5}, "field 'confidence'"),
             ({**good, "verdicts": {"base": True}}, "field 'verdicts': keys ['base']"),
             ({**good, "session": [{"route": "gpt", "outcome": "ok"}]}, "field 'session.0.route'"),
             ({**good, "extra": 1}, "field 'extra'")]
    for row, message in cases:
        path = tmp_path / "v.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"v.jsonl:2: {message}")):
            load_verdicts(path, MODELS)


def test_training_is_deterministic_under_its_seed(table, fitted):
    rows, emb = table
    again, evaluation = fit_router(rows, emb, load_config("tiny").routing.router)
    first = fitted[0].net.state_dict()
    for k, v in again.net.state_dict().items():
        assert np.array_equal(v.numpy(), first[k].numpy()), k
    assert evaluation["policies"] == fitted[1]["policies"]
    assert evaluation["cross_validation"] == fitted[1]["cross_validation"]


def test_router_beats_always_base_and_random_at_equal_cost(fitted):
    ev = fitted[1]
    pol = ev["policies"]
    assert pol["router"]["quality"] > pol["always_base"]["quality"]
    assert pol["router"]["quality"] > pol["random_same_cost"]["quality"]
    assert pol["random_same_cost"]["cost"] == pytest.approx(pol["router"]["cost"])
    for name in ("always_base", "random_same_cost"):
        d = ev["differences"][f"router_minus_{name}"]
        assert d["ci"][0] <= d["points"] <= d["ci"][1] and d["points"] > 0


def test_cross_validation_routes_every_query_with_a_router_that_never_trained_on_it(table, fitted, monkeypatch):
    from cogumi_tasks.routing import router_steps

    rows, emb = table
    cfg = load_config("tiny").routing.router
    folds = [router_steps.fold_of(r.id, cfg.cv_folds, cfg.seed) for r in rows]
    assert set(folds) == set(range(cfg.cv_folds))  # 180 rows fill all 5 folds
    cv = fitted[1]["cross_validation"]
    assert cv["folds"] == cfg.cv_folds and cv["n"] == len(rows)
    assert set(cv["policies"]) == set(fitted[1]["policies"])
    # the planted table puts each modifier right on its domain: learnable, so the cross-validated router beats
    # always-base and the random router at its cost, with the whole interval above 0
    for name in ("always_base", "random_same_cost"):
        assert cv["differences"][f"router_minus_{name}"]["ci"][0] > 0
    conf = ((np.arange(len(rows)) + 0.5) / len(rows)).astype(np.float32)  # unique: feature 117 names the row
    seen: list[set[float]] = []
    real = router_steps.train_mlp

    def spy(x_train, y_train, x_val, y_val, n_out, c, *verdicts):
        seen.append(set(np.concatenate([x_train, x_val])[:, cfg.pca_dims].tolist()))
        return real(x_train, y_train, x_val, y_val, n_out, c, *verdicts)

    monkeypatch.setattr(router_steps, "train_mlp", spy)
    labels = np.array([label_of(r.verdicts, MODELS, COSTS) for r in rows])
    verdicts = np.array([[r.verdicts[m] for m in MODELS] for r in rows], dtype=np.float32)
    quick = cfg.model_copy(update={"max_epochs": 3})  # which rows each fold trains on does not depend on epochs
    again = router_steps.cross_validate(rows, emb, quick, labels, verdicts, conf)
    assert again["n"] == len(rows) and len(seen) == cfg.cv_folds
    for f, trained_on in enumerate(seen):  # a fold's router trained on every other fold's rows and on none of its own
        assert trained_on == {float(c) for c, g in zip(conf, folds, strict=True) if g != f}


def test_cross_validation_is_skipped_with_a_reason_on_a_tiny_table(table):
    from cogumi_tasks.routing import router_steps

    rows, emb = table
    cfg = load_config("tiny").routing.router
    few = rows[:6]
    labels = np.array([label_of(r.verdicts, MODELS, COSTS) for r in few])
    verdicts = np.array([[r.verdicts[m] for m in MODELS] for r in few], dtype=np.float32)
    out = router_steps.cross_validate(few, emb[:6], cfg, labels, verdicts, np.full(6, 0.5, dtype=np.float32))
    assert out["folds"] == 5 and "too few to cross-validate" in out["skipped"]
    off = router_steps.cross_validate(few, emb[:6], cfg.model_copy(update={"cv_folds": 0}), labels, verdicts,
                                      np.full(6, 0.5, dtype=np.float32))
    assert off == {"folds": 0, "skipped": "cv_folds is 0"}
    with pytest.raises(ValueError, match="cv_folds: 0 .off. or at least 2"):
        RouterConfig(cv_folds=1)


def test_oracle_bounds_every_policy_and_gain_recovered_is_normalised(fitted):
    pol = fitted[1]["policies"]
    assert all(pol["oracle"]["quality"] >= p["quality"] for p in pol.values())
    assert pol["oracle"]["gain_recovered"] == 1.0 and pol["always_base"]["gain_recovered"] == 0.0
    assert pol["oracle"]["accuracy"] == 1.0
    for p in pol.values():
        # expected counts (the random policy's are fractions), each rounded to 4 decimals
        cells = sum(map(len, p["confusion"]))
        assert sum(map(sum, p["confusion"])) == pytest.approx(fitted[1]["n"], abs=cells * 5e-5)
        assert sum(p["route_mix"]) == pytest.approx(1.0)


def test_bundle_round_trip_routes_identically(table, fitted, tmp_path):
    rows, emb = table
    router = fitted[0]
    loaded = Router.load(router.save(tmp_path / "bundle"))
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["models"] == list(MODELS) and manifest["input_dim"] == 128 and manifest["hidden"] == [64, 32]
    assert loaded.threshold == fitted[1]["shipped"]["threshold"]
    assert (loaded.target, loaded.cost_weight) == ("gain", 0.25)  # tiny's recipe, kept by the manifest
    x = router.features(emb, [r.confidence for r in rows], [r.session for r in rows])
    np.testing.assert_array_equal(loaded.features(emb, [r.confidence for r in rows], [r.session for r in rows]), x)
    np.testing.assert_array_equal(loaded.probabilities(x), router.probabilities(x))
    for i in range(len(rows)):
        assert loaded.route(x[i])[0] == router.route(x[i])[0]
        model, _ = loaded.decide(x[i])
        assert model == ("base" if rows[i].confidence >= loaded.threshold else router.route(x[i])[0])


def test_threshold_sweep_moves_queries_from_base_to_the_router_only(fitted):
    ev = fitted[1]
    sweep, curve = ev["sweep"], ev["curve"]
    assert [s["threshold"] for s in sweep] == [0.70, 0.75, 0.80, 0.85, 0.90]
    for points in (sweep, curve):
        for a, b in zip(points, points[1:], strict=False):
            assert b["route_mix"][0] <= a["route_mix"][0] + 1e-12  # base share never grows with the threshold
            assert b["cost"] >= a["cost"] - 1e-12  # base is the cheapest: cost never falls
    assert curve[0]["route_mix"][0] == 1.0 and curve[0]["gain_recovered"] == 0.0  # t = 0: always the base
    assert curve[-1]["threshold"] is None and curve[-1]["quality"] == ev["policies"]["router"]["quality"]
    chosen = ev["chosen"]
    assert chosen["quality"] == max(s["quality"] for s in sweep)


def test_policy_arithmetic_on_a_hand_table():
    v = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=float)
    labels = np.array([0, 1, 0])
    c = np.array([1.0, 2.0, 2.0, 2.0])
    router = np.eye(4)[[0, 1, 1]]
    row = evaluate(router, v, labels, c)
    assert row["quality"] == pytest.approx(2 / 3) and row["cost"] == pytest.approx(5 / 3)
    assert row["accuracy"] == pytest.approx(2 / 3) and row["confusion"][0] == [1, 1, 0, 0]
    rnd, p = random_same_cost(router, c)
    assert p == pytest.approx(2 / 3) and (rnd @ c).mean() == pytest.approx(5 / 3)
    assert threshold_routes(np.array([1, 2, 3]), np.array([0.9, 0.5, 0.8]), 0.8).tolist() == [0, 2, 0]


def test_config_refuses_a_base_that_is_not_cheapest():
    with pytest.raises(ValueError, match="base the cheapest"):
        RouterConfig(costs={"base": 2.0, "code": 1.0})
    with pytest.raises(ValueError, match="not modifiers"):
        RouterConfig(keywords={"chat": ["hi"]})


def test_train_router_step_publishes_bundle_and_evaluation(s3_server, store_for, tmp_path):
    from cogumi_tasks.core.steps import run_step

    path = tmp_path / "verdicts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_verdicts(per_domain=20, general=30, seed=1)))
    cfg = load_config("tiny", {"name": "t-router-step"})
    store = store_for(cfg)
    res = run_step("routing.train_router", cfg, {"verdicts": str(path)}, store=store)
    evaluation = json.loads(store.get_bytes(res.outputs["evaluation"]).decode())
    assert set(evaluation["policies"]) == {"always_base", "always_best_modifier", "random_same_cost", "keyword",
                                           "oracle", "router"}
    assert res.metrics["chosen"] == evaluation["chosen"] and res.metrics["rows"] == 90
    local = store.fetch_prefix(res.outputs["router"], tmp_path / "fetched")
    assert Router.load(local).threshold == evaluation["shipped"]["threshold"]


def test_balanced_class_weights_undo_a_majority_label():
    from cogumi_tasks.routing.router import balanced_weights, train_mlp

    y = np.array([0] * 8 + [1] * 2 + [3] * 2)
    w = balanced_weights(y, 4)
    np.testing.assert_allclose(w, [12 / 32, 12 / 8, 1.0, 12 / 8])  # label 2 never occurs: weight 1, unused
    assert float((w[y]).sum()) == pytest.approx(len(y) * 3 / 4)  # each present label carries the same total weight
    # 40 rows: 36 of label 0 at x ~ 0, 4 of label 1 at x ~ 1 (the minority is separable)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.3, (36, 8)), rng.normal(1, 0.3, (4, 8))]).astype(np.float32)
    labels = np.array([0] * 36 + [1] * 4)
    cfg = RouterConfig(hidden=[8], class_weight="balanced", max_epochs=200, patience=200, lr=1e-2)
    net, training = train_mlp(x, labels, x, labels, 2, cfg)
    assert training.class_weights == [round(40 / 72, 4), 5.0]
    import torch

    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    assert (pred[36:] == 1).all() and (pred[:36] == 0).all()
    _, plain = train_mlp(x, labels, x, labels, 2, RouterConfig(hidden=[8], max_epochs=2))
    assert plain.class_weights is None


def test_verdicts_target_routes_where_the_modifier_is_likelier_right():
    """Cluster A: base right on 6 of 20, the modifier on 14 (labels: 12 base, 8 code, since the 6 that both fail
    are labelled base); cluster B: only the base right. The label target learns the majority label, base, for A;
    the verdicts target learns each model's rate there (0.3 and 0.7) and routes A to the modifier."""
    from cogumi_tasks.routing.router import train_mlp

    x = np.concatenate([np.ones((20, 4)), -np.ones((20, 4))]).astype(np.float32)
    a = [(1, 1)] * 6 + [(0, 1)] * 8 + [(0, 0)] * 6
    verdicts = np.array(a + [(1, 0)] * 20, dtype=np.float32)
    costs = {"base": 1.0, "code": 1.2}
    labels = np.array([label_of({"base": bool(b), "code": bool(c)}, ["base", "code"], costs) for b, c in verdicts])
    assert labels[:20].tolist().count(0) == 12
    common = {"hidden": [8], "dropout": 0.0, "lr": 1e-2, "max_epochs": 300, "patience": 300, "costs": costs,
              "keywords": {}}
    import torch

    by_label, _ = train_mlp(x, labels, x, labels, 2, RouterConfig(**common))
    by_verdicts, training = train_mlp(x, labels, x, labels, 2, RouterConfig(target="verdicts", **common), verdicts,
                                      verdicts)
    with torch.no_grad():
        routes_label = by_label(torch.from_numpy(x)).argmax(1).numpy()
        p = torch.sigmoid(by_verdicts(torch.from_numpy(x))).numpy()
    assert (routes_label == 0).all()
    assert (p[:20].argmax(1) == 1).all() and (p[20:].argmax(1) == 0).all()
    np.testing.assert_allclose(p[0], [0.3, 0.7], atol=0.1)
    np.testing.assert_allclose(p[-1], [1.0, 0.0], atol=0.1)
    assert training.val_accuracy == pytest.approx(28 / 40)  # against the labels: A's 12 base labels are missed
    with pytest.raises(ValueError, match="class_weight"):
        RouterConfig(target="verdicts", class_weight="balanced")
    with pytest.raises(ValueError, match="verdicts"):
        train_mlp(x, labels, x, labels, 2, RouterConfig(target="verdicts", **common))


def test_verdicts_target_bundle_keeps_sigmoid_outputs(table, tmp_path):
    rows, emb = table
    cfg = RouterConfig(target="verdicts", cv_folds=0, max_epochs=30)
    router, ev = fit_router(rows, emb, cfg)
    loaded = Router.load(router.save(tmp_path / "bundle"))
    assert loaded.target == "verdicts"
    x = router.features(emb, [r.confidence for r in rows], [r.session for r in rows])
    p = loaded.probabilities(x)
    np.testing.assert_array_equal(p, router.probabilities(x))
    assert ((p > 0) & (p < 1)).all() and not np.allclose(p.sum(axis=1), 1.0)  # one sigmoid per model
    assert ev["policies"]["router"]["quality"] > ev["policies"]["always_base"]["quality"]


def test_refit_ships_a_router_trained_on_every_row(table, fitted):
    """tiny refits: the shipped router's PCA is fitted on every row outside the early-stopping share, its threshold is
    the cross-validation's choice; without refit it is the train split's router with the holdout's threshold."""
    from cogumi_tasks.routing.router import split_of

    rows, emb = table
    router, ev = fitted
    cfg = load_config("tiny").routing.router
    shipped = ev["shipped"]
    train = [i for i, r in enumerate(rows) if split_of(r.id, 0.0, cfg.validation, cfg.seed) == "train"]
    assert shipped["refit"] and shipped["rows"] == {"train": len(train), "val": len(rows) - len(train)}
    assert router.threshold == shipped["threshold"] == ev["cross_validation"]["chosen"]["threshold"]
    np.testing.assert_allclose(router.pca.mean, emb[train].mean(axis=0), rtol=1e-5, atol=1e-6)
    split_router, split_ev = fit_router(rows, emb, cfg.model_copy(update={"refit": False, "cv_folds": 2}))
    assert not split_ev["shipped"]["refit"] and split_router.threshold == split_ev["chosen"]["threshold"]
    split_train = [i for i, r in enumerate(rows) if split_of(r.id, cfg.holdout, cfg.validation, cfg.seed) == "train"]
    np.testing.assert_allclose(split_router.pca.mean, emb[split_train].mean(axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="refit"):
        RouterConfig(refit=True, cv_folds=0)


def test_gain_target_keeps_queries_every_model_answers_on_the_base():
    """Cluster A as above (the modifier gains 8 of 20 over the base, loses none); cluster C: every model right (no
    gain); cluster B: only the base right. The gain target learns +0.4, 0 and -1 for the modifier (the base's output
    is trained to 0), so with a cost weight A goes to the modifier and C and B stay on the base."""
    from cogumi_tasks.routing.router import train_mlp

    x = np.concatenate([np.ones((20, 4)), np.zeros((20, 4)), -np.ones((20, 4))]).astype(np.float32)
    verdicts = np.array([(1, 1)] * 6 + [(0, 1)] * 8 + [(0, 0)] * 6 + [(1, 1)] * 20 + [(1, 0)] * 20, dtype=np.float32)
    costs = {"base": 1.0, "code": 1.2}
    labels = np.array([label_of({"base": bool(b), "code": bool(c)}, ["base", "code"], costs) for b, c in verdicts])
    cfg = RouterConfig(target="gain", cost_weight=0.25, hidden=[8], dropout=0.0, lr=1e-2, max_epochs=300,
                       patience=300, costs=costs, keywords={})
    import torch

    from cogumi_tasks.routing.features import Pca

    net, _ = train_mlp(x, labels, x, labels, 2, cfg, verdicts, verdicts)
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out[[0, 20, 40]], [[0.0, 0.4], [0.0, 0.0], [0.0, -1.0]], atol=0.1)
    router = Router(net, Pca(np.zeros(4), np.zeros((1, 4)), np.zeros(1)), ["base", "code"], costs, 5, "x",
                    target="gain", cost_weight=0.25)
    assert router.choose(out).tolist() == [1] * 20 + [0] * 40
    assert Router(router.net, router.pca, router.models, costs, 5, "x", target="gain").choose(
        np.array([[0.0, 0.04]])).tolist() == [1]  # no cost weight: any gain leaves the base
    assert router.choose(np.array([[0.0, 0.04]])).tolist() == [0]  # 0.04 < 0.25 x (1.2 - 1.0)
