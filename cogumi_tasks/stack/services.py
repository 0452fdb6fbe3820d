"""Local services on loopback: the S3 server (SeaweedFS ``weed mini``), llama.cpp's
OpenAI-compatible server over the packaged GGUFs and the strong tier (the task families' solver).
Used by ``cogumi stack`` and by the tests.

Nothing here downloads anything: the models come from pip-installed packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cogumi_tasks.models.packaged import MODELS, ModelMissing, llama_server_threads

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A local service failed to start or a port is taken."""


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None, ok=(200,)) -> None:
    """Poll ``url`` until it answers one of ``ok``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"process for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.25)
    raise ServiceError(f"{url} not ready after {timeout_s:.0f}s: {last}")


def spawn(cmd: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a detached process (own session) logging to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
    )


def venv_bin(name: str) -> str:
    """A console script next to the running interpreter (the project venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"{name} not found; run `make install`")
    return found


# ---------------------------------------------------------------- S3
@dataclass(frozen=True)
class S3Ports:
    """``weed mini`` opens several listeners; all of them are derived from one base port."""

    s3: int

    def flags(self) -> list[str]:
        b = self.s3
        # gRPC ports default to http+10000: keep every derived port below 55536.
        return [
            f"-s3.port={b}", f"-master.port={b + 1}", f"-volume.port={b + 2}", f"-filer.port={b + 3}",
            f"-webdav.port={b + 4}", f"-admin.port={b + 5}", f"-s3.port.iceberg={b + 6}",
            f"-s3.port.lance={b + 7}", "-admin.ui=false",
        ]

    def all(self) -> list[int]:
        return [self.s3 + i for i in range(8)] + [self.s3 + i + 10000 for i in range(6)]


def start_s3(data_dir: Path, port: int, access_key: str, secret_key: str, log_path: Path,
             min_free_gib: float = 0.0) -> subprocess.Popen:
    """SeaweedFS S3 API on 127.0.0.1:port with real credentials and on-disk persistence; its own log files (glog)
    go beside ``log_path``.

    SeaweedFS derives how many volumes it may create from the free disk, and once none is left every upload fails
    with a bare S3 ``InternalError`` ("no free volumes left" in its log). So it does not start when ``data_dir`` has
    less than ``min_free_gib`` GiB free: what its users will write, plus the 1% of the disk SeaweedFS keeps free."""
    data_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(data_dir)
    need = min_free_gib * 2**30 + disk.total / 100
    if disk.free < need:
        raise ServiceError(f"S3 data directory {data_dir}: {disk.free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB "
                           f"needed ({min_free_gib:g} GiB to write + 1% of the disk, which SeaweedFS keeps free); "
                           "free some space or put the data elsewhere")
    ports = S3Ports(port)
    taken = [p for p in ports.all() if not port_is_free(p)]
    if taken:
        raise ServiceError(f"S3 server ports in use: {taken} (choose another with COGUMI_S3_PORT)")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [venv_bin("weed"), f"-logdir={log_path.parent}", "mini", f"-dir={data_dir}", f"-ip={HOST}",
           f"-ip.bind={HOST}", *ports.flags()]
    env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    proc = spawn(cmd, log_path, env=env, cwd=data_dir)
    wait_s3(f"http://{HOST}:{port}", timeout_s=60, proc=proc)
    return proc


