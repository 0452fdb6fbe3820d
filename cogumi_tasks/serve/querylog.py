"""The query log: one JSON line per answered request (and per feedback), batched to S3 off the request path.

Layout: ``s3://<bucket>/<config name>/query-logs/dt=YYYY-MM-DD/hour=HH/<uuid>.jsonl``; each object holds the
lines of one flush that fall in its hour. A background thread flushes every ``flush_s`` seconds or once
``batch`` lines wait; :meth:`QueryLog.close` flushes the rest. A failed upload keeps its lines for the next
flush (logged, never raised into a request). Lines hold no API key (``key_id`` is a hash prefix).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogumi_tasks.core.artifacts import ArtifactStore

log = logging.getLogger("cogumi")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class QueryLog:
    """Lines buffered in memory and written to ``<prefix>/dt=.../hour=.../<uuid>.jsonl`` by one thread."""

    def __init__(self, store: ArtifactStore | None, prefix: str, flush_s: float = 10.0, batch: int = 200) -> None:
        self.store, self.prefix, self.flush_s, self.batch = store, prefix.rstrip("/"), flush_s, batch
        self._lines: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self.written: list[str] = []  # object URIs, newest last
        self._thread = threading.Thread(target=self._run, name="cogumi-query-log", daemon=True)
        if store is not None:
            self._thread.start()

    def add(self, line: dict[str, Any]) -> None:
        if self.store is None:
            return
        with self._cond:
            self._lines.append(line)
            if len(self._lines) >= self.batch:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._lines) < self.batch:
                    self._cond.wait(self.flush_s)
                closed = self._closed
            self.flush()
            if closed:
                return

    def flush(self) -> list[str]:
        """Write what waits now; returns the object URIs written."""
        from cogumi_tasks.core.artifacts import join_uri

        with self._cond:
            lines, self._lines = self._lines, []
        if not lines or self.store is None:
            return []
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for line in lines:
            ts = datetime.fromisoformat(line["ts"]).astimezone(UTC)
            groups[(ts.strftime("%Y-%m-%d"), ts.strftime("%H"))].append(line)
        written = []
        for (day, hour), group in sorted(groups.items()):
            uri = join_uri(self.prefix, f"dt={day}", f"hour={hour}", f"{uuid.uuid4().hex}.jsonl")
            data = "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in group).encode()
            try:
                self.store.put_bytes(uri, data)
            except Exception as exc:  # noqa: BLE001 - the log must never fail serving; keep the lines for later
                log.warning("query log: writing %s failed (%s); %d lines kept for the next flush", uri, exc, len(group))
                with self._cond:
                    self._lines[:0] = group
                continue
            written.append(uri)
        self.written += written
        return written

    def close(self) -> None:
        """Flush the rest and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
