"""Process and port helpers shared by the stack tests."""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

from cogumi_tasks.stack.services import S3Ports, port_is_free


def pick_base_port(extra_offsets: tuple[int, ...] = (), lo: int = 20000, hi: int = 24000) -> int:
    """A base port whose SeaweedFS family (+0..7, +10000..10005) and ``base + offset`` are free. Under pytest-xdist
    each worker draws from its own slice of ``[lo, hi)``, so two workers never pick the same family."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1:
        width = (hi - lo) // count
        lo += int(worker[2:]) * width
        hi = lo + width
    for _ in range(200):
        base = random.randrange(lo, hi)
        if all(port_is_free(p) for p in S3Ports(base).all() + [base + o for o in extra_offsets]):
            return base
    raise RuntimeError("no free port family found")


def descendants(pids: set[int]) -> set[int]:
    """``pids`` and every process below them (read from /proc)."""
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, grew = set(pids), True
    while grew:
        new = {c for c, pp in parent.items() if pp in out} - out
        out |= new
        grew = bool(new)
    return out


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP or UDP socket owned by ``pids``."""
    out = subprocess.run(["ss", "-lntupH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        addr, _, port = line.split()[4].rpartition(":")
        found += [(addr, int(port), pid) for pid in map(int, re.findall(r"pid=(\d+)", line)) if pid in pids]
    return found


def start_test_server(module: str, port: int, args: list[str], log_path: Path):
    """Run ``python -m <module> --port PORT <args>`` detached on 127.0.0.1 and wait for ``/_stats``."""
    import sys

    from cogumi_tasks.stack.services import spawn, wait_http

    cmd = [sys.executable, "-m", module, "--port", str(port), *args]
    proc = spawn(cmd, Path(log_path), cwd=Path(__file__).resolve().parents[2])
    wait_http(f"http://127.0.0.1:{port}/_stats", timeout_s=30, proc=proc)
    return proc


def server_stats(base: str) -> dict:
    """``GET /_stats`` of a test server at ``base`` (``http://127.0.0.1:PORT``, ``/v1`` allowed)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{base.removesuffix('/v1')}/_stats", timeout=5) as resp:
        return json.loads(resp.read())
