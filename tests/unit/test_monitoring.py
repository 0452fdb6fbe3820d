"""Monitoring of the serving gateway: Prometheus config and alert rules (promtool), the Grafana
dashboard built in code (round trip, every panel's PromQL through promtool), and the metric names of
the serve contract as the gateway really exports them.

promtool comes from Debian's ``prometheus`` package (``make install``); the promtool tests skip only
where it is missing, and ``test_promtool_present_in_ci`` makes CI fail in that case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cogumi_tasks.serve import dashboard

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "cogumi.rules.yml"
RULE_TESTS = MONITORING / "rules" / "cogumi.rules.test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "cogumi.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# The metrics the gateway exports (the serve contract): name -> (type, label names).
CONTRACT = {
    "cogumi_requests_total": ("counter", {"model", "route", "status"}),
    "cogumi_request_seconds": ("histogram", {"route"}),
    "cogumi_ttft_seconds": ("histogram", {"route"}),
    "cogumi_completion_tokens_total": ("counter", {"route"}),
    "cogumi_decode_tokens_per_second": ("histogram", {"route"}),
    "cogumi_routes_total": ("counter", {"route", "reason"}),
    "cogumi_escalations_total": ("counter", {"from_route", "to_route"}),
    "cogumi_cost_usd_total": ("counter", {"route"}),
    "cogumi_errors_total": ("counter", {"kind"}),
    "cogumi_feedback_total": ("counter", {"route", "value"}),
    "cogumi_release_info": ("gauge", {"release"}),
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install -y prometheus; the Makefile does it)"
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def metric_names(expr: str) -> set[str]:
    """The cogumi_* series an expression reads, histogram suffixes folded onto the metric."""
    names = set()
    for name in re.findall(r"\b(cogumi_[a-z0-9_]+)\b", expr):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        names.add(base if CONTRACT.get(base, ("",))[0] == "histogram" else name)
    return names


def rules_doc() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerts() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in rules_doc()["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_present_in_ci():
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI (CI is not set)")
    assert PROMTOOL, "CI must install Debian's prometheus package (promtool)"


# ------------------------------------------------------------------------------- Prometheus
@needs_promtool
def test_prometheus_config_is_valid():
    res = promtool("check", "config", str(PROMETHEUS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 1 rule files found" in res.stdout  # rules/*.rules.yml, not the test file


@needs_promtool
def test_prometheus_config_with_compose_targets(tmp_path):
    """The layout docker-compose mounts: the config, rules/ and targets/compose/ as targets/."""
    shutil.copy(PROMETHEUS, tmp_path / "prometheus.yml")
    shutil.copytree(MONITORING / "rules", tmp_path / "rules")
    shutil.copytree(MONITORING / "targets" / "compose", tmp_path / "targets")
    res = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr  # every job's targets file is found and valid
    jobs = {j["job_name"] for j in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert jobs == {"cogumi-gateway", "airflow", "prometheus"}
    gateway = yaml.safe_load((tmp_path / "targets" / "gateway.yml").read_text())
    assert gateway[0]["targets"] == ["serve:8400"]


@needs_promtool
def test_alert_rules_pass_their_unit_tests():
    res = promtool("test", "rules", str(RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        (
            "CogumiHighErrorRate",
            "/ sum(rate(cogumi_requests_total[5m])) > 0.05",
            "/ sum(rate(cogumi_requests_total[5m])) > 0.5",
        ),
        (
            "CogumiHighP99Latency",
            "(0.99, sum by (le) (rate(cogumi_request_seconds",
            "(0.9, sum by (le) (rate(cogumi_request_seconds",
        ),
        ("CogumiEscalationSpike", "> 2 * (", "> 20 * ("),
    ],
)
def test_rule_tests_catch_a_changed_rule(tmp_path, alert, old, new):
    """The unit tests pin each rule: a weakened threshold makes `promtool test rules` fail on it."""
    text = RULES.read_text()
    assert text.count(old) == 1
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["tests"] = [t for t in tests["tests"] if any(c["alertname"] == alert for c in t["alert_rule_test"])]
    (tmp_path / RULE_TESTS.name).write_text(yaml.safe_dump(tests))
    # (as committed, the same cases pass: test_alert_rules_pass_their_unit_tests)
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    res = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert res.returncode != 0
    assert f"alertname: {alert}" in res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert {"CogumiHighErrorRate", "CogumiHighP99Latency", "CogumiEscalationSpike"} <= set(alerts())
    for name in alerts():
        assert cases.get(name) == {True, False}, f"{name}: cases {cases.get(name)}"


def test_rules_read_only_contract_metrics():
    for name, expr in alerts().items():
        used = metric_names(expr)
        assert used or 'up{job="cogumi-gateway"}' in expr, name
        assert used <= set(CONTRACT), (name, used - set(CONTRACT))
    assert "cogumi_request_seconds" in metric_names(alerts()["CogumiHighP99Latency"])


# ------------------------------------------------------------------------------------ Grafana
def test_committed_dashboard_is_the_builder_output():
    assert DASHBOARD.read_text() == dashboard.dashboard_json(), (
        "regenerate: python -m cogumi_tasks.serve.dashboard monitoring/grafana/dashboards/cogumi.json"
    )


def test_dashboard_round_trips_through_the_sdk_model():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    committed = json.loads(DASHBOARD.read_text())
    again = json.loads(json.dumps(Dashboard.from_json(committed), cls=JSONEncoder))
    assert again == committed


def test_dashboard_panels_and_datasource():
    dash = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["uid"] == dashboard.DATASOURCE_UID
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for wanted in (
        "Query volume",
        "Route mix",
        "Quality from feedback",
        "Request latency",
        "Time to first token",
        "Tokens/s",
        "Escalations",
        "Cost",
        "Errors by kind",
    ):
        assert wanted in titles, wanted
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs == dashboard.expressions()


def test_dashboard_reads_every_contract_metric_and_nothing_else():
    used = set().union(*(metric_names(e) for e in dashboard.expressions()))
    assert used == set(CONTRACT)


@needs_promtool
def test_every_panel_query_is_valid_promql(tmp_path):
    exprs = dashboard.expressions()
    path = tmp_path / "panels.rules.yml"
    rules = [{"record": f"cogumi:panel_query:{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout

    # The same check rejects a broken query.
    rules.append({"record": "cogumi:panel_query:broken", "expr": "sum(rate(cogumi_requests_total[5m])"})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


# ------------------------------------------------------------------- what the gateway exports
def exposition() -> str:
    """The gateway's /metrics text after one answered, one refused and one of each event."""
    from cogumi_tasks.serve.metrics import Metrics

    m = Metrics(release="rel-test")
    m.answered("cogumi-auto", "code", 200, seconds=1.5, ttft=0.25, tokens=41, decode_s=0.8, cost_usd=0.002)
    m.refused("cogumi-auto", 401, "auth")
    m.routes.labels(route="code", reason="router").inc()
    m.escalations.labels(from_route="base", to_route="reasoning").inc()
    m.feedback.labels(route="code", value="up").inc()
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    return body.decode()


def test_gateway_exports_the_contract_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    exported = {}
    for family in text_string_to_metric_families(exposition()):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = set().union(*(s.labels for s in family.samples)) - {"le"}
        exported[name] = (family.type, labels)
    for name, (kind, labels) in CONTRACT.items():
        assert name in exported, f"{name} is not exported"
        assert exported[name] == (kind, labels), name


@needs_promtool
def test_gateway_exposition_passes_promtool():
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # and promtool does flag a bad exposition
    bad = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input="# TYPE cogumi_x counter\ncogumi_x 1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
