"""The run report: self-contained HTML, JSON with the same numbers, targets never invented."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pytest

from cogumi_tasks.eval.report import NOT_MEASURED, build_report, collect_run, fmt, load_targets, write_report

REPO = Path(__file__).resolve().parents[2]
TARGETS = REPO / "configs" / "plan_targets.yaml"
PNG_MAGIC = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()[:10]


def manifest(bucket: str, step: str, key: str, run_id: str, t: float, metrics: dict, inputs: dict | None = None,
             config: dict | None = None, cost: dict | None = None, outputs: dict | None = None) -> dict:
    """A manifest shaped like the step runner's."""
    prefix = f"s3://{bucket}/pipe/{step}/{key}"
    return {"step": step, "version": 1, "cache_key": key * 3, "prefix": prefix,
            "outputs": outputs or {"out": f"{prefix}/out.jsonl"}, "metrics": metrics, "inputs": inputs or {},
            "input_digests": {}, "params": {}, "config": config or {}, "pipeline": "pipe", "run_id": run_id,
            "code_version": "0.1.0", "host": "h", "timings": {"started": t - 5, "finished": t, "seconds": 5.0},
            "cost": cost or {}, "files": {"out.jsonl": {"sha256": "0" * 64, "size": 10}}, "published_at": t}


def report_of(*manifests: dict) -> tuple[str, dict, dict]:
    """The report (HTML, JSON) of a run of ``manifests`` against the plan's targets, and its targets by id."""
    page, data = build_report({"pipeline": "pipe", "run_id": manifests[-1]["run_id"], "manifests": list(manifests),
                               "ledger": {}}, load_targets(TARGETS))
    return page, data, {t["id"]: t for t in data["targets"]}


def fake_run(bucket: str = "b") -> dict:
    score = manifest(bucket, "data.score", "k1", "old-run", 100.0,
                     {"judged": 40, "passed_judge": 31, "rejected_by_judge": 9, "judge_quarantined": 1,
                      "score_histogram": {"3": 4, "6": 5, "7": 12, "9": 19}, "faults": {"retries": 2}},
                     config={"dataset.score": {"threshold": 7}, "judge": {"model": "j"}},
                     cost={"calls": 41, "cached_calls": 0, "prompt_tokens": 9000, "completion_tokens": 800,
                           "usd": 0.0123, "per_endpoint": {"judge": {"calls": 41, "usd": 0.0123}}})
    publish = manifest(bucket, "data.publish", "k2", "run-2", 200.0,
                       {"prompts": 50, "answers_generated": 45, "judged": 40, "passed_judge": 31, "final_records": 29,
                        "exact_duplicates": 1, "near_duplicates": 1, "judge_score_histogram": {"3": 4, "7": 12},
                        "per_domain": {"code": 15, "reasoning": 14}, "per_teacher": {"t1": 29}},
                       inputs={"deduped": f"s3://{bucket}/pipe/data.score/k1/out.jsonl"})
    ev = manifest(bucket, "eval.run", "k3", "run-2", 300.0,
                  {"items": 60, "suites": {"humaneval": {"n": 20, "ours": 0.45, "reference": 0.6, "errors": 0}},
                   "pct_of_reference": {"code": {"ours": 0.45, "reference": 0.6, "pct": 75.0, "ci": [61.5, 88.2],
                                                 "n": 20},
                                        "reasoning": {"ours": 0.5, "reference": 0.8, "pct": 62.5, "ci": [50.0, 74.0],
                                                      "n": 20}},
                   "judge": {"order_agreement": 0.8, "win_rate": 0.35}},
                  config={"eval": {"gates": {"code": 72, "reasoning": 70}}},
                  inputs={"model": "builtin:nothing"})
    train = manifest(bucket, "train.sft", "k4", "run-2", 400.0,
                     {"loss_curve": [[i, 2.0 / (i + 1)] for i in range(50)], "final_loss": 0.04,
                      "calibration": {"reliability": {"bins": [0.25, 0.75], "accuracy": [0.2, 0.7],
                                                      "confidence": [0.25, 0.75]}}})
    return {"pipeline": "pipe", "run_id": "run-2", "manifests": [score, publish, ev, train],
            "ledger": {"calls": 41, "cached_calls": 3, "prompt_tokens": 9000, "completion_tokens": 800, "usd": 0.0123,
                       "per_endpoint": {"judge": {"calls": 41, "cached_calls": 3, "prompt_tokens": 9000,
                                                  "completion_tokens": 800, "usd": 0.0123}}}}


