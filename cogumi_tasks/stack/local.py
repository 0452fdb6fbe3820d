"""The local stack on 127.0.0.1: SeaweedFS S3, llama.cpp (SmolLM2-135M: the cheap teacher, the LLM judge and
the reference), the strong tier (:mod:`cogumi_tasks.world.strong_tier`: the teacher that solves the task
families, standing in for GPT-5/GPT-4o-class models) and Airflow 3 (api-server, scheduler, dag-processor,
triggerer; SQLite, LocalExecutor).

State lives under ``$COGUMI_HOME`` (default ``<repo>/.cogumi``): ``secrets.env`` (generated once,
mode 600), ``pids.json`` (what we started), ``logs/<service>.log``, ``s3/`` and ``airflow/``.
``up()`` reuses whatever is already ours and healthy; ``down()`` stops what ``pids.json`` lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from cogumi_tasks.core.secrets import write_private
from cogumi_tasks.stack import services
from cogumi_tasks.stack.services import HOST, S3Ports, ServiceError

REPO = Path(__file__).resolve().parents[2]
BUCKET = "cogumi"
LLM_MODEL = "smollm2-135m"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
# LocalExecutor that imports torch, transformers, ... once before its workers fork the tasks (plugins/)
PRELOAD_EXECUTOR = "cogumi_provider.executors.PreloadLocalExecutor"
AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
SERVICES = ("s3", "llm", "strong", *AIRFLOW_SERVICES)
CODE_SERVICES = ("strong", *AIRFLOW_SERVICES)  # they run the project's code: restarted when it changes
PORT_VARS = {"s3": "COGUMI_S3_PORT", "llm": "COGUMI_LLM_PORT", "strong": "COGUMI_STRONG_PORT",
             "api-server": "COGUMI_AIRFLOW_PORT"}
# Popen objects of children started by this process, so stop() can reap them (no zombies in tests).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class Settings:
    """Where the stack lives and which loopback ports it uses."""

    home: Path
    s3_port: int = 18300
    llm_port: int = 18400
    strong_port: int = 18401
    airflow_port: int = 18500
    dags_folder: Path = REPO / "dags"
    plugins_folder: Path = REPO / "plugins"
    config_dir: Path = REPO / "configs"
    parallelism: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        e = os.environ if environ is None else environ
        s = cls(
            home=Path(e.get("COGUMI_HOME") or REPO / ".cogumi").resolve(),
            s3_port=int(e.get("COGUMI_S3_PORT") or 18300),
            llm_port=int(e.get("COGUMI_LLM_PORT") or 18400),
            strong_port=int(e.get("COGUMI_STRONG_PORT") or 18401),
            airflow_port=int(e.get("COGUMI_AIRFLOW_PORT") or 18500),
        )
        return replace(s, **overrides)

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pids_file(self) -> Path:
        return self.home / "pids.json"

    @property
    def secrets_file(self) -> Path:
        return self.home / "secrets.env"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def llm_url(self) -> str:
        return f"http://{HOST}:{self.llm_port}/v1"

    @property
    def strong_url(self) -> str:
        return f"http://{HOST}:{self.strong_port}/v1"

    @property
    def airflow_url(self) -> str:
        return f"http://{HOST}:{self.airflow_port}"

    def ports(self, name: str) -> list[int]:
        """Every port a service listens on (SeaweedFS derives ~14 from its base port)."""
        if name == "s3":
            return S3Ports(self.s3_port).all()
        return {"llm": [self.llm_port], "strong": [self.strong_port], "api-server": [self.airflow_port]}.get(name, [])


# ---------------------------------------------------------------- secrets and environment
def load_secrets(settings: Settings) -> dict[str, str]:
    """Read ``secrets.env``, generating it (mode 600 from creation; a concurrent first run keeps the
    file whichever process wrote it first) the first time."""
    path = settings.secrets_file
    if not path.exists():
        values = {
            "COGUMI_S3_ACCESS_KEY": "cogumi" + secrets.token_hex(6),
            "COGUMI_S3_SECRET_KEY": secrets.token_urlsafe(30),
            "COGUMI_AIRFLOW_PASSWORD": secrets.token_urlsafe(12),
            "COGUMI_JWT_SECRET": secrets.token_urlsafe(64),
            "COGUMI_API_SECRET_KEY": secrets.token_urlsafe(32),
            "COGUMI_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        }
        write_private(path, "".join(f"{k}={v}\n" for k, v in values.items()), overwrite=False)
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def s3_credentials(settings: Settings) -> dict[str, str]:
    """Credentials for :class:`~cogumi_tasks.core.artifacts.ArtifactStore`."""
    sec = load_secrets(settings)
    return {"aws_access_key_id": sec["COGUMI_S3_ACCESS_KEY"],
            "aws_secret_access_key": sec["COGUMI_S3_SECRET_KEY"]}


def env(settings: Settings | None = None) -> dict[str, str]:
    """Every variable the Airflow components and the task processes they run need."""
    s = settings or Settings.from_env()
    sec = load_secrets(s)
    passwords = s.airflow_home / "simple_auth_manager_passwords.json"
    text = json.dumps({"admin": sec["COGUMI_AIRFLOW_PASSWORD"]})
    if not passwords.exists() or passwords.stat().st_mode & 0o077 or passwords.read_text() != text:
        write_private(passwords, text)
    af = {
        "AIRFLOW_HOME": s.airflow_home,
        "CORE__DAGS_FOLDER": s.dags_folder,
        "CORE__PLUGINS_FOLDER": s.plugins_folder,
        "CORE__LOAD_EXAMPLES": "False",
        "CORE__EXECUTOR": PRELOAD_EXECUTOR,
        "CORE__UNIT_TEST_MODE": "False",
        "CORE__PARALLELISM": s.parallelism,
        "CORE__MAX_ACTIVE_TASKS_PER_DAG": s.parallelism,
        "CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "CORE__FERNET_KEY": sec["COGUMI_FERNET_KEY"],
        "CORE__EXECUTION_API_SERVER_URL": f"{s.airflow_url}/execution/",
        "CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": passwords,
        "DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{s.airflow_home / 'airflow.db'}",
        "API__HOST": HOST,
        "API__PORT": s.airflow_port,
        "API__BASE_URL": s.airflow_url,
        "API__SECRET_KEY": sec["COGUMI_API_SECRET_KEY"],
        "API__WORKERS": 1,
        "API_AUTH__JWT_SECRET": sec["COGUMI_JWT_SECRET"],
        "DAG_PROCESSOR__REFRESH_INTERVAL": 10,  # new DAG files show up within seconds
        # An unchanged DAG file is re-parsed at most every 5 minutes; an edited one at the next loop (the parse
        # order is by modification time). Every 10 s, as before, the parse children took 74% of one core on
        # 2 cores, measured in a make demo, slowing every task.
        "DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": 300,
        "DAG_PROCESSOR__PARSING_PROCESSES": 1,
        "SCHEDULER__SCHEDULER_HEARTBEAT_SEC": 2,
        "SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": 0.5,
        "LOGGING__BASE_LOG_FOLDER": s.airflow_home / "logs",
    }
    out = {("" if k == "AIRFLOW_HOME" else "AIRFLOW__") + k: str(v) for k, v in af.items()}
    out.update({
        "AWS_ACCESS_KEY_ID": sec["COGUMI_S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": sec["COGUMI_S3_SECRET_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "COGUMI_HOME": str(s.home),
        "COGUMI_S3_ENDPOINT": s.s3_endpoint,
        "COGUMI_LLM_URL": s.llm_url,
        "COGUMI_STRONG_URL": s.strong_url,
        "COGUMI_CONFIG_DIR": str(s.config_dir),
        # A step's in-process llama.cpp gets every core (gguf_threads() leaves one to the llama.cpp server): the
        # stack's CPU steps take turns in one pool (tiny.yaml's cogumi_cpu, tier calls included) and eval.run asks
        # the reference after its student, so the server is idle meanwhile. 1.29x faster with 2 threads than 1 on
        # 2 cores beside the idle stack, same answers (docs/operations.md). A value already set wins (the tests').
        "COGUMI_GGUF_THREADS": os.environ.get("COGUMI_GGUF_THREADS") or str(os.cpu_count() or 1),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    out.update(s.extra_env)
    return out


# ---------------------------------------------------------------- pids and health
def read_pids(settings: Settings) -> dict[str, dict]:
    try:
        return json.loads(settings.pids_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_pids(settings: Settings, pids: dict[str, dict]) -> None:
    settings.pids_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = settings.pids_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids, indent=1))
    tmp.replace(settings.pids_file)


def code_fingerprint(settings: Settings) -> str:
    """A hash of the names, sizes and modification times of the code and configs that the Airflow
    components import (the library, the plugins, configs/): it changes when any of them is edited."""
    h = hashlib.sha256()
    for root in (REPO / "cogumi_tasks", settings.plugins_folder, settings.config_dir):
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                st = path.stat()
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _record(settings: Settings, name: str, proc: subprocess.Popen, cmd: list[str]) -> None:
    _CHILDREN[proc.pid] = proc
    pids = read_pids(settings)
    pids[name] = {"pid": proc.pid, "ports": settings.ports(name), "cmd": cmd, "started": time.time(),
                  "code": code_fingerprint(settings) if name in CODE_SERVICES else None}
    _write_pids(settings, pids)


def pid_alive(pid: int, cmd: list[str] | None = None) -> bool:
    """Alive, not a zombie, and (when given) still running the recorded command (no pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return not cmd or Path(cmd[0]).name.encode() in b" ".join(cmdline)


def _http_ok(url: str, ok: tuple[int, ...] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status in ok
    except urllib.error.HTTPError as exc:
        return exc.code in ok
    except (urllib.error.URLError, OSError):
        return False


def airflow_health(settings: Settings) -> dict:
    """``GET /api/v2/monitor/health`` (no auth needed), or ``{}`` when the API server is down."""
    try:
        with urllib.request.urlopen(f"{settings.airflow_url}/api/v2/monitor/health", timeout=3) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}


def healthy(settings: Settings, name: str, health: dict | None = None) -> bool:
    if name == "s3":
        return _http_ok(settings.s3_endpoint + "/", (200, 403))
    if name == "llm":
        return _http_ok(settings.llm_url + "/models")
    if name == "strong":
        return _http_ok(settings.strong_url.removesuffix("/v1") + "/_stats")
    health = airflow_health(settings) if health is None else health
    key = {"api-server": "metadatabase"}.get(name, name.replace("-", "_"))
    return (health.get(key) or {}).get("status") == "healthy"


def port_owner(port: int) -> str:
    """``name (pid N)`` of whatever listens on ``port``, if ``ss`` can tell."""
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown process"
    m = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
    return f"{m.group(1)} (pid {m.group(2)})" if m else "a process not visible to this user"


def _check_ports(settings: Settings, name: str) -> None:
    taken = [p for p in settings.ports(name) if not services.port_is_free(p)]
    if taken:
        var = PORT_VARS.get(name, "COGUMI_AIRFLOW_PORT")
        raise ServiceError(
            f"{name}: port {taken[0]} on {HOST} is in use by {port_owner(taken[0])}"
            + (f" (also {taken[1:]})" if len(taken) > 1 else "")
            + f"; stop it or choose other ports with {var}=<port>"
        )


# ---------------------------------------------------------------- up / down / status
def _airflow_cmd(name: str, settings: Settings) -> list[str]:
    af = services.venv_bin("airflow")
    return {
        "api-server": [af, "api-server", "--host", HOST, "--port", str(settings.airflow_port), "-w", "1"],
        "scheduler": [af, "scheduler", "--skip-serve-logs"],
        "dag-processor": [af, "dag-processor"],
        "triggerer": [af, "triggerer", "--skip-serve-logs"],
    }[name]


def _airflow_cli(settings: Settings, args: list[str], what: str) -> None:
    """Run ``airflow ARGS`` against the stack's database, its output appended to ``<what>.log``."""
    log_path = settings.logs_dir / f"{what}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        rc = subprocess.run([services.venv_bin("airflow"), *args], stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **env(settings)}, timeout=600).returncode
    if rc != 0:
        raise ServiceError(f"airflow {' '.join(args)} failed (exit {rc}); see {log_path}")


def migrate(settings: Settings, log=print) -> bool:
    """``airflow db migrate`` unless this Airflow version already migrated this database."""
    import importlib.metadata

    marker = settings.airflow_home / ".migrated"
    version = importlib.metadata.version("apache-airflow")
    if marker.exists() and marker.read_text() == version and (settings.airflow_home / "airflow.db").exists():
        return False
    log(f"airflow db migrate (Airflow {version}) ...")
    (settings.airflow_home / "pools.json").unlink(missing_ok=True)  # a new database has no pools yet
    _airflow_cli(settings, ["db", "migrate"], "migrate")
    marker.write_text(version)
    return True


def sync_pools(settings: Settings, log=print) -> bool:
    """Create or resize the Airflow pools the deployment's config names (``compute.pools``);
    skipped when they are what the last sync set."""
    from cogumi_tasks.core.config import ConfigError, load_config

    name = {**os.environ, **env(settings)}.get("COGUMI_CONFIG", "tiny")
    path = name if name.endswith((".yaml", ".yml")) else str(settings.config_dir / f"{name}.yaml")
    try:
        pools = load_config(path).compute.pools
    except ConfigError as exc:
        raise ServiceError(f"the deployment's config {name!r}: {exc}") from exc
    spec = {name: {"slots": p.slots, "description": "cogumi: " + ", ".join(p.steps), "include_deferred": False}
            for name, p in sorted(pools.items())}
    marker = settings.airflow_home / "pools.json"
    text = json.dumps(spec, indent=1)
    if not spec or (marker.exists() and marker.read_text() == text):
        return False
    log("airflow pools: " + ", ".join(f"{n} ({p['slots']} slots)" for n, p in spec.items()))
    wanted = settings.airflow_home / "pools.wanted.json"
    wanted.write_text(text)
    _airflow_cli(settings, ["pools", "import", str(wanted)], "pools")
    wanted.replace(marker)
    return True


def _start(settings: Settings, name: str) -> subprocess.Popen:
    log_path = settings.logs_dir / f"{name}.log"
    sec = load_secrets(settings)
    if name == "s3":
        # a make demo of Phases 0-5 wrote 3.0 GB of S3 data (2026-12-06)
        proc = services.start_s3(settings.home / "s3", settings.s3_port, sec["COGUMI_S3_ACCESS_KEY"],
                                 sec["COGUMI_S3_SECRET_KEY"], log_path, min_free_gib=4)
        _record(settings, name, proc, proc.args)
        from cogumi_tasks.core.artifacts import ArtifactStore
        from cogumi_tasks.core.config import StorageConfig

        ArtifactStore(StorageConfig(bucket=BUCKET, endpoint_url=settings.s3_endpoint),
                      s3_credentials(settings)).ensure_bucket()
        return proc
    if name == "llm":
        proc = services.start_llama_server(LLM_MODEL, settings.llm_port, log_path)
        _record(settings, name, proc, proc.args)
        return proc
    if name == "strong":
        proc = services.start_strong_tier(settings.strong_port, log_path)
        _record(settings, name, proc, proc.args)
        return proc
    cmd = _airflow_cmd(name, settings)
    proc = services.spawn(cmd, log_path, env=env(settings), cwd=settings.airflow_home)
    _record(settings, name, proc, cmd)
    return proc


def up(settings: Settings | None = None, log=print, timeout_s: float = 180) -> dict[str, dict]:
    """Start every service that is not already ours, alive and healthy; wait until Airflow is healthy."""
    s = settings or Settings.from_env()
    s.home.mkdir(parents=True, exist_ok=True)
    load_secrets(s)
    t0 = time.monotonic()
    for name in SERVICES:
        if name == "api-server":
            migrate(s, log)
            sync_pools(s, log)
        rec = read_pids(s).get(name)
        if rec and pid_alive(rec["pid"], rec.get("cmd")):
            stale = name in CODE_SERVICES and rec.get("code") != code_fingerprint(s)
            if not stale and (name in AIRFLOW_SERVICES or healthy(s, name)):
                log(f"{name:14s} reusing pid {rec['pid']}")
                continue
            why = "the code or configs changed since it started" if stale else "it is alive but unhealthy"
            log(f"{name:14s} pid {rec['pid']}: {why}: restarting it")
            _stop_pid(rec["pid"])
        _check_ports(s, name)
        proc = _start(s, name)
        log(f"{name:14s} started pid {proc.pid} ({s.logs_dir / (name + '.log')})")
    _wait_airflow(s, timeout_s - (time.monotonic() - t0))
    log(f"stack healthy after {time.monotonic() - t0:.1f}s: Airflow {s.airflow_url}  S3 {s.s3_endpoint}  "
        f"LLM {s.llm_url}  strong tier {s.strong_url}")
    return read_pids(s)


def _wait_airflow(s: Settings, timeout_s: float) -> None:
    deadline = time.monotonic() + max(timeout_s, 30)
    health: dict = {}
    while time.monotonic() < deadline:
        pids = read_pids(s)
        dead = [n for n in AIRFLOW_SERVICES if not (n in pids and pid_alive(pids[n]["pid"]))]
        if dead:
            raise ServiceError(f"{', '.join(dead)} exited during start-up; see {s.logs_dir}/<name>.log")
        health = airflow_health(s)
        if all(healthy(s, n, health) for n in AIRFLOW_SERVICES):
            return
        time.sleep(1)
    raise ServiceError(f"Airflow not healthy after {timeout_s:.0f}s: {health or 'API server not answering'}; "
                       f"see logs in {s.logs_dir}")


def _stop_pid(pid: int) -> None:
    proc = _CHILDREN.pop(pid, None)
    services.stop(proc if proc is not None else pid)


def down(settings: Settings | None = None, log=print) -> list[str]:
    """Stop every recorded service, the reverse of start order (each wave in parallel: the triggerer
    alone takes ~10 s to let its triggers clean up); forget dead entries."""
    from concurrent.futures import ThreadPoolExecutor

    s = settings or Settings.from_env()
    pids = read_pids(s)
    waves = [("scheduler", "dag-processor", "triggerer"), ("api-server",), ("llm", "strong", "s3")]
    waves.insert(0, tuple(n for n in pids if n not in SERVICES))
    stopped: list[str] = []
    for wave in waves:
        live = [n for n in wave if n in pids and pid_alive(pids[n]["pid"], pids[n].get("cmd"))]
        for name in wave:
            if name in pids and name not in live:
                log(f"{name:14s} pid {pids.pop(name)['pid']} was not running")
        with ThreadPoolExecutor(max_workers=max(len(live), 1)) as pool:
            list(pool.map(lambda n: _stop_pid(pids[n]["pid"]), live))
        for name in live:
            log(f"{name:14s} stopped pid {pids.pop(name)['pid']}")
            stopped.append(name)
        _write_pids(s, pids)
    return stopped


def status(settings: Settings | None = None, log=print) -> list[dict]:
    """One row per service: pid (if recorded), ports, alive, healthy."""
    s = settings or Settings.from_env()
    pids = read_pids(s)
    health = airflow_health(s)
    rows = []
    for name in SERVICES:
        rec = pids.get(name)
        alive = bool(rec) and pid_alive(rec["pid"], rec.get("cmd"))
        ports = s.ports(name)
        rows.append({"service": name, "pid": rec["pid"] if rec else None, "port": ports[0] if ports else None,
                     "alive": alive, "healthy": alive and healthy(s, name, health)})
    for r in rows:
        log(f"{r['service']:14s} pid {str(r['pid'] or '-'):>8s}  port {str(r['port'] or '-'):>6s}  "
            f"healthy {'yes' if r['healthy'] else 'no'}")
    return rows


def cli_stack(action: str) -> int:
    """``cogumi stack up|down|status|serve`` (serve: the gateway, chat UI and Prometheus on the current release)."""
    try:
        if action == "up":
            up()
        elif action == "serve":
            from cogumi_tasks.stack.demo import start_serving

            up()
            return start_serving(env().get("COGUMI_CONFIG", "tiny"))
        elif action == "down":
            down()
        elif action == "status":
            return 0 if all(r["healthy"] for r in status()) else 1
        else:
            print(f"unknown action {action!r}: use up, down, status or serve", file=sys.stderr)
            return 2
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
