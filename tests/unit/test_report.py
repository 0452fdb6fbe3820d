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
    assert code["status"] == "met (the CI includes the target)"  # 72 lies inside [61.5, 88.2]
    assert by_id["eval_reasoning"]["measured"] == 62.5 and by_id["eval_reasoning"]["status"].startswith("not met")
    assert by_id["judge_keep_threshold"]["measured"] == 7 and "configured" in by_id["judge_keep_threshold"]["source"]
    for tid in ("eval_automation", "eval_overall", "size_shipped_mb", "routing_accuracy", "calibration_ece",
                "dedup_jaccard"):
        assert by_id[tid]["measured"] is None and by_id[tid]["status"] == NOT_MEASURED
    row = re.search(r"<tr><td>eval</td><td>code &gt; 72% of GPT-4</td>.*?</tr>", page)
    assert row and fmt(75.0) in row.group(0) and "CI 61.5-88.2" in row.group(0)
    assert "class='met'>met (the CI" in row.group(0)
    row = re.search(r"<tr><td>phase4</td><td>97% routing accuracy</td>.*?</tr>", page)
    assert row and NOT_MEASURED in row.group(0)


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