@pytest.fixture(scope="module")
def report() -> tuple[str, dict]:
    return build_report(fake_run(), load_targets(TARGETS))


def test_html_is_self_contained(report):
    page, _ = report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") >= 5  # histogram, funnel, domains, teachers, pct, loss, reliability


def test_each_steps_metrics_are_in_html_and_json(report):
    page, data = report
    json.dumps(data)  # JSON-able
    assert [s["step"] for s in data["steps"]] == ["data.score", "data.publish", "eval.run", "train.sft"]
    for s in data["steps"]:
        assert f">{s['step']} " in page
        for key, value in s["metrics_flat"].items():
            assert f"<td>{key}</td>" in page
            assert html.escape(fmt(value)) in page, (s["step"], key, value)
    publish = next(s for s in data["steps"] if s["step"] == "data.publish")
    assert publish["metrics"]["final_records"] == 29 and publish["metrics_flat"]["per_domain.code"] == 15
    train = next(s for s in data["steps"] if s["step"] == "train.sft")
    assert train["metrics_flat"]["loss_curve"].startswith("[50 items")  # a long list is summarized
    assert data["steps"][0]["reused"] and not data["steps"][1]["reused"]
    assert "reused from run old-run" in page
    assert data["summary"]["ledger"]["usd"] == 0.0123 and "0.0123" in page


