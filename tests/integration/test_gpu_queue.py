"""``compute: gpu_queue`` end to end: the deployment config routes ``data.prompts`` to queue ``gpu`` on the
Edge executor at parse time, and a real ``airflow edge worker -q gpu`` process (no listening port, tasks
over HTTP) runs it against an isolated local stack (temporary COGUMI_HOME, free loopback ports)."""

from __future__ import annotations

import secrets
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cogumi_tasks.core.config import apply_overrides
from cogumi_tasks.stack import local, services
from cogumi_tasks.stack.demo import AirflowREST, follow
from tests.servers.procs import descendants, listening, pick_base_port

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "cogumi_gpu_queue_check"
EDGE_EXECUTOR = "airflow.providers.edge3.executors.EdgeExecutor"

GPU_DAG = f'''
from airflow.sdk import DAG

from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import placement, run_params

with DAG("{DAG_ID}", schedule=None, catchup=False, params=run_params()):
    CogumiStepOperator(task_id="prompts", step="data.prompts", return_output="shards", **placement("data.prompts"))
'''


def _gpu_config(folder: Path, name: str) -> str:
    """A config derived from tiny.yaml that places ``data.prompts`` on the gpu queue."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data = apply_overrides(data, {"name": name, "compute.steps": {"data.prompts": "gpu_queue"},
                                  "dataset.prompts.limit": 8, "dataset.prompts.world.families": {}}, "test")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory):
    """The stack with LocalExecutor + EdgeExecutor and the Edge API on, a gpu_queue deployment config,
    and one ``airflow edge worker -q gpu``. Teardown: the worker first, then the stack."""
    root = tmp_path_factory.mktemp("gpu-stack")
    dags = root / "dags"
    dags.mkdir()
    (dags / "cogumi_gpu_queue_check.py").write_text(textwrap.dedent(GPU_DAG))
    config = _gpu_config(root, f"gpuq-{secrets.token_hex(4)}")
    base = pick_base_port((20, 21, 22), 22000, 24000)
    airflow_url = f"http://127.0.0.1:{base + 21}"
    extra = {
        "AIRFLOW__CORE__EXECUTOR": f"LocalExecutor,{EDGE_EXECUTOR}",
        "AIRFLOW__EDGE__API_ENABLED": "True",
        "AIRFLOW__EDGE__API_URL": f"{airflow_url}/edge_worker/v1/rpcapi",
        # The worker starts a fetch every poll interval without waiting for the last one, and on SQLite the
        # API server's FOR UPDATE SKIP LOCKED is a no-op: two fetches in flight at once both took the same job
        # (seen with 1 s on a loaded machine: the second fork got 409 "running elsewhere" and failed the task).
        # Airflow's default of 5 s leaves a slow fetch that much time to end first.
        "AIRFLOW__EDGE__JOB_POLL_INTERVAL": "5",
        "AIRFLOW__EDGE__HEARTBEAT_INTERVAL": "5",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",  # conftest sets it for in-process tests; not for the stack
        "COGUMI_CONFIG": config,
    }
    settings = local.Settings.from_env({}, home=root / "home", s3_port=base, llm_port=base + 20,
                                       airflow_port=base + 21, strong_port=base + 22, dags_folder=dags,
                                       extra_env=extra)  # every port free: a running make demo holds the defaults
    worker_name = f"cogumi-gpu-{secrets.token_hex(3)}"
    worker_log = settings.logs_dir / "edge-worker.log"
    worker = None
    try:
        local.up(settings)
        # Only the stack's environment (the conftest's AIRFLOW_* point at the in-process test database).
        worker = services.spawn([services.venv_bin("airflow"), "edge", "worker", "-q", "gpu", "-c", "1",
                                 "-H", worker_name], worker_log, env=local.env(settings),
                                cwd=settings.airflow_home)
        yield SimpleNamespace(settings=settings, config=config, worker=worker, worker_name=worker_name,
                              worker_log=worker_log)
    finally:
        if worker is not None:
            services.stop(worker)  # before the API server it talks to
        local.down(settings)


def _edge(api: AirflowREST, path: str, **params) -> dict:
    resp = api.http.get(f"/edge_worker/ui/{path}", params=params)
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()


@pytest.mark.stack
def test_gpu_queue_runs_on_edge_worker(gpu_stack):
    s = gpu_stack.settings
    api = AirflowREST(s.airflow_url, "admin", local.load_secrets(s)["COGUMI_AIRFLOW_PASSWORD"])
    api.wait_for_dag(DAG_ID, timeout_s=90)
    deadline = time.monotonic() + 60  # the worker registers itself over HTTP
    while not [w for w in _edge(api, "worker")["workers"] if w["worker_name"] == gpu_stack.worker_name]:
        assert gpu_stack.worker.poll() is None, gpu_stack.worker_log.read_text()[-3000:]
        assert time.monotonic() < deadline, gpu_stack.worker_log.read_text()[-3000:]
        time.sleep(1)
    worker = next(w for w in _edge(api, "worker")["workers"] if w["worker_name"] == gpu_stack.worker_name)
    assert worker["queues"] == ["gpu"]

    run_id = api.trigger(DAG_ID, {"config": gpu_stack.config})
    state, tis = follow(api, DAG_ID, run_id, timeout_s=150, poll_s=1)
    ti = next(t for t in tis if t["task_id"] == "prompts")
    assert state == "success", api.log_tail(DAG_ID, run_id, "prompts", ti["try_number"] or 1)
    assert ti["queue"] == "gpu"
    assert ti["executor"] == "EdgeExecutor"

    # The Edge worker, not the LocalExecutor, ran it: its job record names our worker.
    # (the job's own state is reported by the worker a moment after the task instance's)
    deadline = time.monotonic() + 30
    while True:
        jobs = [j for j in _edge(api, "jobs", dag_id_pattern=DAG_ID)["jobs"] if j["run_id"] == run_id]
        seen = [(j["task_id"], j["queue"], j["state"], j["edge_worker"]) for j in jobs]
        if seen != [("prompts", "gpu", "running", gpu_stack.worker_name)] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert seen == [("prompts", "gpu", "success", gpu_stack.worker_name)]

    # The worker ran it over HTTP, listening on nothing.
    assert gpu_stack.worker.poll() is None
    assert listening(descendants({gpu_stack.worker.pid})) == []

    shards = api.xcom(DAG_ID, run_id, "prompts")
    assert isinstance(shards, list) and len(shards) == 2
    assert all(u.startswith("s3://cogumi/") and u.endswith(".jsonl") for u in shards)
    manifest_uri = api.xcom(DAG_ID, run_id, "prompts", key="manifest")

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig

    store = ArtifactStore(StorageConfig(bucket=local.BUCKET, endpoint_url=s.s3_endpoint), local.s3_credentials(s))
    manifest = store.get_json(manifest_uri)
    assert manifest["metrics"]["prompts"] == 8
    assert all(store.exists(u) for u in shards)


def test_gpu_queue_step_parsed_onto_default_queue_fails_clearly(tmp_path):
    """A run whose config puts the step on gpu_queue, in a task parsed onto ``default`` (the deployment
    was not started with that config), stops before running anything, saying what to fix."""
    from cogumi_provider.operators import CogumiStepOperator

    config = _gpu_config(tmp_path, "gpuq-neg")
    task = CogumiStepOperator(task_id="prompts", step="data.prompts", config_name=config, queue="default")
    with pytest.raises(RuntimeError, match=r"places it on queue 'gpu'.*parsed onto queue 'default'.*COGUMI_CONFIG="):
        task.execute({"run_id": "manual__x"})
