"""Session memory: concurrent writers lose and cross nothing, retention purges old turns and their text, malformed
session ids are refused, the last-N view is newest first."""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict

import pytest

from cogumi_tasks.core.config import MemoryConfig
from cogumi_tasks.routing.memory import DAY_S, InvalidSessionId, SessionMemory


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_eight_threads_1000_turns_50_sessions_nothing_lost_or_crossed(tmp_path):
    mem = SessionMemory(tmp_path / "s.db")
    errors: list[BaseException] = []
    written: dict[str, dict[int, str]] = defaultdict(dict)  # session -> seq -> query, as add() returned
    lock = threading.Lock()
    start = threading.Barrier(8)

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(125):
                session = f"s-{(t * 7 + i) % 50}"
                query = f"{session}|t{t}|i{i}"
                seq = mem.add(session, query, route=("base", "code")[i % 2], confidence=i / 125)
                with lock:
                    assert seq not in written[session], f"{session}: seq {seq} given twice"
                    written[session][seq] = query
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sum(len(v) for v in written.values()) == 1000
    assert len(mem.sessions()) == 50
    for session, by_seq in written.items():
        turns = mem.turns(session)
        assert [t.seq for t in turns] == list(range(1, len(by_seq) + 1))  # contiguous, no gap, no duplicate
        for turn in turns:
            assert turn.session_id == session
            assert turn.query.split("|")[0] == session  # the text written to this session, not another's
            assert turn.query == by_seq[turn.seq]
    mem.close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 1000
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_last_n_newest_first_and_outcome_set_later(tmp_path):
    clock = Clock()
    mem = SessionMemory(tmp_path / "s.db", MemoryConfig(last_n=5), clock=clock)
    for i in range(8):
        clock.t += 1
        mem.add("alice", f"q{i}", "base", 0.5)
    mem.add("bob", "other", "code", 0.9)
    last = mem.last("alice")
    assert [t.query for t in last] == ["q7", "q6", "q5", "q4", "q3"]
    assert [t.seq for t in last] == [8, 7, 6, 5, 4]
    assert [t.query for t in mem.last("alice", 2)] == ["q7", "q6"]
    assert all(t.outcome == "pending" for t in last)
    mem.set_outcome("alice", 7, "thumbs_down")
    assert mem.last("alice")[1].outcome == "thumbs_down"
    assert [t.query for t in mem.last("bob")] == ["other"]
    with pytest.raises(KeyError, match="no turn 99"):
        mem.set_outcome("alice", 99, "ok")
    with pytest.raises(ValueError, match="outcome 'great'"):
        mem.set_outcome("alice", 1, "great")
    with pytest.raises(ValueError, match="confidence 1.5"):
        mem.add("alice", "q", "base", 1.5)


def test_retention_purges_old_turns_and_their_text(tmp_path):
    clock = Clock()
    path = tmp_path / "s.db"
    cfg = MemoryConfig(retention_days=7)
    mem = SessionMemory(path, cfg, clock=clock)
    mem.add("a", "SECRET-OLD-QUERY", "base", 0.4)
    clock.t += 3 * DAY_S
    mem.add("a", "recent query", "code", 0.8)
    clock.t += 4 * DAY_S + 1  # the first turn is now 7 days + 1 s old, the second 4 days + 1 s
    assert [t.query for t in mem.turns("a")] == ["recent query"]  # past retention is never read
    assert mem.purge() == 1
    mem.close()
    assert b"SECRET-OLD-QUERY" not in b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())

    clock.t += 3 * DAY_S  # reopening purges on open
    mem = SessionMemory(path, cfg, clock=clock)
    assert mem.turns("a") == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
    mem.close()


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "../etc", "sess;DROP", "é", None, 42])
def test_malformed_session_ids_are_refused(tmp_path, bad):
    mem = SessionMemory(tmp_path / "s.db")
    with pytest.raises(InvalidSessionId, match="session id .* refused"):
        mem.add(bad, "q", "base", 0.5)
    with pytest.raises(InvalidSessionId):
        mem.last(bad)
    mem.add("ok_id.1:x-" + "y" * 118, "q", "base", 0.5)  # 128 characters, every allowed kind
    mem.close()


def test_in_memory_database_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a file"):
        SessionMemory(":memory:")