def test_histogram_is_an_embedded_png(report):
    page, data = report
    hist = next(p for p in data["plots"] if p["id"] == "judge_score_histogram")
    assert hist["data"] == {"3": 4, "7": 12}  # data.publish's merged histogram wins over the shard's
    tag = re.search(r"<img alt='Judge scores'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert tag and tag.group(1).startswith(PNG_MAGIC)
    assert {p["id"] for p in data["plots"]} >= {"funnel", "per_domain", "pct_of_reference", "loss_curves"}
    assert any(p["id"].startswith("reliability:train.sft") for p in data["plots"])
    assert all(p.get("error") is None for p in data["plots"])


def test_targets_measured_or_not_measured(report):
    page, data = report
    by_id = {t["id"]: t for t in data["targets"]}
    code = by_id["eval_code"]
    assert code["measured"] == 75.0 and code["ci"] == [61.5, 88.2]
    assert code["status"] == "inconclusive"  # 72 lies inside [61.5, 88.2]: neither met nor not met
    assert by_id["eval_reasoning"]["measured"] == 62.5 and by_id["eval_reasoning"]["status"] == "inconclusive"
    assert by_id["judge_keep_threshold"]["measured"] == 7 and "configured" in by_id["judge_keep_threshold"]["source"]
    for tid in ("eval_automation", "eval_overall", "size_shipped_mb", "routing_accuracy", "calibration_ece",
                "dedup_jaccard"):
        assert by_id[tid]["measured"] is None and by_id[tid]["status"] == NOT_MEASURED
    row = re.search(r"<tr><td>eval</td><td>code &gt; 72% of GPT-4</td>.*?</tr>", page)
    assert row and fmt(75.0) in row.group(0) and "CI 61.5-88.2" in row.group(0)
    assert "class='inconclusive'>inconclusive</span>" in row.group(0)
    assert "the interval straddles the target (&gt; 72)" in row.group(0)
    row = re.search(r"<tr><td>phase4</td><td>97% routing accuracy on a 5K holdout</td>.*?</tr>", page)
    assert row and NOT_MEASURED in row.group(0)


def verdict_run() -> dict:
    """An evaluation with a met, an inconclusive, a not met and an undefined target, and a Phase 2 size table."""
    from cogumi_tasks.compress.sizes import plan_size_verdicts

    ev = manifest("b", "eval.run", "k3", "run-3", 300.0, {"pct_of_reference": {
        "code": {"ours": 0.9, "reference": 1.0, "pct": 90.0, "ci": [80.0, 99.0], "n": 30},
        "reasoning": {"ours": 0.1, "reference": 0.1, "pct": 100.0, "ci": [0.0, 300.0], "n": 10},
        "automation": {"ours": 0.4, "reference": 1.0, "pct": 40.0, "ci": [20.0, 60.0], "n": 30},
        "all": {"ours": 0.0, "reference": 0.0, "pct": None, "ci": None, "n": 70,
                "error": "all: reference scored 0; % of reference undefined"}}})
    measured = {"start": 538_100_000, "stage1": 538_100_000, "stage3": 112_100_000, "shipped": 112_100_000}
    sizes = manifest("b", "compress.publish", "k7", "run-3", 400.0,
                     {"size_gb": {"start": 0.5381}, "plan_sizes": plan_size_verdicts(measured, 134_515_008)})
    score = manifest("b", "data.score", "k1", "run-3", 100.0, {"judged": 1}, config={"dataset.score": {"threshold": 5}})
    return {"pipeline": "pipe", "run_id": "run-3", "manifests": [score, ev, sizes], "ledger": {}}


def test_target_verdicts_and_their_reasons_in_json_and_html():
    page, data = build_report(verdict_run(), load_targets(TARGETS))
    by_id = {t["id"]: t for t in data["targets"]}
    assert {k: by_id[k]["status"] for k in ("eval_code", "eval_reasoning", "eval_automation", "eval_overall",
                                            "judge_keep_threshold", "size_stage1", "size_stage2", "size_stage3",
                                            "size_shipped_mb", "size_start")} == {
        "eval_code": "met", "eval_reasoning": "inconclusive", "eval_automation": "not met",
        "eval_overall": "undefined", "judge_keep_threshold": "not met", "size_stage1": "not met",
        "size_stage2": NOT_MEASURED, "size_stage3": "not met", "size_shipped_mb": "not met", "size_start": "no check"}
    assert by_id["eval_code"]["reason"] == "90 (95% CI 80-99): the lower bound 80 clears > 72"
    assert by_id["eval_overall"]["reason"].startswith("all: reference scored 0; % of reference undefined")
    assert by_id["judge_keep_threshold"]["reason"] == (
        "5 >= 7: no (a single figure without an interval, compared directly)")

    def row(promised: str) -> str:
        found = re.search(rf"<tr><td>[^<]*</td><td>{re.escape(html.escape(promised))}</td>.*?</tr>", page, re.S)
        assert found, promised
        return found.group(0)

    # the demo's "reasoning > 70% of GPT-4: 100 (CI 0-300), met (the CI includes the target)"
    reasoning = row("reasoning > 70% of GPT-4")
    assert "<td class='inconclusive'>100 (CI 0-300)</td>" in reasoning
    assert "class='inconclusive'>inconclusive</span>" in reasoning and "straddles the target (&gt; 70)" in reasoning
    assert "class='met'>met</span>" in row("code > 72% of GPT-4")
    assert "class='notmet'>not met</span>" in row("automation > 75% of GPT-4")
    overall = row("89-91% of GPT-4 overall")
    assert "class='undefined'>undefined</span>" in overall and "reference scored 0" in overall
    assert "<td class='undefined'>-</td>" in overall  # never shown as 0%
    # the demo's "10 GB -> 3.5 GB: 0.5381, met": judged as the plan's ratio, the absolute figures beside it
    stage1 = row("10 GB -> 3.5 GB")
    assert "<td>&lt;= 0.35 x start</td>" in stage1 and "<td class='notmet'>0.5381 GB</td>" in stage1
    assert "= 1 x start (0.5381 GB) &lt;= the plan&#39;s 3.5/10 GB = 0.35 x start (= 0.1883 GB for this base)" in stage1
    assert "sizes on disk: no interval, compared directly" in stage1
    shipped = row("668 MB shipped")
    assert "<td class='notmet'>112.1 MB</td>" in shipped and "~ 6.692 GB, not 668 MB" in shipped
    assert NOT_MEASURED in row("3.5 GB -> 0.9 GB")  # AWQ not run: no figure, no verdict


def test_values_with_html_are_escaped():
    run = fake_run()
    label = "<script>alert('x')</script>"
    run["manifests"].append(manifest("b", "train.failure_analysis", "k5", "run-2", 500.0,
                                     {"clusters": [{"id": 0, "label": label, "size": 3}]}))
    run["manifests"].append(manifest("b", "eval.<b>odd</b>", "k6", "run-2", 600.0, {"n": 1}))
    page, data = build_report(run, load_targets(TARGETS))
    assert data["steps"][-2]["metrics_flat"]["clusters[0].label"] == label
    assert "<script" not in page and "<b>" not in page
    assert "<td>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</td>" in page
    assert ">eval.&lt;b&gt;odd&lt;/b&gt; <span" in page


def test_empty_run_and_bad_targets(tmp_path):
    page, data = build_report({"pipeline": "p", "run_id": "r", "manifests": [], "ledger": {}}, {"targets": []})
    assert data["steps"] == [] and "No step results" in page
    bad = tmp_path / "t.yaml"
    bad.write_text("targets:\n  - {id: x, phase: p, promised: y, step: s, path: a/b, check: {op: '~', value: 1}}\n")
    with pytest.raises(ValueError, match="check.op"):
        load_targets(bad)
    bad.write_text("targets:\n  - {id: x, phase: p}\n")
    with pytest.raises(ValueError, match="missing promised, step, path"):
        load_targets(bad)
    bad.write_text("targets:\n  - {id: x, phase: p, promised: y, step: s, path: a/b, interval: wide}\n")
    with pytest.raises(ValueError, match="interval must be"):
        load_targets(bad)


def test_a_size_beside_an_accuracy_and_its_interval_is_compared_directly():
    """The escalation student's dict holds its accuracy's ``ci``; its bytes and p99 must not be judged on it (a
    3.5 MB, 3.5 ms student read as "0.9 clears <= 3 MB" was reported met)."""
    pub = manifest("b", "routing.publish", "k5", "run-5", 400.0, {"escalation": {"student": {
        "accuracy": 0.84, "ci": [0.76, 0.9], "n": 100, "bytes": 3_500_000, "p99_ms": 3.5}}})
    _, data, by_id = report_of(pub)
    assert by_id["escalation_accuracy"]["ci"] == [0.76, 0.9] and by_id["escalation_accuracy"]["status"] == "not met"
    for tid in ("escalation_size", "escalation_latency"):
        assert by_id[tid]["ci"] is None and by_id[tid]["status"] == "not met", by_id[tid]


@pytest.mark.stack
def test_collect_run_and_write_report_on_s3(s3_server, store_for, tmp_path):
    from cogumi_tasks.core.artifacts import join_uri
    from cogumi_tasks.core.config import load_config

    config = load_config("tiny", {"name": "report-test"})
    store = store_for(config)
    bucket = config.storage.bucket
    run = fake_run(bucket)
    score, publish, ev, train = run["manifests"]
    for m in (score, publish, ev, train):
        m["prefix"] = m["prefix"].replace("/pipe/", "/report-test/")
        m["inputs"] = {k: v.replace("/pipe/", "/report-test/") for k, v in m["inputs"].items()}
    unrelated = manifest(bucket, "data.prompts", "k9", "other-run", 50.0, {"prompts": 3})
    unrelated["prefix"] = unrelated["prefix"].replace("/pipe/", "/report-test/")
    for m in (score, publish, ev, train, unrelated):
        store.put_json(join_uri(m["prefix"], "_manifest.json"), m)
    store.put_json(join_uri(score["prefix"], "_work", "_manifest.json"), {"not": "a manifest"})
    ledger_row = {"ts": 1, "step": "data.score", "endpoint": "judge", "model": "j", "prompt_tokens": 10,
                  "completion_tokens": 2, "batch": False, "cached": False, "usd": 0.5, "request_hash": "h"}
    store.put_bytes(store.uri("report-test", "_runs", "run-2", "ledger", "p.jsonl"), json.dumps(ledger_row).encode())

    got = collect_run(store, "report-test")  # the latest run: train.sft finished last
    assert got["run_id"] == "run-2"
    assert [m["step"] for m in got["manifests"]] == ["data.score", "data.publish", "eval.run", "train.sft"]
    assert got["ledger"]["calls"] == 1 and got["ledger"]["usd"] == 0.5
    assert [m["step"] for m in collect_run(store, "report-test", "other-run")["manifests"]] == ["data.prompts"]

    html_path, json_path = write_report(store, "report-test", None, tmp_path, TARGETS)
    assert html_path.name == "report-run-2.html" and json.loads(json_path.read_text())["run_id"] == "run-2"
    uploaded = sorted(store.list(store.uri("report-test", "_reports", "run-2") + "/"))
    assert [u.rsplit("/", 1)[1] for u in uploaded] == ["report-run-2.html", "report-run-2.json"]
    assert store.get_bytes(uploaded[0]).decode() == html_path.read_text()


def test_pct_target_against_a_reference_that_solved_nothing_is_judged_on_the_score():
    ev = manifest("b", "eval.run", "k3", "run-4", 300.0, {"pct_of_reference": {
        "reasoning": {"ours": 0.6, "reference": 0.0, "pct": None, "ci": None, "n": 20, "score_ci": [0.4, 0.8],
                      "error": "reasoning: reference scored 0; % of reference undefined"},
        "automation": {"ours": 0.0, "reference": 0.0, "pct": None, "ci": None, "n": 20, "score_ci": [0.0, 0.0],
                       "error": "automation: reference scored 0; % of reference undefined"}}})
    _, data, by_id = report_of(ev)
    assert by_id["eval_reasoning"]["status"] == "met" and by_id["eval_reasoning"]["measured"] is None
    assert "reference scored 0" in by_id["eval_reasoning"]["reason"]
    assert "score in % 60 (95% CI 40-80): the lower bound 40 clears > 0" in by_id["eval_reasoning"]["reason"]
    assert by_id["eval_automation"]["status"] == "not met"


def test_ece_target_is_judged_by_the_calibrate_step_with_the_floor_in_its_reason():
    import numpy as np

    from cogumi_tasks.compress.calibration import calibrate, ece_gate

    rng = np.random.default_rng(6)
    conf = rng.uniform(0.05, 0.95, 96)
    report = calibrate([{"confidence": c} for c in conf], (rng.uniform(size=96) < conf).tolist(), target=0.05)
    report["ece_gate"] = ece_gate(report, 0.05)
    cal = manifest("b", "compress.calibrate", "k8", "run-3", 500.0, report)
    page, data, by_id = report_of(cal)
    for tid in ("calibration_ece_phase2", "calibration_ece"):
        row = by_id[tid]
        assert (row["measured"], row["ci"]) == (report["ece_after"], report["ece_after_ci"])
        assert row["status"] == ("met" if report["ece_after_ci"][1] < 0.05 else
                                 "not met" if report["ece_after_ci"][0] >= 0.05 else "inconclusive")
        assert row["reason"].endswith(f"at {report['ece_floor']['items_for_target']} test items (sizes doubled "
                                      "from the 96 calibration items)")
    assert "a perfectly calibrated model with these confidences scores ECE" in page


def test_phase5_targets_read_serve_validates_figures():
    """The release gates and the decode speed are judged on what serve.validate records (its pct_of_reference
    table and deploy.decode_rate), so a renamed key shows up here as "not measured"."""
    from cogumi_tasks.eval.stats import pct_of_reference
    from cogumi_tasks.serve.deploy import decode_rate

    rows = [{"domain": d, "ours": float(i % 3 != 0), "reference": float(i % 2 == 0)}
            for d in ("code", "reasoning", "automation") for i in range(12)]
    answers = [{"completion_tokens": 41, "seconds": 1.0, "decode_s": 0.5 + 0.01 * i} for i in range(10)]
    metrics = {"pct_of_reference": pct_of_reference(rows), "tokens_per_s": decode_rate(answers)}
    _, _, by_id = report_of(manifest("b", "serve.validate", "k9", "run-3", 700.0, metrics))
    for domain, gate in (("code", 72), ("reasoning", 70), ("automation", 75)):
        row = by_id[f"release_{domain}"]
        assert row["measured"] == metrics["pct_of_reference"][domain]["pct"] and row["check"]["value"] == gate
        assert row["status"] in ("met", "inconclusive", "not met") and row["ci"] is not None
    speed = by_id["release_decode_speed"]
    assert speed["measured"] == metrics["tokens_per_s"]["decode"] < 80 and speed["ci"][1] < 80
    assert speed["status"] == "met" and speed["check"] == {"op": ">=", "value": 60}  # 40 tokens in 0.5-0.59 s


def test_phase3_section_reads_modifiers_publish():
    """The Phase 3 targets, the scores table and the bar chart read what modifiers.publish records (modifiers.evaluate's
    table under ``scores``, built here with the helpers that step uses; the cascade's saving), so a renamed key shows
    up here as "not measured"."""
    from cogumi_tasks.core.verdict import judge
    from cogumi_tasks.eval.tables import accuracy, paired_difference, pct_entry

    domains = ("code", "reasoning", "automation")
    base = {d: [float(i % 3 == 0) for i in range(20)] for d in domains}  # 7 of 20
    ref = [float(i % 5 == 0) for i in range(20)]  # 4 of 20

    def entry(scores: list[float], versus: list[float] | None = None) -> dict:
        e = {"n": 20, "accuracy": accuracy(scores, 200, 0), "reference": accuracy(ref, 200, 0),
             "pct_of_reference": pct_entry(scores, ref, 200, 0)}
        return e | ({"vs_base": paired_difference(scores, versus, 200, 0)} if versus is not None else {})

    table = {"base": {d: entry(base[d]) for d in domains}}
    for d in domains:  # each modifier solves its whole domain and leaves the others as the base answers them
        table[d] = {o: entry([1.0] * 20 if o == d else base[o], base[o]) for o in domains}
    verdicts = {d: {"domain": d, "raises_domain": judge(table[d][d]["vs_base"]["points"], ">", 0,
                                                        table[d][d]["vs_base"]["ci"]).as_dict(),
                    "others": {o: {**table[d][o]["vs_base"], "hurts": False} for o in domains if o != d}}
                for d in domains}
    metrics = {"modifiers": {}, "cascade": {"saving": 0.4}, "scores": {"table": table, "verdicts": verdicts}}
    page, data, by_id = report_of(manifest("b", "modifiers.publish", "k7", "run-4", 800.0, metrics))
    for domain, plan in (("code", 115), ("reasoning", 100), ("automation", 105)):
        pct = by_id[f"modifier_{domain}_vs_reference"]
        assert pct["measured"] == table[domain][domain]["pct_of_reference"]["pct"] == 500.0
        assert pct["check"]["value"] == plan and pct["ci"] is not None and pct["status"] == "met"
        raised = by_id[f"modifier_{domain}_raises_domain"]
        assert raised["measured"] == 65.0 and raised["status"] == "met"  # 20 of 20 against 7 of 20
    assert by_id["cascade_saving"]["measured"] == 0.4 and by_id["cascade_saving"]["status"] == "not met"
    scores = next(t for t in data["tables"] if t["id"] == "modifier-scores")
    assert [r[0] for r in scores["rows"][:3]] == ["base"] * 3 and len(scores["rows"]) == 3 + 3 * 3
    code = next(r for r in scores["rows"] if r[:2] == ["code", "code"])
    assert code[2] == "100.0% (CI 100.0%-100.0%)" and code[6].startswith("raises its domain: met (")
    assert next(r for r in scores["rows"] if r[:2] == ["code", "reasoning"])[6] == "does not hurt this domain"
    plot = next(p for p in data["plots"] if p["id"] == "modifier_scores")
    assert "error" not in plot and plot["phase"] == "Phase 3: modifiers"  # drawn (the JSON leaves the PNG out)
    assert html.escape(plot["title"]) in page and "raises its domain: met" in page


def test_step_time_per_phase_and_the_phase3_time_target():
    """The run summary's time table sums each phase's step seconds and spans first start to last finish; the
    Phase 3 time target reads that span, and has none when two runs made Phase 3's steps."""
    def timed(step: str, key: str, run_id: str, start: float, seconds: float, cpus: int | None = 2) -> dict:
        m = manifest("b", step, key, run_id, start + seconds, {})
        m["timings"] = {"started": start, "finished": start + seconds, "seconds": seconds,
                        **({"cpus": cpus} if cpus else {})}
        return m

    data_step = timed("data.publish", "d1", "run-1", 0.0, 30.0, cpus=None)  # an older manifest: no cpus
    mods = [timed("modifiers.test", "m1", "run-2", 100.0, 200.0), timed("modifiers.publish", "m2", "run-2", 310.0, 5.0)]
    page, data, by_id = report_of(data_step, *mods)
    table = next(t for t in data["tables"] if t["id"] == "phase-time")
    assert [r[0] for r in table["rows"]] == ["Phase 0: dataset", "Phase 3: modifiers"]  # phase order
    assert table["rows"][1] == ["Phase 3: modifiers", 2, 1, 205.0, 215.0, "2"]
    assert table["rows"][0][-1] == "not recorded" and html.escape(table["title"]) in page
    target = by_id["phase3_task_seconds"]
    assert target["measured"] == 215.0 and target["status"] == "met" and target["source"].startswith("report.")

    _, _, by_id = report_of(data_step, mods[0], timed("modifiers.publish", "m2", "run-2", 310.0, 300.0))
    assert by_id["phase3_task_seconds"]["measured"] == 510.0 and by_id["phase3_task_seconds"]["status"] == "not met"

    _, data, by_id = report_of(timed("modifiers.test", "m1", "run-1", 100.0, 200.0), mods[1])
    assert by_id["phase3_task_seconds"]["measured"] is None and by_id["phase3_task_seconds"]["status"] == "undefined"
    assert "2 runs" in by_id["phase3_task_seconds"]["reason"]
