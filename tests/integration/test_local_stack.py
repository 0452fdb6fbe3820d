"""The local stack end to end, isolated from a user's demo stack: a temporary COGUMI_HOME, free ports,
and throwaway DAGs in a temporary dags folder (so it does not depend on the pipeline's DAGs)."""

from __future__ import annotations

import os
import socket
import stat
import textwrap
import time

import pytest

from cogumi_tasks.stack import local, services
from cogumi_tasks.stack.demo import AirflowREST, follow, run_demo
from cogumi_tasks.stack.services import ServiceError
from tests.servers.procs import descendants, listening, pick_base_port

pytestmark = pytest.mark.stack

SMOKE_DAGS = '''
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG


def _publish(**context):
    """Write a manifest to S3 with the credentials and endpoint the stack gives tasks, and which heavy libraries
    this task process found already imported (PreloadLocalExecutor's; nothing here imports them)."""
    import os
    import sys

    preloaded = sorted(m for m in ("torch", "transformers", "peft", "llama_cpp") if m in sys.modules)

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig

    store = ArtifactStore(StorageConfig(bucket="cogumi"))
    uri = store.uri("smoke", context["run_id"].replace(":", "_").replace("+", "_"), "_manifest.json")
    store.put_json(uri, {"outputs": {"dataset": "s3://cogumi/smoke/data.jsonl"},
                         "metrics": {"prompts": 3, "final_records": 2, "cost": {"usd": 0.0, "calls": 4}},
                         "params": dict(context["params"]), "llm_url": os.environ["COGUMI_LLM_URL"],
                         "preloaded": preloaded})
    return {"manifest": uri}


def _fail():
    raise ValueError("smoke failure on purpose")


with DAG("cogumi_smoke", schedule=None, catchup=False, params={"config": "tiny", "prompt_limit": None}):
    PythonOperator(task_id="publish", python_callable=_publish)

with DAG("cogumi_smoke_fail", schedule=None, catchup=False):
    PythonOperator(task_id="boom", python_callable=_fail)
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    dags = root / "dags"
    dags.mkdir()
    (dags / "cogumi_smoke.py").write_text(textwrap.dedent(SMOKE_DAGS))
    base = pick_base_port((20, 21, 22), 20000, 22000)
    settings = local.Settings.from_env({}, home=root / "home", s3_port=base, llm_port=base + 20,
                                       airflow_port=base + 21, strong_port=base + 22, dags_folder=dags)
    t0 = time.monotonic()
    try:
        pids = local.up(settings)
        print(f"stack up in {time.monotonic() - t0:.1f}s")
        yield settings, pids
    finally:
        local.down(settings)


def test_up_binds_loopback_only(stack):
    settings, pids = stack
    assert set(pids) == set(local.SERVICES)
    assert all(local.pid_alive(r["pid"]) for r in pids.values())
    ours = descendants({r["pid"] for r in pids.values()})
    sockets = listening(ours)
    ports = {p for _, p, _ in sockets}
    assert {settings.s3_port, settings.llm_port, settings.strong_port, settings.airflow_port} <= ports
    assert all(addr == "127.0.0.1" for addr, _, _ in sockets), sockets
    assert stat.S_IMODE(settings.secrets_file.stat().st_mode) == 0o600
    assert all(r["healthy"] for r in local.status(settings))


def test_up_creates_the_configs_pools(stack):
    settings, _ = stack
    api = AirflowREST(settings.airflow_url, "admin", local.load_secrets(settings)["COGUMI_AIRFLOW_PASSWORD"])
    pool = api.request("GET", "/pools/cogumi_cpu")
    assert pool["slots"] == 1 and "compress.quantize_awq" in pool["description"]
    assert not local.sync_pools(settings)  # unchanged: no second import


def test_second_up_reuses(stack):
    settings, pids = stack
    lines: list[str] = []
    again = local.up(settings, log=lines.append)
    assert {n: r["pid"] for n, r in again.items()} == {n: r["pid"] for n, r in pids.items()}
    assert sum("reusing" in line for line in lines) == len(local.SERVICES)


def test_smoke_dag_through_rest(stack):
    settings, _ = stack
    api = AirflowREST(settings.airflow_url, "admin", local.load_secrets(settings)["COGUMI_AIRFLOW_PASSWORD"])
    api.wait_for_dag("cogumi_smoke", timeout_s=90)
    api.unpause("cogumi_smoke")
    run_id = api.trigger("cogumi_smoke", {"config": "tiny", "prompt_limit": 3})
    state, tis = follow(api, "cogumi_smoke", run_id, timeout_s=90, poll_s=1)
    assert state == "success", tis
    value = api.xcom("cogumi_smoke", run_id, "publish")
    assert isinstance(value, dict) and value["manifest"].startswith("s3://cogumi/smoke/")

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig

    store = ArtifactStore(StorageConfig(bucket="cogumi", endpoint_url=settings.s3_endpoint),
                          local.s3_credentials(settings))
    manifest = store.get_json(value["manifest"])
    assert manifest["params"]["prompt_limit"] == 3
    assert manifest["llm_url"] == settings.llm_url
    # the task was forked from an executor worker that had imported them (cogumi_provider.executors)
    assert manifest["preloaded"] == ["llama_cpp", "peft", "torch", "transformers"]


def test_failed_task_log_tail(stack):
    settings, _ = stack
    api = AirflowREST(settings.airflow_url, "admin", local.load_secrets(settings)["COGUMI_AIRFLOW_PASSWORD"])
    api.wait_for_dag("cogumi_smoke_fail", timeout_s=90)
    run_id = api.trigger("cogumi_smoke_fail")
    state, tis = follow(api, "cogumi_smoke_fail", run_id, timeout_s=90, poll_s=1)
    assert state == "failed"
    ti = next(t for t in tis if t["task_id"] == "boom")
    assert "smoke failure on purpose" in api.log_tail("cogumi_smoke_fail", run_id, "boom", ti["try_number"])


def test_run_demo_report(stack, capsys):
    settings, _ = stack
    lines: list[str] = []
    rc = run_demo("tiny", {"prompt_limit": 2}, timeout_s=90, dag_id="cogumi_smoke", settings=settings,
                  log=lines.append)
    text = "\n".join(lines) + capsys.readouterr().out
    assert rc == 0, text
    assert "dataset: s3://cogumi/smoke/data.jsonl" in text
    assert "final_records" in text and "cost.calls" in text
    assert f"{settings.airflow_url}/dags/cogumi_smoke/runs/" in text and "make stop" in text
    assert str(settings.secrets_file) in text  # where the login is, never the password itself
    assert all(v not in text for v in local.load_secrets(settings).values())


def test_port_conflict_is_clear(stack, tmp_path):
    settings, _ = stack
    with socket.socket() as blocker:
        port = pick_base_port((20, 21), 20000, 22000)
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        other = local.Settings.from_env({}, home=tmp_path / "home", s3_port=port)
        with pytest.raises(ServiceError) as err:
            local.up(other, log=lambda _: None)
        msg = str(err.value)
        assert str(port) in msg and "COGUMI_S3_PORT" in msg and f"pid={os.getpid()}" not in msg
        assert f"pid {os.getpid()}" in msg
        assert not local.read_pids(other)
        busy = local.Settings.from_env({}, home=tmp_path / "home", airflow_port=port)
        with pytest.raises(ServiceError, match=f"port {port}.*COGUMI_AIRFLOW_PORT"):
            local._check_ports(busy, "api-server")


def test_up_restarts_airflow_and_the_strong_tier_when_the_code_changed(stack, tmp_path, monkeypatch):
    settings, pids = stack
    plugins, configs = tmp_path / "plugins", tmp_path / "configs"
    plugins.mkdir()
    configs.mkdir()
    (plugins / "a.py").write_text("x = 1\n")
    probe = local.Settings.from_env({}, home=tmp_path, plugins_folder=plugins, config_dir=configs)
    before = local.code_fingerprint(probe)
    os.utime(plugins / "a.py", ns=(0, 10**9))
    assert local.code_fingerprint(probe) != before

    monkeypatch.setattr(local, "code_fingerprint", lambda s: "edited")
    lines: list[str] = []
    again = local.up(settings, log=lines.append)
    restarted = {n for n in local.SERVICES if again[n]["pid"] != pids[n]["pid"]}
    assert restarted == set(local.CODE_SERVICES) == {"strong", *local.AIRFLOW_SERVICES}, lines
    assert sum("the code or configs changed" in line for line in lines) == len(local.CODE_SERVICES)
    pids.update(again)  # later tests in this module see the new processes


def test_down_stops_everything(stack):
    settings, pids = stack
    stopped = local.down(settings)
    assert set(stopped) == set(local.SERVICES)
    assert not any(local.pid_alive(r["pid"]) for r in pids.values())
    assert local.read_pids(settings) == {}
    assert services.port_is_free(settings.airflow_port) and services.port_is_free(settings.s3_port)