def wait_s3(endpoint: str, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> None:
    # An unauthenticated request gets 403 once the S3 gateway is up.
    wait_http(endpoint + "/", timeout_s=timeout_s, proc=proc, ok=(200, 403))


# ---------------------------------------------------------------- llama.cpp
def start_llama_server(model: str, port: int, log_path: Path, n_ctx: int = 2048, threads: int | None = None,
                       alias: str | None = None, prompt_cache_bytes: int = 0) -> subprocess.Popen:
    """llama.cpp's OpenAI-compatible server for one packaged model, on 127.0.0.1:port, with ``threads`` threads
    (default: :func:`~cogumi_tasks.models.packaged.llama_server_threads`).

    ``prompt_cache_bytes`` > 0 turns on llama-cpp-python's RAM prompt cache: the model state after each request is
    kept (least recently used out first) and a request resumes from the longest cached prefix of its prompt, so
    interleaved few-shot prompts (the Phase 3 tiers) do not re-read their examples (``bench/prompt_cache.py``).
    Off by default: llama-cpp-python counts only the KV state (about 24 KB a token here) against the size, while
    each kept state also holds a copy of the logits buffer (n_batch x vocabulary floats: 101 MB at 512 x 49,152), so
    memory grows far past the size given (a server reached about 5.5 GB RSS with 512 MiB set, when that buffer still
    had a row per context position).

    The server computes logits for the last prompt position only (``--logits_all False``; its default, True, runs
    the vocabulary projection on every prompt token and is needed only for ``logprobs``, which no client of this
    server asks for; measured in docs/operations.md)."""
    if model not in MODELS:
        raise ServiceError(f"unknown local model {model!r}; known: {sorted(MODELS)}")
    if not port_is_free(port):
        raise ServiceError(f"port {port} for the {model} server is in use")
    try:
        path = MODELS[model]()
    except ModelMissing as exc:
        raise ServiceError(str(exc)) from exc
    threads = threads or llama_server_threads()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(path),
        "--model_alias", alias or model, "--host", HOST, "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--logits_all", "False",
    ]
    if prompt_cache_bytes > 0:
        cmd += ["--cache", "True", "--cache_size", str(prompt_cache_bytes)]
    proc = spawn(cmd, log_path)
    wait_http(f"http://{HOST}:{port}/v1/models", timeout_s=120, proc=proc)
    return proc


# ---------------------------------------------------------------- the strong tier
def start_strong_tier(port: int, log_path: Path) -> subprocess.Popen:
    """The strong tier's OpenAI-compatible server (:mod:`cogumi_tasks.world.strong_tier`) on 127.0.0.1:port."""
    if not port_is_free(port):
        raise ServiceError(f"port {port} for the strong tier is in use")
    cmd = [sys.executable, "-m", "cogumi_tasks.world.strong_tier", "--host", HOST, "--port", str(port)]
    proc = spawn(cmd, log_path)
    wait_http(f"http://{HOST}:{port}/_stats", timeout_s=60, proc=proc)
    return proc


# ---------------------------------------------------------------- Prometheus
MONITORING_DIR = Path(__file__).resolve().parents[2] / "monitoring"


def prometheus_run_dir(run_dir: Path, targets: dict[str, list[str]]) -> Path:
    """monitoring/prometheus.yml and its rules copied into ``run_dir``, with one file_sd targets file per job
    (``{"gateway": ["127.0.0.1:8000"], "prometheus": [...]}`` -> targets/gateway.yml); returns the config path."""
    import fnmatch

    import yaml

    conf = yaml.safe_load((MONITORING_DIR / "prometheus.yml").read_text())
    globs = [f for job in conf["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    unknown = [job for job in targets if not any(fnmatch.fnmatch(f"targets/{job}.yml", g) for g in globs)]
    if unknown:
        raise ServiceError(f"no scrape job reads targets for {unknown} in {MONITORING_DIR / 'prometheus.yml'}: {globs}")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(MONITORING_DIR / "prometheus.yml", run_dir / "prometheus.yml")
    shutil.copytree(MONITORING_DIR / "rules", run_dir / "rules", dirs_exist_ok=True)
    (run_dir / "targets").mkdir(exist_ok=True)
    for job, addresses in targets.items():
        lines = [f'  - "{a}"' for a in addresses]
        text = "\n".join(["- targets:", *lines, "  labels: {stack: local}"]) + "\n"
        (run_dir / "targets" / f"{job}.yml").write_text(text)
    return run_dir / "prometheus.yml"


def start_prometheus(config_path: Path, port: int, data_dir: Path, log_path: Path) -> subprocess.Popen:
    """Prometheus (Debian's package) on 127.0.0.1:port with its TSDB in ``data_dir`` (throwaway, 1 day kept)."""
    binary = shutil.which("prometheus")
    if not binary:
        raise ServiceError("prometheus not found; install Debian's prometheus package (make install)")
    if not port_is_free(port):
        raise ServiceError(f"port {port} for Prometheus is in use")
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary, f"--config.file={config_path}", f"--web.listen-address={HOST}:{port}",
        f"--storage.tsdb.path={data_dir}", "--storage.tsdb.retention.time=1d",
    ]
    proc = spawn(cmd, log_path, cwd=data_dir)
    wait_http(f"http://{HOST}:{port}/-/ready", timeout_s=60, proc=proc)
    return proc


def stop(proc_or_pid: subprocess.Popen | int, timeout_s: float = 15) -> None:
    """Terminate a process group started by :func:`spawn`, then kill it if it lingers."""
    import signal

    pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        if isinstance(proc_or_pid, subprocess.Popen) and proc_or_pid.poll() is not None:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
