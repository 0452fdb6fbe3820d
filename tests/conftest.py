"""Shared fixtures: the real servers on loopback (S3, llama.cpp, the strong tier) and an isolated Airflow home.

Airflow reads its configuration when first imported, so the environment is set here, at
collection time, before any test module imports it.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="cogumi-tests-"))
# Each pytest process (the xdist controller and every worker) has its own: the S3 server's data (several GB by the
# end of a session), Airflow's home, the servers' logs. Removed when the process exits, after the session fixtures
# stopped the servers; COGUMI_KEEP_TEST_TMP=1 keeps it to read the logs. Left behind, a few sessions filled the disk
# and the S3 server refused writes ("no free volumes left") in every test that uploads.
if not os.environ.get("COGUMI_KEEP_TEST_TMP"):
    atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
# The processes the tests start (xdist workers, steps, Airflow tasks, servers) make their temporary files in it too:
# a step killed on purpose (the resume tests) cannot remove its own work folder. (SeaweedFS's sockets, empty files,
# stay in /tmp: it does not read TMPDIR.)
(_TMP / "tmp").mkdir()
os.environ["TMPDIR"] = str(_TMP / "tmp")

os.environ.update(
    {
        "AIRFLOW_HOME": str(_TMP / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # the session's DagBag parses every DAG file once; Airflow's 30 s per file is a scheduler guard: on a box
        # starved by a make demo, phase2_compression.py took longer, was left out, and test_phase2 errored
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_TMP / 'airflow' / 'airflow.db'}",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(64),
        "COGUMI_CONFIG_DIR": str(REPO / "configs"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
)
# Threads per xdist worker: the cores shared out. llama.cpp's threads (in process and in the llama.cpp servers) and
# torch's OpenMP threads wait by spinning, so more of them than cores slows everything beside them several times
# over (docs/operations.md). Set before anything imports torch; inherited by the servers and Airflow task processes
# a worker starts. A variable already set wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 2) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "COGUMI_GGUF_THREADS", "COGUMI_LLAMA_SERVER_THREADS"):
        os.environ.setdefault(_name, _THREADS)
(_TMP / "airflow").mkdir(parents=True, exist_ok=True)
for path in (str(REPO), str(REPO / "plugins")):
    if path not in sys.path:
        sys.path.insert(0, path)


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key}


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    return _TMP


@pytest.fixture(scope="session")
def s3_server(tmp_root: Path):
    """A real S3 API (SeaweedFS) on 127.0.0.1 with real credentials; env set for boto3."""
    from cogumi_tasks.stack.services import start_s3, stop
    from tests.servers.procs import pick_base_port

    access, secret = "cogumi-test", secrets.token_hex(16)
    port = pick_base_port(lo=20000, hi=22000)
    # a worker's share: the two workers of a make test held up to about 7.5 GB at once, S3 data and tmp_path
    # folders (2026-12-06)
    proc = start_s3(tmp_root / "s3", port, access, secret, tmp_root / "logs" / "s3.log", min_free_gib=4)
    os.environ.update({"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                       "COGUMI_S3_ENDPOINT": f"http://127.0.0.1:{port}"})
    yield S3Server(f"http://127.0.0.1:{port}", access, secret)
    stop(proc)


@pytest.fixture(scope="session")
def strong_server(tmp_root: Path) -> str:
    """The strong tier (cogumi_tasks.world.strong_tier), the tiny config's family-solving teacher; base URL."""
    from cogumi_tasks.stack.services import free_port, start_strong_tier, stop

    port = free_port()
    proc = start_strong_tier(port, tmp_root / "logs" / "strong_tier.log")
    os.environ["COGUMI_STRONG_URL"] = f"http://127.0.0.1:{port}/v1"
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.fixture(scope="session")
def llm_server(tmp_root: Path, strong_server: str) -> str:
    """llama.cpp's OpenAI-compatible server with the packaged SmolLM2-135M-Instruct; base URL. The strong tier
    starts with it, since the tiny config's pipeline runs ask both (``COGUMI_STRONG_URL`` set)."""
    from cogumi_tasks.stack.services import free_port, start_llama_server, stop

    port = free_port()
    proc = start_llama_server("smollm2-135m", port, tmp_root / "logs" / "llama.log")
    os.environ["COGUMI_LLM_URL"] = f"http://127.0.0.1:{port}/v1"
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.fixture(scope="module")
def fault_proxy(llm_server: str, tmp_root: Path) -> str:
    """The fault proxy (tests/servers/fault_proxy.py) in front of the llama.cpp server, passing everything: a
    request counter (``GET /_stats``) that a test can turn into an outage (``POST /_faults``); base URL, no /v1.
    One per test module."""
    from cogumi_tasks.stack.services import free_port, stop
    from tests.servers.fault_proxy import start_fault_proxy

    port = free_port()
    proc = start_fault_proxy(llm_server.removesuffix("/v1"), port, fault_rate=0.0, seed=0, hang_s=0,
                             log_path=tmp_root / "logs" / f"fault-proxy-{port}.log")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture
def store_for(s3_server: S3Server):
    """An ArtifactStore on the test S3 server for a given config, its bucket created."""
    from cogumi_tasks.core.artifacts import ArtifactStore

    def make(config):
        store = ArtifactStore(config.storage, s3_server.credentials())
        store.ensure_bucket()
        return store

    return make


@pytest.fixture(scope="session")
def airflow_db():
    """A fresh Airflow metadata database (SQLite in the temporary AIRFLOW_HOME), once per session."""
    from airflow.utils.db import resetdb

    resetdb()
    yield


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    """The project's DAGs, parsed and serialized to the test database as the dag-processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    if not bag.import_errors:
        sync_bag_to_db(bag, bundle_name="dags-folder", bundle_version=None)
    return bag


@pytest.fixture
def write_config(tmp_path):
    """Write a config YAML derived from tiny.yaml with dotted overrides; returns its path."""
    import yaml

    from cogumi_tasks.core.config import apply_overrides

    def make(name: str, overrides: dict | None = None) -> str:
        data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        data = apply_overrides(data, {"name": name, **(overrides or {})}, "test")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    return make


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF as an fp32 transformers directory (read-only: copy to change it).
    Converted once per run: pytest-xdist workers share it through the run's common temporary root, the first
    one converting under a file lock."""
    from filelock import FileLock

    from cogumi_tasks.models.convert import hf_dir_from_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return hf_dir_from_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2-hf"))
    shared = tmp_path_factory.getbasetemp().parent / "smollm2-hf"
    done = shared.with_name("smollm2-hf.done")  # beside the directory: tests list its files
    with FileLock(str(shared) + ".lock"):
        if not done.is_file():
            shutil.rmtree(shared, ignore_errors=True)
            hf_dir_from_gguf(smollm2_gguf(), shared)
            done.write_text("")
    return shared


@pytest.fixture(scope="session")
def serve_world(tmp_path_factory, s3_server):
    """A real small release (tests/serve_release.py) served by a started engine, an S3 store for query logs and a
    ServeConfig with tight limits: shared by the gateway and chat UI tests, built once."""
    import torch

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import ServeConfig, StorageConfig
    from cogumi_tasks.serve.engine import XllamacppEngine
    from cogumi_tasks.serve.release import load_release
    from cogumi_tasks.train.failures import load_embedder
    from tests.serve_release import build_small_release

    torch.set_num_threads(1)  # the router, LSTM and MiniLM are tiny; contending threads only slow a shared box
    tmp = tmp_path_factory.mktemp("serve")
    embedder = load_embedder("builtin:all-minilm-l6-v2")
    release = load_release(build_small_release(tmp, embedder))
    engine = XllamacppEngine(release.base, {"recovery": release.recovery, **release.modifiers},
                             fixed={"recovery": 1.0}, parallel=2, context=1024, threads=1)
    engine.start()
    store = ArtifactStore(StorageConfig(bucket="serve-test"), s3_server.credentials())
    store.ensure_bucket()
    config = ServeConfig(max_body_bytes=4096, max_tokens=64, rate_per_minute=6000, rate_burst=100,
                         query_log_flush_s=3600, state_dir=str(tmp / "state"))
    yield {"release": release, "engine": engine, "store": store, "config": config, "embedder": embedder, "tmp": tmp}
    engine.stop()
