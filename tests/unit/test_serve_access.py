"""Gateway pieces without an engine: API keys kept hashed, the token bucket, the query log's batching and layout,
the confidence of generated tokens, and the escalation's choice of the stronger model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from cogumi_tasks.serve.access import ApiKeys, RateLimiter, key_hash, read_keys
from cogumi_tasks.serve.querylog import QueryLog


def test_keys_from_env_and_file_are_kept_hashed(tmp_path, monkeypatch):
    monkeypatch.setenv("COGUMI_API_KEYS", " k-env-1 , k-env-2,")
    f = tmp_path / "keys"
    f.write_text("# gateway keys\nk-file-1\n\nk-file-2  # ops\n")
    keys = read_keys(f)
    assert keys == ["k-env-1", "k-env-2", "k-file-1", "k-file-2"]
    api = ApiKeys(keys)
    assert all(len(h) == 64 for h in api.hashes) and not any(k in api.hashes for k in keys)
    assert api.check("Bearer k-file-2") == key_hash("k-file-2")
    assert api.check("Bearer nope") is None and api.check(None) is None and api.check("k-env-1") is None
    f.write_text("two words\n")
    with pytest.raises(ValueError, match=r"keys:1: an API key has no spaces"):
        read_keys(f)
    monkeypatch.delenv("COGUMI_API_KEYS")
    with pytest.raises(ValueError, match="no API keys"):
        ApiKeys(read_keys(None))


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    rl = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [rl.take("a"), rl.take("a")] == [0.0, 0.0]
    assert rl.take("a") == pytest.approx(1.0)  # one request a second
    assert rl.take("b") == 0.0  # per key
    now[0] = 0.5
    assert rl.take("a") == pytest.approx(0.5)
    now[0] = 1.0
    assert rl.take("a") == 0.0 and rl.take("a") > 0


class FakeStore:
    def __init__(self, fail: int = 0):
        self.objects: dict[str, bytes] = {}
        self.fail = fail

    def put_bytes(self, uri, data):
        if self.fail:
            self.fail -= 1
            raise OSError("S3 down")
        self.objects[uri] = data


def test_query_log_groups_lines_by_hour_and_keeps_them_when_s3_fails():
    store = FakeStore(fail=1)
    qlog = QueryLog(store, "s3://b/tiny/query-logs/", flush_s=3600, batch=1000)
    try:
        qlog.add({"ts": "2026-12-03T10:59:59.000+00:00", "request_id": "a"})
        qlog.add({"ts": "2026-12-03T11:00:00.000+00:00", "request_id": "b"})
        first = qlog.flush()  # the first put fails: its lines wait for the next flush
        assert len(first) == 1 and "/dt=2026-12-03/hour=11/" in first[0]
        assert len(qlog.flush()) == 1 and qlog.flush() == []
    finally:
        qlog.close()
    keys = sorted(store.objects)
    assert [k.split("/query-logs/")[1].rsplit("/", 1)[0] for k in keys] == ["dt=2026-12-03/hour=10",
                                                                           "dt=2026-12-03/hour=11"]
    assert all(k.startswith("s3://b/tiny/query-logs/dt=") and k.endswith(".jsonl") for k in keys)
    rows = [json.loads(line) for k in keys for line in store.objects[k].decode().splitlines()]
    assert sorted(r["request_id"] for r in rows) == ["a", "b"]


def test_query_log_flushes_a_full_batch_off_the_caller_and_on_close():
    store = FakeStore()
    qlog = QueryLog(store, "s3://b/x/query-logs", flush_s=3600, batch=2)
    qlog.add({"ts": "2026-12-03T11:00:00+00:00", "n": 1})
    qlog.add({"ts": "2026-12-03T11:00:01+00:00", "n": 2})  # a full batch wakes the writer thread
    qlog.add({"ts": "2026-12-03T11:00:02+00:00", "n": 3})
    qlog.close()
    rows = [json.loads(line) for v in store.objects.values() for line in v.decode().splitlines()]
    assert sorted(r["n"] for r in rows) == [1, 2, 3]


def test_raw_confidence_is_the_geometric_mean_token_probability():
    from cogumi_tasks.serve.decide import raw_confidence

    assert raw_confidence([]) is None
    assert raw_confidence([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)


def test_escalation_takes_the_best_modifier_or_the_next_when_that_answered_last():
    from cogumi_tasks.serve.decide import Brain

    brain = Brain.__new__(Brain)
    brain.router = SimpleNamespace(models=["base", "code", "reasoning", "automation"])
    probs = {"base": 0.7, "code": 0.1, "reasoning": 0.15, "automation": 0.05}
    brain.probabilities = lambda query, conf, turns: probs
    d = brain.escalation("no, wrong", [SimpleNamespace(route="base")])
    assert (d.route, d.reason, d.escalated_from) == ("reasoning", "escalation", "base")
    assert brain.escalation("no", [SimpleNamespace(route="reasoning")]).route == "code"
