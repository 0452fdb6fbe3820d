"""The production stack: docker-compose.yaml, the images under docker/, monitoring provisioning.

No Docker engine is needed: Debian's ``docker-compose`` (1.29) validates and resolves the file
offline (``config``); everything else is parsed and checked here. The compose tests skip only where
that binary is missing, and ``test_docker_compose_present_in_ci`` makes CI fail in that case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
DOCKER = ROOT / "docker"
ENV_EXAMPLE = DOCKER / ".env.example"
MONITORING = ROOT / "monitoring"

# Dummy values for every variable the compose file requires (${VAR:?...}).
REQUIRED = {
    "AIRFLOW_JWT_SECRET": "j" * 128,
    "AIRFLOW_API_SECRET_KEY": "k" * 128,
    "AIRFLOW_FERNET_KEY": "f" * 43 + "=",
    "POSTGRES_PASSWORD": "p" * 64,
    "AWS_ACCESS_KEY_ID": "cogumi-test",
    "AWS_SECRET_ACCESS_KEY": "s" * 64,
    "GRAFANA_ADMIN_PASSWORD": "g" * 64,
    "COGUMI_API_KEYS": "a" * 64 + "," + "b" * 64,
    "COGUMI_CHAT_API_KEY": "a" * 64,
}
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "gpu-worker",
}
PUBLISHED = {"airflow-apiserver": 8080, "grafana": 3000, "minio": 9001, "serve": 8400, "chat": 7860}
ONE_SHOT = {"minio-init", "airflow-init"}  # jobs that exit; waited for with service_completed_successfully
PROMTOOL = shutil.which("promtool")
COMPOSE_BIN = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE_BIN is None,
    reason="docker-compose binary not installed (apt-get install -y docker-compose; the Makefile does it)",
)


# ------------------------------------------------------------------------------------ helpers
_REF = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?msg}, ${VAR?msg} and $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        if (op == ":?" and not val) or (op == "?" and val is None):
            raise KeyError(f"{name}: {arg}")
        return val or ""

    return _REF.sub(sub, value)


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return load_compose()["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def command_of(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def host_ip_and_target(port: str | dict) -> tuple[str, int]:
    """(host ip, container port) of one ports entry; an entry without an ip binds 0.0.0.0."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "0.0.0.0")), int(port["target"])
    spec = str(port).split("/")[0]
    parts = spec.rsplit(":", 2)
    if len(parts) < 3:
        return "0.0.0.0", int(parts[-1])
    return parts[0], int(parts[2])


