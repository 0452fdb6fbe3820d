"""Session memory on SQLite: per session, its turns (query, route, confidence, outcome) for the retention period.

The router reads a session's last turns as features (Phase 4); the serving API writes one turn per request and
sets its outcome later (escalated, thumbs up/down: Phase 5). The database runs in WAL mode with one connection
per thread; a turn's sequence number is assigned inside a write transaction, so concurrent writers never lose
or share one. Turns older than the retention are deleted (``secure_delete`` overwrites their text and the WAL is
truncated after a purge, so no query text stays in the file); a purge runs on open and again on writes once
``purge_every_s`` has passed.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cogumi_tasks.core.config import MemoryConfig

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
OUTCOMES = ("pending", "ok", "escalated", "thumbs_up", "thumbs_down")
DAY_S = 86400.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    query TEXT NOT NULL,
    route TEXT NOT NULL,
    confidence REAL NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS turns_ts ON turns (ts);
"""


class InvalidSessionId(ValueError):
    """A session id that is not 1-128 characters of letters, digits and ``_ . : -``."""


@dataclass(frozen=True)
class Turn:
    session_id: str
    seq: int
    ts: float
    query: str
    route: str
    confidence: float
    outcome: str


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise InvalidSessionId(f"session id {session_id!r} refused: 1-128 characters of A-Z a-z 0-9 _ . : - "
                               f"(pattern {SESSION_ID.pattern})")
    return session_id


class SessionMemory:
    """Turns per session in one SQLite file, safe to share between threads (each gets its own connection).

    ``clock`` returns seconds since the epoch (``time.time``); tests move it to age turns.
    """

    def __init__(self, path: str | Path, config: MemoryConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if str(path) == ":memory:" or str(path).startswith("file::memory:"):
            raise ValueError("session memory needs a file: an in-memory SQLite database is private to one "
                             "connection, and this class opens one per thread")
        self.path = Path(path)
        self.config = config or MemoryConfig()
        self.clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._last_purge = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        self.purge()

    # ---------------------------------------------------------------- connections
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.config.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (after the threads are done with this object)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> SessionMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- writes
    def add(self, session_id: str, query: str, route: str, confidence: float, outcome: str = "pending") -> int:
        """Record a turn; returns its sequence number in the session (1, 2, ...)."""
        check_session_id(session_id)
        _check_outcome(outcome)
        if not route:
            raise ValueError("route: empty")
        if not 0.0 <= float(confidence) <= 1.0:
            raise ValueError(f"confidence {confidence}: must lie in [0, 1]")
        now = self.clock()
        if now - self._last_purge >= self.config.purge_every_s:
            self.purge()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE session_id = ?",
                                  (session_id,)).fetchone()
            conn.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (session_id, seq, now, query[: self.config.max_query_chars], route, float(confidence),
                          outcome))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(seq)

    def set_outcome(self, session_id: str, seq: int, outcome: str) -> None:
        """Set a turn's outcome after the fact (the user escalated, gave a thumbs up or down)."""
        check_session_id(session_id)
        _check_outcome(outcome)
        cur = self._conn().execute("UPDATE turns SET outcome = ? WHERE session_id = ? AND seq = ?",
                                   (outcome, session_id, int(seq)))
        if cur.rowcount != 1:
            raise KeyError(f"session {session_id!r} has no turn {seq} (never written, or purged)")

    def purge(self) -> int:
        """Delete every turn older than the retention; returns how many. The WAL is checkpointed and truncated
        after a deletion, so the deleted text is gone from the files too."""
        now = self.clock()
        cutoff = now - self.config.retention_days * DAY_S
        conn = self._conn()
        removed = conn.execute("DELETE FROM turns WHERE ts < ?", (cutoff,)).rowcount
        if removed:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._last_purge = now
        return removed

    # ---------------------------------------------------------------- reads
    def last(self, session_id: str, n: int | None = None) -> list[Turn]:
        """The session's last ``n`` turns (config ``last_n``) inside the retention, newest first."""
        check_session_id(session_id)
        return self._select("WHERE session_id = ? AND ts >= ? ORDER BY seq DESC LIMIT ?",
                            (session_id, self._cutoff(), n or self.config.last_n))

    def turns(self, session_id: str) -> list[Turn]:
        """Every turn of the session inside the retention, oldest first."""
        check_session_id(session_id)
        return self._select("WHERE session_id = ? AND ts >= ? ORDER BY seq", (session_id, self._cutoff()))

    def sessions(self) -> list[str]:
        rows = self._conn().execute("SELECT DISTINCT session_id FROM turns WHERE ts >= ? ORDER BY session_id",
                                    (self._cutoff(),)).fetchall()
        return [r[0] for r in rows]

    def _cutoff(self) -> float:
        return self.clock() - self.config.retention_days * DAY_S

    def _select(self, where: str, args: tuple) -> list[Turn]:
        rows = self._conn().execute(f"SELECT session_id, seq, ts, query, route, confidence, outcome FROM turns "
                                    f"{where}", args).fetchall()
        return [Turn(*row) for row in rows]


def _check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r}: one of {list(OUTCOMES)}")
