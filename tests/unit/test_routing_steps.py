"""Phase 4's labelling helpers and ``routing.publish``: the verdict table from Phase 3's answers, and the routing
table and bundle from the router's evaluation and the escalation detector's figures."""

from __future__ import annotations

import json

import pytest

from cogumi_tasks.core.config import load_config
from cogumi_tasks.eval.phase_tables import phase4_tables
from cogumi_tasks.routing.labels import domain_rows, general_prompts, summary
from cogumi_tasks.routing.planted import planted_verdicts

MODELS = ["base", "code", "reasoning", "automation"]


def _item(id_: str, model: str, score: float, domain: str = "code") -> dict:
    return {"id": id_, "model": model, "domain": domain, "prompt": f"query {id_}", "answer": f"{model} says",
            "score": score}


def test_domain_rows_take_every_models_verdict_and_the_bases_answer():
    items = [_item("a", m, s) for m, s in zip(MODELS, [0, 1, 0, 0], strict=True)]
    items += [_item("a", "code/alone", 1.0)]  # not a model the router chooses between
    items += [_item("b", m, s, "reasoning") for m, s in zip(MODELS, [1, 0, 1, 0], strict=True)]
    rows = domain_rows(items, MODELS)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["verdicts"] == {"base": False, "code": True, "reasoning": False, "automation": False}
    assert rows[0]["answer"] == "base says" and rows[1]["domain"] == "reasoning"
    stats = summary([{**r, "domain": r["domain"]} for r in rows], MODELS, {m: 1.0 + (m != "base") for m in MODELS})
    assert stats["all"]["labels"] == {"base": 1, "code": 1, "reasoning": 0, "automation": 0}
    assert stats["code"]["correct"]["code"] == 1.0 and stats["reasoning"]["correct"]["base"] == 1.0
    with pytest.raises(ValueError, match=r"item 'c' has no verdict of \['automation'\]"):
        domain_rows([_item("c", m, 1) for m in MODELS[:3]], MODELS)


def test_general_prompts_are_the_last_general_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": f"g{i}", "prompt": f"p{i}", "domain": "general" if i % 2 else "code"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["id"] for p in general_prompts(path, 2)] == ["g7", "g9"]
    assert general_prompts(path, 0) == []
    with pytest.raises(ValueError, match="5 general prompts, routing.labels.general asks for 6"):
        general_prompts(path, 6)