def run_compose(tmp_path: Path, env: dict[str, str], *args: str, env_file: Path | None = None):
    """docker-compose with a clean environment and no .env of the developer's."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    cmd = [
        COMPOSE_BIN,
        "--project-directory",
        str(ROOT),
        "--env-file",
        str(env_file),
        "-f",
        str(COMPOSE),
        *args,
    ]
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    return subprocess.run(cmd, env=clean, capture_output=True, text=True, timeout=120, cwd=tmp_path)


# --------------------------------------------------------------------- docker-compose config
def test_docker_compose_present_in_ci():
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI (CI is not set)")
    assert COMPOSE_BIN, "CI must install docker-compose (apt-get install -y docker-compose)"


@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu-profile"])
def test_compose_config_validates(tmp_path, profile):
    res = run_compose(tmp_path, REQUIRED, *profile, "config", "-q")
    assert res.returncode == 0, res.stderr + res.stdout


@needs_compose
def test_compose_config_validates_with_env_example(tmp_path):
    res = run_compose(tmp_path, {}, "config", "-q", env_file=ENV_EXAMPLE)
    assert res.returncode == 0, res.stderr + res.stdout


@needs_compose
@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_config_fails_without_each_secret(tmp_path, missing):
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    res = run_compose(tmp_path, env, "config", "-q")
    assert res.returncode != 0, f"compose accepted the file without {missing}"
    assert missing in res.stderr + res.stdout


@needs_compose
def test_compose_config_fails_with_empty_secret(tmp_path):
    res = run_compose(tmp_path, {**REQUIRED, "AIRFLOW_JWT_SECRET": ""}, "config", "-q")
    assert res.returncode != 0
    assert "AIRFLOW_JWT_SECRET" in res.stderr + res.stdout


@needs_compose
def test_resolved_ports_bind_loopback_by_default(tmp_path):
    res = run_compose(tmp_path, REQUIRED, "--profile", "gpu", "config")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)["services"]
    published = {}
    for name, svc in resolved.items():
        for port in svc.get("ports", []):
            ip, target = host_ip_and_target(port)
            assert ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
            published[name] = target
    assert published == PUBLISHED
    # The secret reaches every Airflow component, resolved to the one value given.
    for name in AIRFLOW_SERVICES:
        assert (
            resolved[name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == REQUIRED["AIRFLOW_JWT_SECRET"]
        )

    res = run_compose(tmp_path, {**REQUIRED, "COGUMI_BIND": "10.1.2.3"}, "config")
    assert res.returncode == 0, res.stderr
    for name, svc in yaml.safe_load(res.stdout)["services"].items():
        for port in svc.get("ports", []):
            assert host_ip_and_target(port)[0] == "10.1.2.3", name


# ------------------------------------------------------------------------ structure (no binary)
def test_no_version_field_and_expected_services():
    doc = load_compose()
    assert "version" not in doc, "the Compose Specification (no version) is what 1.29 validates GPUs with"
    expected = AIRFLOW_SERVICES | {"postgres", "minio", "minio-init", "statsd-exporter", "prometheus", "grafana"}
    assert expected | {"serve", "chat"} == set(doc["services"])


def test_airflow_services_share_one_common_block():
    svcs = services()
    airflow = {name for name in svcs if name.startswith("airflow-")} | {"gpu-worker"}
    assert airflow == AIRFLOW_SERVICES
    envs = {name: env_of(svcs[name]) for name in AIRFLOW_SERVICES}
    for key in (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__EDGE__API_URL",
        "COGUMI_S3_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)

    env = envs["airflow-apiserver"]
    required = re.compile(r"^\$\{(\w+):\?[^}]+\}$")
    jwt = required.match(env["AIRFLOW__API_AUTH__JWT_SECRET"])
    api_key = required.match(env["AIRFLOW__API__SECRET_KEY"])
    assert jwt and api_key and jwt.group(1) != api_key.group(1)
    assert required.match(env["AIRFLOW__CORE__FERNET_KEY"])
    assert "${POSTGRES_PASSWORD:?" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor,airflow.providers.edge3.executors.EdgeExecutor"
    assert env["AIRFLOW__EDGE__API_ENABLED"] == "True"
    defaults = {k: interpolate(v, REQUIRED) for k, v in env.items()}
    assert defaults["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert defaults["AIRFLOW__EDGE__API_URL"] == "http://airflow-apiserver:8080/edge_worker/v1/rpcapi"
    assert defaults["COGUMI_S3_ENDPOINT"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert required.match(env[key]), key
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        assert env[key] == "${" + key + ":-}", key


def test_no_literal_secrets_anywhere():
    secretish = re.compile(r"SECRET|PASSWORD|_KEY$|TOKEN|_CONN$")
    checked = 0
    for name, svc in services().items():
        for key, value in env_of(svc).items():
            if not secretish.search(key) or key.endswith("_FILE"):
                continue
            checked += 1
            assert "${" in value, f"{name}.{key} holds a literal value"
            # Without the variables set, a secret is refused (${X:?...}) or empty (teacher keys).
            try:
                resolved = interpolate(value, {})
            except KeyError:
                continue
            assert resolved == "", f"{name}.{key} has a default secret: {resolved!r}"
    assert checked >= 20


def test_gpu_worker_is_an_edge_worker_on_queue_gpu_with_a_gpu():
    gpu = services()["gpu-worker"]
    cmd = command_of(gpu)
    assert re.search(r"\bairflow edge worker\b", cmd), cmd
    assert re.search(r"(-q|--queues)[ =]gpu\b", cmd), cmd
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert gpu["build"]["dockerfile"] == "docker/gpu-worker.Dockerfile"
    assert "gpu-worker" in gpu["image"]
    assert "gpu" in gpu.get("profiles", [])


def test_components_run_their_airflow_3_commands():
    svcs = services()
    assert command_of(svcs["airflow-apiserver"]) == "api-server"
    assert command_of(svcs["airflow-scheduler"]) == "scheduler"
    assert command_of(svcs["airflow-dag-processor"]) == "dag-processor"
    assert command_of(svcs["airflow-triggerer"]) == "triggerer"
    assert "airflow-init.sh" in command_of(svcs["airflow-init"])
    for name in AIRFLOW_SERVICES - {"airflow-init", "gpu-worker"}:
        assert svcs[name]["build"]["dockerfile"] == "docker/airflow.Dockerfile", name


def test_published_ports_default_to_loopback():
    published = {}
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and "${COGUMI_BIND:-127.0.0.1}" in port, (name, port)
            ip, target = host_ip_and_target(interpolate(port, {}))
            assert ip == "127.0.0.1", (name, port)
            published[name] = target
    assert published == PUBLISHED


def test_healthchecks_and_start_order():
    svcs = services()
    for name, svc in svcs.items():
        if name in ONE_SHOT:
            assert svc["restart"] == "no" and "healthcheck" not in svc, name
            continue
        check = svc.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name, svc in svcs.items():  # a one-shot job is waited for until it exits successfully
        for dep, cond in svc.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == wanted, (name, dep)
    assert "http://localhost:8400/healthz" in svcs["serve"]["healthcheck"]["test"]
    assert svcs["chat"]["depends_on"]["serve"]["condition"] == "service_healthy"
    assert svcs["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in command_of(svcs["minio-init"]) and "COGUMI_BUCKET" in command_of(svcs["minio-init"])
    assert interpolate(svcs["minio-init"]["environment"]["COGUMI_BUCKET"], {}) == "cogumi"
    init_deps = svcs["airflow-init"]["depends_on"]
    assert init_deps["postgres"]["condition"] == "service_healthy"
    assert init_deps["minio-init"]["condition"] == "service_completed_successfully"
    for name in AIRFLOW_SERVICES - {"airflow-init", "gpu-worker"}:
        assert svcs[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert svcs["gpu-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


def test_bind_mounts_exist():
    for name, svc in services().items():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"


def test_env_example_lists_every_variable():
    text = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    example = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    referenced = set(re.findall(r"(?<!\$)\$\{(\w+)", text))  # $${X} is the container's
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == set(REQUIRED)
    assert referenced <= example, referenced - example
    assert "openssl rand -hex 64" in ENV_EXAMPLE.read_text()


# ------------------------------------------------------------------------- monitoring provisioning
def test_serve_chat_and_the_bucket_job_share_the_cogumi_environment():
    svcs = services()
    common = env_of(svcs["airflow-scheduler"])
    for name in ("serve", "chat", "minio-init"):
        env = env_of(svcs[name])
        for key in ("COGUMI_S3_ENDPOINT", "COGUMI_CONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == common[key], (name, key)
        if name != "minio-init":
            assert svcs[name]["entrypoint"] == ["/usr/bin/dumb-init", "--"], name  # not the image's `airflow ...`
    assert "$$COGUMI_S3_ENDPOINT" in command_of(svcs["minio-init"])  # the bucket made where every service looks
    assert command_of(svcs["serve"]).startswith("cogumi serve ")
    assert command_of(svcs["chat"]).startswith("cogumi chat ")
    assert "http://serve:8400/v1" in command_of(svcs["chat"])
    assert env_of(svcs["serve"])["COGUMI_API_KEYS"].startswith("${COGUMI_API_KEYS:?")
    assert svcs["serve"]["build"]["args"]["COGUMI_EXTRAS"] == "serve"
    assert svcs["chat"]["build"] == svcs["serve"]["build"] and svcs["chat"]["image"] == svcs["serve"]["image"]


@pytest.mark.parametrize(("name", "port"), [("serve", 8400), ("chat", 7860)])
def test_serve_and_chat_commands_parse_with_the_cli(name, port):
    """The compose commands are valid `cogumi` command lines, listening on all addresses of the container."""
    from cogumi_tasks.cli import build_parser

    cmd = [interpolate(str(word), REQUIRED) for word in services()[name]["command"]]
    assert cmd[:2] == ["cogumi", name]
    args = build_parser().parse_args(cmd[1:])
    assert (args.host, args.port) == ("0.0.0.0", port)
    if name == "serve":
        assert args.config == "production"


def monitoring_mounts(name: str) -> dict[str, Path]:
    """container path -> host path of a service's ./monitoring bind mounts."""
    mounts = {}
    for vol in services()[name]["volumes"]:
        parts = str(vol).split(":")
        if parts[0].startswith("./"):
            assert parts[0].startswith("./monitoring/"), vol
            assert parts[-1] == "ro", vol
            mounts[parts[1]] = ROOT / parts[0]
    return mounts


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install -y prometheus)")
def test_prometheus_mounts_form_a_valid_config(tmp_path):
    """The files compose mounts into /etc/prometheus, laid out the same way, pass `promtool check config`."""
    mounts = monitoring_mounts("prometheus")
    for target, source in mounts.items():
        assert target.startswith("/etc/prometheus/"), target
        dest = tmp_path / target.removeprefix("/etc/prometheus/")
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy(source, dest)
    assert "--config.file=/etc/prometheus/prometheus.yml" in services()["prometheus"]["command"]
    res = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr, res.stdout + res.stderr  # every targets file is there
    assert "SUCCESS: 1 rule files found" in res.stdout
    # the gateway target is the serve service on the port it listens on
    assert yaml.safe_load((tmp_path / "targets" / "gateway.yml").read_text())[0]["targets"] == ["serve:8400"]
    assert "--port 8400" in command_of(services()["serve"])


