"""The append-only cost ledger: each flush a new object, budget checks read only unseen objects, every row once."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from cogumi_tasks.core.ledger import BudgetExceeded, CostLedger, Price, read_run_ledger

PRICES = {"p": Price(input_per_mtok=1e6, output_per_mtok=0.0)}  # $1 per prompt token
PREFIX = "s3://bucket/pipe/_runs/r1/ledger"


class AppendOnlyStore:
    """In-memory S3 stand-in that refuses to overwrite an object and counts reads."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.reads: Counter = Counter()
        self._lock = threading.Lock()

    def put_bytes(self, uri: str, data: bytes) -> None:
        with self._lock:
            assert uri not in self.objects, f"{uri} rewritten"
            self.objects[uri] = data

    def get_bytes(self, uri: str) -> bytes:
        self.reads[uri] += 1
        return self.objects[uri]

    def list(self, prefix: str):
        with self._lock:
            return sorted(u for u in self.objects if u.startswith(prefix))


def spend(ledger: CostLedger, usd: int, tag: str) -> None:
    ledger.record(step="s", endpoint="e", model="m", price="p", prompt_tokens=usd, completion_tokens=0,
                  request_hash=tag)


def ledger(store: AppendOnlyStore, part: str, budget: float = 100.0) -> CostLedger:
    return CostLedger(PRICES, budget, store=store, ledger_prefix=PREFIX, part=part, refresh_s=0.0,
                      clock=iter(range(1, 10**6)).__next__)


def test_each_flush_writes_only_new_rows_as_a_new_object():
    store = AppendOnlyStore()
    a = ledger(store, "a")
    spend(a, 1, "a1")
    spend(a, 2, "a2")
    a.flush()
    a.flush()  # nothing new: no object
    spend(a, 3, "a3")
    a.flush()
    bodies = [store.objects[u].decode().splitlines() for u in store.list(PREFIX + "/")]
    assert [len(b) for b in bodies] == [2, 1]
    assert sorted(r["request_hash"] for r in read_run_ledger(store, PREFIX)) == ["a1", "a2", "a3"]


def test_budget_check_reads_each_other_object_once():
    store = AppendOnlyStore()
    a, b = ledger(store, "a", budget=10.0), ledger(store, "b", budget=10.0)
    spend(b, 4, "b1")
    b.flush()
    assert a.run_total_usd() == 4.0
    assert a.run_total_usd() == 4.0  # nothing new: nothing re-read
    assert sum(store.reads.values()) == 1
    spend(b, 5, "b2")
    b.flush()
    spend(a, 1, "a1")
    a.flush()
    assert a.run_total_usd() == 10.0  # its own row from memory, b's two objects from S3
    assert sum(store.reads.values()) == 2 and all(n == 1 for n in store.reads.values())
    with pytest.raises(BudgetExceeded):
        a.check_budget()
    assert b.run_total_usd() == 10.0


def test_concurrent_records_and_flushes_keep_every_row_exactly_once():
    store = AppendOnlyStore()
    parts = [ledger(store, f"w{i}") for i in range(3)]

    def work(led: CostLedger, name: str) -> None:
        for j in range(200):
            spend(led, 1, f"{name}-{j}")
            if j % 7 == 0:
                led.flush()

    threads = [threading.Thread(target=work, args=(led, f"{led.part}-t{t}")) for led in parts for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for led in parts:
        led.flush()
    rows = read_run_ledger(store, PREFIX)
    hashes = [r["request_hash"] for r in rows]
    assert len(hashes) == len(set(hashes)) == 3 * 2 * 200
    assert parts[0].run_total_usd() == 1200.0
