"""Secrets: never expanded into configs, masked in JSON and logs, written to files only the owner reads."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import uuid
from pathlib import Path

import pytest

from cogumi_tasks.core import secrets
from cogumi_tasks.core.config import REPO_CONFIG_DIR, ConfigError, load_config


def _marker() -> str:
    return "mk" + uuid.uuid4().hex


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "hf_token", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "MyApiKey"])
def test_secret_looking_names(name: str) -> None:
    assert secrets.looks_secret(name)


@pytest.mark.parametrize("name", ["COGUMI_LLM_URL", "COGUMI_S3_ENDPOINT", "AWS_REGION", "HOME", "AWS_ACCESS_KEY_ID"])
def test_plain_names(name: str) -> None:
    assert not secrets.looks_secret(name)


def test_shipped_configs_load_without_secret_expansion() -> None:
    names = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.yaml") if p.stem not in ("prices", "plan_targets"))
    assert {"tiny", "production"} <= set(names)
    for name in names:
        load_config(name)


@pytest.mark.parametrize("var", ["OPENAI_API_KEY", "MY_TOKEN", "db_password", "CLIENT_SECRET"])
def test_secret_expansion_refused_naming_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      var: str) -> None:
    value = _marker()
    monkeypatch.setenv(var, value)
    path = tmp_path / "leaky.yaml"
    path.write_text((REPO_CONFIG_DIR / "tiny.yaml").read_text().replace(
        "    model: smollm2-135m\n    price: local-as-gpt-4o\n",
        f"    model: ${{{var}:-x}}\n    price: local-as-gpt-4o\n", 1))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert f"{path}: eval.reference.model: ${{{var}}} names a secret-looking environment variable" in message
    assert value not in message
    # an override is expanded too, so it is refused the same way
    with pytest.raises(ConfigError, match=rf"judge\.model: \$\{{{var}\}}"):
        load_config("tiny", {"judge.model": f"${{{var}}}"})


def test_plain_expansion_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COGUMI_LLM_URL", "http://127.0.0.1:9/v1")
    assert load_config("tiny", {"judge.model": "${COGUMI_LLM_URL}"}).judge.model == "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"tiny\.yaml: judge\.model: environment variable NOT_SET_X is not set"):
        load_config("tiny", {"judge.model": "${NOT_SET_X}"})


def test_redact_env_secrets_registered_values_and_config_key_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    env_secret, conn_password, conn_extra, key_var = _marker(), _marker(), _marker(), _marker()
    monkeypatch.setenv("SOME_SERVICE_TOKEN", env_secret)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # secret-looking name, but too short to mask
    monkeypatch.setenv("TEACHER_CREDENTIAL", key_var)  # a plain name the config says holds a key
    secrets.register_values(conn_password, json.dumps({"headers": {"x-api": conn_extra}}))
    text = json.dumps({"a": env_secret, "b": f"x{conn_password}y", "c": conn_extra, "d": key_var, "e": False})
    assert key_var in secrets.redact(text)
    load_config("tiny", {"teachers.0.api_key_env": "TEACHER_CREDENTIAL"})
    clean = secrets.redact(text)
    assert json.loads(clean) == {"a": "***", "b": "x***y", "c": "***", "d": "***", "e": False}
    assert secrets.redact_bytes(text.encode()) == clean.encode()


def test_put_json_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig

    value = _marker()
    monkeypatch.setenv("COGUMI_TEST_API_KEY", value)
    written: dict[str, bytes] = {}
    store = ArtifactStore(StorageConfig(bucket="b", endpoint_url="http://127.0.0.1:9"))
    monkeypatch.setattr(store, "put_bytes", lambda uri, data: written.__setitem__(uri, data))
    store.put_json("s3://b/m.json", {"metrics": {"note": f"key={value}"}})
    assert json.loads(written["s3://b/m.json"]) == {"metrics": {"note": "key=***"}}


def test_log_filter_masks_messages_args_and_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    value = _marker()
    monkeypatch.setenv("COGUMI_TEST_SECRET", value)
    stream = __import__("io").StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        secrets.install_log_filter()
        secrets.install_log_filter()  # idempotent
        assert handler.filters.count(secrets._FILTER) == 1
        log = logging.getLogger("cogumi.some.child")  # a child logger: the handler's filter still applies
        log.propagate, level = True, log.getEffectiveLevel()
        log.setLevel(logging.INFO)
        log.info("calling with key %s", value)
        try:
            raise RuntimeError(f"auth failed for {value}")
        except RuntimeError:
            log.exception("failed")
    finally:
        root.removeHandler(handler)
        log.setLevel(level)
    out = stream.getvalue()
    assert "calling with key ***" in out and "RuntimeError: auth failed for ***" in out
    assert value not in out


def test_write_private_is_0600_from_creation_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret.env"
    created_modes: list[int] = []
    real_open = os.open

    def spy(p, flags, mode=0o777, *a, **k):
        if flags & os.O_CREAT:
            created_modes.append(mode)
            assert flags & os.O_EXCL and Path(p).parent == path.parent
        return real_open(p, flags, mode, *a, **k)

    os.open = spy
    try:
        old_umask = os.umask(0)  # even with no umask the file is never wider than 0600
        try:
            assert secrets.write_private(path, "A=1\n")
        finally:
            os.umask(old_umask)
    finally:
        os.open = real_open
    assert created_modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "A=1\n"
    assert secrets.write_private(path, b"A=2\n") and path.read_text() == "A=2\n"
    assert not secrets.write_private(path, "A=3\n", overwrite=False) and path.read_text() == "A=2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.env"]  # no temporary file left


def test_first_writer_wins_under_concurrency(tmp_path: Path) -> None:
    path = tmp_path / "once.env"
    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(secrets.write_private(path, f"{i}\n" * 1000,
                                                                                        overwrite=False)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    lines = set(path.read_text().splitlines())
    assert len(lines) == 1  # one writer's whole content, never a mix or a partial file


def test_local_stack_secret_files_are_0600(tmp_path: Path) -> None:
    from cogumi_tasks.stack import local

    settings = local.Settings.from_env({"COGUMI_HOME": str(tmp_path / "home")})
    passwords = settings.airflow_home / "simple_auth_manager_passwords.json"
    passwords.parent.mkdir(parents=True)
    passwords.write_text("{}")
    passwords.chmod(0o644)  # left by an older version: rewritten 0600
    env = local.env(settings)
    for path in (settings.secrets_file, passwords):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    sec = local.load_secrets(settings)
    assert json.loads(passwords.read_text()) == {"admin": sec["COGUMI_AIRFLOW_PASSWORD"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == sec["COGUMI_S3_SECRET_KEY"]
    assert local.load_secrets(settings) == sec  # generated once


def test_cli_error_line_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    from cogumi_tasks.cli import one_line

    monkeypatch.setenv("COGUMI_TEST_API_KEY", "sk-cli-line-marker-123456")
    line = one_line(RuntimeError("endpoint said: bad key sk-cli-line-marker-123456\nsecond line"))
    assert line == "endpoint said: bad key ***; second line"
