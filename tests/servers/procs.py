"""Process and port helpers shared by the stack tests."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

from cogumi_tasks.stack.services import S3Ports, port_is_free


def pick_base_port(extra_offsets: tuple[int, ...] = (), lo: int = 20000, hi: int = 24000) -> int:
    """A base port whose SeaweedFS family (+0..7, +10000..10005) and ``base + offset`` are free."""
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