def test_grafana_datasource_and_dashboard():
    mounts = monitoring_mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = [
        d for f in (provisioning / "datasources").glob("*.y*ml") for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    prom = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["url"] == "http://prometheus:9090"

    providers = [
        p
        for f in (provisioning / "dashboards").glob("*.y*ml")
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    paths = {p["options"]["path"] for p in providers}
    assert paths == {"/var/lib/grafana/dashboards"} and paths <= set(mounts)
    dashboards = list(mounts["/var/lib/grafana/dashboards"].glob("*.json"))
    assert [d.name for d in dashboards] == ["cogumi.json"]
    dash = json.loads(dashboards[0].read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {prom[0]["uid"]}  # the panels (tests/unit/test_monitoring.py) use the provisioned datasource


# ----------------------------------------------------------------------------------- images
def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _copy_sources(text: str) -> list[str]:
    sources = []
    for line in text.splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if words and words[0] == "COPY":
            sources += words[1:-1]
    return sources


@pytest.mark.parametrize("name", ["airflow.Dockerfile", "gpu-worker.Dockerfile"])
def test_dockerfile_copies_are_in_context(name):
    text = _dockerfile(name)
    allowed = {
        line[1:].strip()
        for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = _copy_sources(text)
    for src in ("pyproject.toml", "cogumi_tasks", "dags", "plugins", "configs"):
        assert src in sources, f"{name} does not copy {src}"
    for src in sources:
        assert src in allowed, f"{name}: {src} is excluded by its .dockerignore"
        if src.startswith("docker/"):
            assert (ROOT / src).is_file(), src
    assert "COGUMI_CONFIG_DIR=/opt/cogumi/configs" in text


def test_airflow_dockerfile():
    text = _dockerfile("airflow.Dockerfile")
    assert re.search(r"^ARG AIRFLOW_BASE_IMAGE=apache/airflow:3\.3\.2-python3\.11$", text, re.M)
    assert "ARG COGUMI_EXTRAS=airflow" in text
    assert '"/opt/cogumi/src[${COGUMI_EXTRAS}]"' in text


def test_gpu_worker_dockerfile():
    text = _dockerfile("gpu-worker.Dockerfile")
    assert re.search(r"^ARG CUDA_BASE_IMAGE=nvidia/cuda:12\.\S+-ubuntu", text, re.M)
    assert "ARG PYTHON_VERSION=3.11" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert '"/opt/cogumi/src[ml,airflow]"' in text
    assert "bitsandbytes==" in text and "llmcompressor==" in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/cogumi-entrypoint"]' in text


# ------------------------------------------------------------------------------------- scripts
def _stub_path(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("cogumi", "airflow"):
        stub = bin_dir / prog
        stub.write_text(f'#!/bin/sh\necho "{prog} $*"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}:/usr/bin:/bin"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run-step", "data.dedup", "--config", "production"],
            "cogumi run-step data.dedup --config production",
        ),
        (["cogumi", "run-step", "train.lora"], "cogumi run-step train.lora"),
        (["airflow", "edge", "worker", "-q", "gpu"], "airflow edge worker -q gpu"),
        (["--version"], "cogumi --version"),
        ([], "cogumi --help"),
    ],
)
def test_gpu_worker_entrypoint(tmp_path, args, expected):
    script = DOCKER / "gpu-worker-entrypoint.sh"
    assert os.access(script, os.X_OK)
    res = subprocess.run(
        ["bash", str(script), *args],
        env={"PATH": _stub_path(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


GOOD_INIT_ENV = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "a" * 128,
    "AIRFLOW__API__SECRET_KEY": "b" * 128,
    "AIRFLOW__CORE__FERNET_KEY": "c" * 43 + "=",
    "AWS_SECRET_ACCESS_KEY": "d" * 64,
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:pw@postgres:5432/airflow",
}


@pytest.mark.parametrize(
    ("override", "ok", "message"),
    [
        ({}, True, ""),
        ({"AIRFLOW__API_AUTH__JWT_SECRET": "short"}, False, "AIRFLOW_JWT_SECRET must be at least 64"),
        ({"AIRFLOW__API__SECRET_KEY": ""}, False, "AIRFLOW_API_SECRET_KEY"),
        ({"AIRFLOW__API_AUTH__JWT_SECRET": "CHANGE_ME_" + "x" * 64}, False, "placeholder"),
        (
            {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:CHANGE_ME@postgres/airflow"
            },
            False,
            "POSTGRES_PASSWORD",
        ),
    ],
)
def test_airflow_init_refuses_weak_secrets(tmp_path, override, ok, message):
    env = {"PATH": _stub_path(tmp_path), **GOOD_INIT_ENV, **override}
    res = subprocess.run(
        ["bash", str(DOCKER / "airflow-init.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    if ok:
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "airflow db migrate"
    else:
        assert res.returncode == 1
        assert "airflow db migrate" not in res.stdout
        assert message in res.stderr
