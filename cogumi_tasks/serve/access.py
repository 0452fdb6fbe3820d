"""API keys (kept as sha256 hashes) and the per-key token-bucket rate limit."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

KEYS_ENV = "COGUMI_API_KEYS"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | Path | None = None, env: str = KEYS_ENV) -> list[str]:
    """Keys from env ``COGUMI_API_KEYS`` (comma separated) and a secrets file (one a line, ``#`` comments)."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"serve.api_keys_file {p}: no such file")
        for n, line in enumerate(p.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line and any(c.isspace() for c in line):
                raise ValueError(f"{p}:{n}: an API key has no spaces")
            if line:
                keys.append(line)
    return keys


class ApiKeys:
    """The accepted keys as sha256 hashes; the keys themselves are not kept."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.hashes = {key_hash(k) for k in keys if k}
        if not self.hashes:
            raise ValueError(f"no API keys: set {KEYS_ENV} or serve.api_keys_file")

    def check(self, authorization: str | None) -> str | None:
        """The key's hash when the ``Authorization: Bearer <key>`` header holds an accepted key, else None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        h = key_hash(authorization[7:].strip())
        return h if any(hmac.compare_digest(h, known) for known in self.hashes) else None


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, refilled at ``per_minute`` a minute."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = per_minute / 60.0, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go, else the seconds until one may."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