def test_publish_compares_router_thresholds_mix_and_escalation_with_the_plan(s3_server, store_for, tmp_path):
    from cogumi_tasks.core.steps import run_step

    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(json.dumps(r) + "\n" for r in planted_verdicts(per_domain=20, general=30, seed=1)))
    cfg = load_config("tiny", {"name": "t-routing-publish"})
    store = store_for(cfg)
    trained = run_step("routing.train_router", cfg, {"verdicts": str(verdicts)}, store=store)
    evaluation = json.loads(store.get_bytes(trained.outputs["evaluation"]).decode())
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"queries": 90, "domain_queries": 60, "general_queries": 30, "confidence_ms": 12.5,
                                 "per_domain": {}, "sessions": "none"}))
    esc = tmp_path / "escalation.json"
    student = {"accuracy": 0.9, "ci": [0.86, 0.93], "n": 100, "bytes": 2_500_000, "parameters": 10,
               "latency": {"p50_ms": 1.0, "p99_ms": 4.0}}
    teacher = {"accuracy": 0.95, "ci": [0.9, 0.99], "n": 100, "bytes": 90_000_000, "parameters": 22,
               "latency": {"p50_ms": 9.0, "p99_ms": 20.0}}
    esc.write_text(json.dumps({"data": "generated", "examples": {"test": 100}, "student": student,
                               "teacher": teacher, "size_ratio": 36.0, "accuracy_gap_points": 5.0,
                               "accuracy_gap_ci": [1.0, 9.0]}))
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "vocab.json").write_text("[]")
    calibrator = tmp_path / "calibrator.json"
    calibrator.write_text(json.dumps({"method": "temperature", "t": 1.5}))
    res = run_step("routing.publish", cfg, {
        "router": trained.outputs["router"], "evaluation": trained.outputs["evaluation"], "verdicts": str(verdicts),
        "stats": str(stats), "escalation": str(tmp_path / "student"), "escalation_metrics": str(esc),
        "calibrator": str(calibrator)}, store=store)
    table = res.metrics
    router = evaluation["policies"]["router"]
    assert table["router"]["accuracy"] == router["accuracy"] and table["router"]["accuracy_ci"] == router["accuracy_ci"]
    assert table["router"]["verdict"] in ("met", "not met", "inconclusive")
    assert set(table["router"]["latency"]) == {"mlp", "with_embedding"}
    # tiny refits the shipped router on every row: threshold, sweep and route mix are the cross-validation's
    shipped, cv = evaluation["shipped"], evaluation["cross_validation"]
    assert shipped["refit"] and table["shipped"] == shipped and shipped["threshold_from"] == "cross_validation"
    chosen = shipped["threshold"]
    assert chosen == cv["chosen"]["threshold"] and table["thresholds"]["chosen"] == cv["chosen"]
    row = next(s for s in cv["sweep"] if s["threshold"] == chosen)
    assert [table["route_mix"][m]["share"] for m in MODELS] == row["route_mix"]
    for m in MODELS:  # a share is judged against the plan's range directly (no interval)
        lo, hi = table["route_mix"][m]["plan"]
        assert table["route_mix"][m]["verdict"] == ("met" if lo <= row["route_mix"][MODELS.index(m)] <= hi
                                                   else "not met")
    e = table["escalation"]
    assert e["accuracy_verdict"]["verdict"] == "not met"  # the whole interval 0.86-0.93 is below 0.94
    assert e["bytes_verdict"]["verdict"] == "met" and e["latency_verdict"]["verdict"] == "not met"
    assert e["gap_verdict"]["verdict"] == "inconclusive"  # within 5 points: the interval 1-9 straddles 5
    assert e["size_ratio_verdict"]["verdict"] == "met"  # 36x >= 20x
    bundle = json.loads(store.get_bytes(res.outputs["bundle"]).decode())
    assert bundle["threshold"] == chosen and bundle["router"] == trained.outputs["router"]
    assert bundle["models"] == MODELS
    # as the report reads it: from a manifest stored with sorted keys
    stored = json.loads(json.dumps(table, sort_keys=True))
    rendered = phase4_tables([{"step": "routing.publish", "metrics": stored}])
    base_row = next(r for r in rendered[0]["rows"] if r[0] == "always_base")
    assert base_row[-1] == "base 100.0% / code 0.0% / reasoning 0.0% / automation 0.0%"
    from cogumi_tasks.eval.phase_tables import points_text

    assert base_row[3] == points_text(evaluation["differences"]["router_minus_always_base"])  # router minus it
    assert [t["id"] for t in rendered] == ["routing-policies", "router-confusion", "routing-cv", "threshold-sweep",
                                           "route-mix", "escalation"]
    rendered = {t["id"]: t for t in rendered}
    confusion = rendered.pop("router-confusion")  # rows: label, columns: routed to; every holdout query once
    assert confusion["headers"][1:] == MODELS and [r[0] for r in confusion["rows"]] == MODELS
    assert sum(float(v) for r in confusion["rows"] for v in r[1:]) == table["router"]["n"]
    rendered = list(rendered.values())
    from cogumi_tasks.eval.report import make_plots  # the Phase 4 section's quality-cost curve

    (curve,) = make_plots([{"step": "routing.publish", "metrics": stored}])
    assert curve["id"] == "routing_quality_cost" and curve["png"] and curve["phase"] == "Phase 4: routing"
    assert [t for _, _, t in curve["data"]["sweep"]] == [s["threshold"] for s in table["thresholds"]["sweep"]]
    assert curve["data"]["policies"].keys() == table["cross_validation"]["policies"].keys()  # the sweep's evaluation
    assert ("Teacher minus student: +5.0 (CI +1.0 to +9.0) points (paired) vs within 5: inconclusive; 36.0x smaller"
            " than the teacher vs >= 20x: met") in rendered[-1]["note"]
    cv = evaluation["cross_validation"]
    assert table["cross_validation"] == cv and cv["n"] == 90
    for name in ("always_base", "random_same_cost"):  # judged on both evaluations, by the paired interval
        for where, ev in (("holdout", evaluation), ("cross_validation", cv)):
            d = ev["differences"][f"router_minus_{name}"]
            got = table["beats"][name][where]
            assert (got["points"], got["ci"]) == (d["points"], d["ci"])
            assert got["verdict"] == ("met" if d["ci"][0] > 0 else "not met" if d["ci"][1] <= 0 else "inconclusive")
            assert ("; why: " in got["reason"]) == (got["verdict"] != "met")
    assert sorted(r[0] for r in rendered[1]["rows"]) == sorted(cv["policies"])
    assert "router vs always_base: holdout" in rendered[1]["note"]
    assert len(rendered[2]["rows"]) == len(cfg.routing.router.thresholds)
    assert sum(r[-1] == "chosen" for r in rendered[2]["rows"]) == 1
    assert "over cross-validated routes of every query" in rendered[2]["note"]
    assert "Shipped router: refitted on every row (" in rendered[2]["note"]


def test_a_comparison_not_met_says_why_from_its_own_figures():
    from cogumi_tasks.routing.publish import beats

    pol = {"router": {"quality": 0.6}, "always_base": {"quality": 0.55}, "keyword": {"quality": 0.675},
           "oracle": {"quality": 0.7625}, "random_same_cost": {"quality": 0.58}}
    cv = {"n": 80, "policies": pol, "differences": {
        "router_minus_always_base": {"points": 5.0, "ci": [-2.5, 12.5]},
        "router_minus_random_same_cost": {"points": -1.0, "ci": [-6.0, 4.0]}}}
    holdout = {"split": {"test": 20}, "policies": pol, "differences": {
        "router_minus_always_base": {"points": 10.0, "ci": [2.0, 18.0]}}, "cross_validation": cv}
    got = beats(holdout)
    assert got["always_base"]["holdout"]["verdict"] == "met" and "why" not in got["always_base"]["holdout"]["reason"]
    base = got["always_base"]["cross_validation"]
    assert base["verdict"] == "inconclusive"
    # the lower bound sits 7.5 points under 5.0: 80 x (7.5 / 5)^2 = 180 queries would narrow it to 5
    assert "why: 80 paired queries; were the difference to hold, about 180 would put the lower bound above 0" in \
        base["reason"]
    assert "headroom: the oracle 76.2% vs always-base 55%" in base["reason"]
    assert "above the router's 60%: keyword 67.5%" in base["reason"]
    at_zero = beats({"split": {"test": 20}, "policies": pol, "differences": {
        "router_minus_always_base": {"points": 7.5, "ci": [0.0, 16.2]}}})["always_base"]["holdout"]
    assert at_zero["verdict"] == "inconclusive" and "about 21 would put the lower bound above 0" in at_zero["reason"]
    rand = got["random_same_cost"]["cross_validation"]
    assert rand["verdict"] == "inconclusive" and "why: on these 80 queries the router did not do better" in \
        rand["reason"]
