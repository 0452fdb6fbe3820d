"""A throwaway local stack for tests that go through Airflow itself (scheduler, dag-processor, api-server).

Its own home, loopback ports, dags folder (symlinks to the chosen DAGs) and config folder (``prices.yaml`` and the
test's config, which becomes the deployment config ``COGUMI_CONFIG``), tasks retried after 1 s, and counting fault
proxies (tests/servers/fault_proxy.py) in front of the model servers, so a test can take a teacher down and bring it
back. The chosen DAGs are parsed and unpaused before the block starts; everything stops when it ends.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cogumi_tasks.stack import local
from tests.servers.procs import pick_base_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    settings: local.Settings
    store: Any  # cogumi_tasks.core.artifacts.ArtifactStore on the stack's S3, its bucket created
    api: Any  # cogumi_tasks.stack.demo.AirflowREST, logged in as admin
    password: str  # admin's password (the stack's secrets.env)
    proxies: dict[str, str]  # proxy name -> its base URL (no /v1)


@contextmanager
def throwaway_stack(root: Path, dag_ids: tuple[str, ...], proxied: dict[str, str],
                    config: Callable[[dict[str, str]], dict], paused: tuple[str, ...] = ()) -> Iterator[Stack]:
    """Start a stack under ``root`` running ``dag_ids``. ``proxied`` names each fault proxy and what it fronts
    (``"llm"``: llama.cpp, ``"strong"``: the strong tier); ``config(proxy URLs)`` returns the config's data (its
    ``name`` is the deployment config), so teachers can point at the proxies. The DAGs in ``paused`` are parsed but
    left paused (the test unpauses them when their data is in place)."""
    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig
    from cogumi_tasks.stack.demo import AirflowREST
    from cogumi_tasks.stack.services import free_port, stop
    from tests.servers.fault_proxy import start_fault_proxy

    dags, configs = root / "dags", root / "configs"
    dags.mkdir()
    configs.mkdir()
    for dag_id in dag_ids:
        (dags / f"{dag_id}.py").symlink_to(REPO / "dags" / f"{dag_id}.py")
    shutil.copy(REPO / "configs" / "prices.yaml", configs / "prices.yaml")
    ports = {name: free_port() for name in proxied}
    proxies = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    data = config(proxies)
    (configs / f"{data['name']}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    base = pick_base_port((20, 21, 22), 20000, 22000)
    settings = local.Settings.from_env({}, home=root / "home", s3_port=base, llm_port=base + 20,
                                       airflow_port=base + 21, strong_port=base + 22, dags_folder=dags,
                                       config_dir=configs,
                                       extra_env={"COGUMI_CONFIG": data["name"], "COGUMI_RETRY_DELAY_S": "1",
                                                  # every DAG paused when parsed; those not in `paused` are
                                                  # unpaused below (the local stack's default is unpaused)
                                                  "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(bool(paused))})
    procs = []
    try:
        local.up(settings, timeout_s=600)  # a loaded 2-core box took ~6 min to migrate and start
        upstreams = {"llm": settings.llm_url, "strong": settings.strong_url}
        for name, port in ports.items():
            procs.append(start_fault_proxy(upstreams[proxied[name]].removesuffix("/v1"), port, fault_rate=0.0,
                                           seed=0, hang_s=0, log_path=root / f"proxy-{name}.log"))
        store = ArtifactStore(StorageConfig(bucket=local.BUCKET, endpoint_url=settings.s3_endpoint),
                              local.s3_credentials(settings))
        store.ensure_bucket()
        password = local.load_secrets(settings)["COGUMI_AIRFLOW_PASSWORD"]
        api = AirflowREST(settings.airflow_url, "admin", password, timeout_s=120)  # one API worker on a busy box
        for dag_id in dag_ids:
            api.wait_for_dag(dag_id, timeout_s=180)
            if dag_id not in paused:
                api.unpause(dag_id)
        yield Stack(settings, store, api, password, proxies)
    finally:
        for proc in procs:
            stop(proc)
        local.down(settings)
