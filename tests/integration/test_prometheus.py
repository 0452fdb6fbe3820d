"""Prometheus from the local stack (Debian's package) on loopback scrapes a gateway-like exporter: the committed
monitoring config with file_sd targets written by ``prometheus_run_dir``, the rules loaded, the samples queryable."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.parse
import urllib.request

import pytest

from cogumi_tasks.serve.metrics import Metrics
from cogumi_tasks.stack.services import HOST, ServiceError, free_port, prometheus_run_dir, start_prometheus, stop

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus not installed")


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://{HOST}:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def exporter():
    """The gateway's metrics (cogumi_tasks.serve.metrics) served on loopback after one answered request."""
    from prometheus_client import start_http_server

    metrics = Metrics(release="rel-prom-test")
    metrics.answered("cogumi-auto", "code", 200, seconds=1.5, ttft=0.25, tokens=41, decode_s=0.8, cost_usd=0.002)
    port = free_port()
    server, thread = start_http_server(port, addr=HOST, registry=metrics.registry)
    yield port
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_prometheus_scrapes_the_gateway_and_loads_the_rules(tmp_path, exporter):
    port = free_port()
    config = prometheus_run_dir(tmp_path / "run", {"gateway": [f"{HOST}:{exporter}"], "prometheus": [f"{HOST}:{port}"]})
    proc = start_prometheus(config, port, tmp_path / "data", tmp_path / "prometheus.log")
    try:
        deadline = time.monotonic() + 90  # the first scrape comes within one scrape_interval (15 s)
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            targets = api(port, "targets")["activeTargets"]
            health = {t["labels"]["job"]: t["health"] for t in targets}
            if health == {"cogumi-gateway": "up", "prometheus": "up"}:
                break
            time.sleep(1)
        assert health == {"cogumi-gateway": "up", "prometheus": "up"}, (
            health,
            (tmp_path / "prometheus.log").read_text(),
        )

        result = api(port, "query", query="cogumi_release_info")["result"]
        assert [r["metric"]["release"] for r in result] == ["rel-prom-test"]
        assert result[0]["metric"]["stack"] == "local"
        tokens = api(port, "query", query='cogumi_completion_tokens_total{route="code"}')["result"]
        assert [float(r["value"][1]) for r in tokens] == [41.0]

        alerts = {r["name"] for g in api(port, "rules")["groups"] for r in g["rules"] if r["type"] == "alerting"}
        assert {"CogumiGatewayDown", "CogumiHighErrorRate", "CogumiHighP99Latency", "CogumiEscalationSpike"} <= alerts
    finally:
        stop(proc)
    assert proc.poll() is not None


def test_unknown_job_and_taken_port_are_refused(tmp_path):
    with pytest.raises(ServiceError, match="no scrape job reads targets for \\['gatewy'\\]"):
        prometheus_run_dir(tmp_path / "run", {"gatewy": ["127.0.0.1:1"]})
    config = prometheus_run_dir(tmp_path / "run", {})
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        with pytest.raises(ServiceError, match="in use"):
            start_prometheus(config, s.getsockname()[1], tmp_path / "data", tmp_path / "prometheus.log")
