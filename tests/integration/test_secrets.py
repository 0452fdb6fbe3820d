"""No secret in any artifact, log or XCom of a Phase 0 run through Airflow.

Marker values are planted where secrets live: the environment variable a teacher names in ``api_key_env``,
an AWS-style secret that is not the S3 credential, a ``FOO_TOKEN``, and an Airflow connection (password,
login and extra) that the judge uses by ``conn_id``. The run goes through ``dag.test`` with a counting proxy
in front of the llama.cpp server, which proves the keys were used (it sees them as Bearer tokens, by sha256).
Then every S3 object of the run's pipeline, every file under ``AIRFLOW_HOME/logs``, the run's captured output and
log records, its XCom values and the Airflow database file are searched for each marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from tests.servers.fault_proxy import proxy_stats

pytestmark = pytest.mark.stack


def _marker(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_markers_reach_no_artifact_log_or_xcom(dagbag, s3_server, fault_proxy, write_config, monkeypatch, capfd,
                                               caplog):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import load_config

    markers = {"teacher_key": _marker("tk"), "aws_style": _marker("aws"), "foo_token": _marker("foo"),
               "conn_password": _marker("cp"), "conn_login": _marker("cl"), "conn_extra": _marker("cx")}
    conn_id = "cogumi_secrets_judge"
    monkeypatch.setenv("COGUMI_SECRETS_TEACHER_KEY", markers["teacher_key"])
    monkeypatch.setenv("BACKUP_AWS_SECRET_ACCESS_KEY", markers["aws_style"])
    monkeypatch.setenv("FOO_TOKEN", markers["foo_token"])
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "login": markers["conn_login"],
        "password": markers["conn_password"], "extra": {"organization": markers["conn_extra"]}}))
    name = f"p0-secrets-{uuid.uuid4().hex[:8]}"
    url = fault_proxy + "/v1"
    path = write_config(name, {
        "dataset.prompts.limit": 4, "dataset.prompts.shards": 2, "dataset.generate.max_tokens": 24,
        "dataset.score.max_tokens": 32, "llm.backoff_base_s": 0.05,
        "dataset.prompts.world.families": {},  # general prompts only: every call goes through the proxy
        "teachers.0.base_url": url, "teachers.0.api_key_env": "COGUMI_SECRETS_TEACHER_KEY",
        "teachers.1.base_url": url, "judge.base_url": url, "judge.conn_id": conn_id})
    store = ArtifactStore(load_config(path).storage, s3_server.credentials())
    store.ensure_bucket()

    run = dagbag.dags["phase0_dataset"].test(run_conf={"config": path})
    captured = capfd.readouterr()
    assert run.state == "success"

    # the keys were used: the server received the teacher's key and the connection's password as Bearer tokens
    bearers = proxy_stats(fault_proxy)["bearers"]
    assert bearers.get(_sha(markers["teacher_key"]), 0) >= 1, "teacher-a did not send its api_key_env key"
    assert bearers.get(_sha(markers["conn_password"]), 0) >= 1, "the judge did not send its connection's password"

    # what is searched, with a positive control for each (the search would find what is there)
    objects = {u: store.get_bytes(u) for u in store.list(store.uri(name) + "/")}
    assert any(u.endswith("data.publish/" + u.split("data.publish/")[-1]) for u in objects if "data.publish" in u)
    assert any(b"teacher-a" in body for body in objects.values())
    logs_dir = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    logs = {str(p): p.read_bytes() for p in logs_dir.rglob("*") if p.is_file()} if logs_dir.exists() else {}
    logs["<captured stdout>"] = captured.out.encode()
    logs["<captured stderr>"] = captured.err.encode()
    logs["<log records>"] = caplog.text.encode()  # dag.test runs the tasks in this process: their logging
    assert any(b"data.publish" in body for body in logs.values()), "the tasks' logs were not captured"
    with create_session() as session:
        xcoms = session.scalars(select(XComModel).where(XComModel.dag_id == "phase0_dataset",
                                                        XComModel.run_id == run.run_id)).all()
        values = {f"xcom {x.task_id}[{x.map_index}].{x.key}": json.dumps(x.value).encode() for x in xcoms}
    assert any(b"s3://" in v for v in values.values()), "the run's XComs were not found"
    db = Path(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-journal"):
        if Path(f"{db}{suffix}").exists():
            values[f"{db.name}{suffix}"] = Path(f"{db}{suffix}").read_bytes()

    leaks = [f"{kind} in {where}" for kind, marker in markers.items()
             for where, body in [*objects.items(), *logs.items(), *values.items()] if marker.encode() in body]
    assert leaks == []
    print(f"secrets: {len(objects)} S3 objects, {len(logs)} logs, {len(xcoms)} XComs searched; none holds a marker")
