"""The parts of scheduled re-calibration that need no model: the interval's log lines, the sample, the publish rule,
calibration releases in the registry and the serving side's watcher."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cogumi_tasks.serve.recalibrate import refusals
from cogumi_tasks.serve.traffic import hour_prefixes, interval_lines, sample_requests

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


class DictStore:
    """The slice of ArtifactStore the log reader uses, over a dict."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list(self, prefix: str):
        return [k for k in self.objects if k.startswith(prefix)]

    def get_bytes(self, uri: str) -> bytes:
        return self.objects[uri]


def line(rid: str, ts: str, **kw) -> dict:
    return {"ts": ts, "request_id": rid, "model": "cogumi-auto", "route": "base", "raw_confidence": 0.5,
            "answer": "a", "query": f"q {rid}", "release": "r-1", **kw}


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_hour_prefixes_cover_every_hour_the_interval_touches():
    got = hour_prefixes("s3://b/tiny/query-logs", datetime(2026, 12, 3, 23, 30, tzinfo=UTC),
                        datetime(2026, 12, 4, 1, 0, tzinfo=UTC))
    assert got == ["s3://b/tiny/query-logs/dt=2026-12-03/hour=23/", "s3://b/tiny/query-logs/dt=2026-12-04/hour=00/"]


def test_interval_lines_keep_only_the_interval_and_join_feedback():
    p = "s3://b/tiny/query-logs/dt=2026-12-03/hour=10/"
    store = DictStore({
        p + "a.jsonl": jsonl(line("r1", "2026-12-03T10:05:00+00:00"), line("r2", "2026-12-03T10:29:59.999+00:00"),
                             line("r3", "2026-12-03T10:30:00+00:00"),  # the end is exclusive
                             {"ts": "2026-12-03T10:06:00+00:00", "request_id": "r1", "feedback": "down"}),
        p + "b.jsonl": b"not json\n" + jsonl(line("r4", "2026-12-03T09:59:59+00:00", escalated=True)),
        "s3://b/tiny/query-logs/dt=2026-12-03/hour=11/c.jsonl": jsonl(line("r5", "2026-12-03T11:00:00+00:00"))})
    rows, counts = interval_lines(store, "s3://b/tiny/query-logs", T0, T0.replace(minute=30))
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert rows[0]["feedback"] == "down" and "feedback" not in rows[1]
    assert counts == {"objects": 2, "lines": 3, "bad_lines": 1, "requests": 2, "feedback_up": 0, "feedback_down": 1,
                      "escalated": 0}


def test_the_sample_is_the_budgeted_candidates_in_a_fixed_order():
    rows = [line(f"r{i}", "2026-12-03T10:00:00+00:00") for i in range(10)]
    rows += [line("override", "2026-12-03T10:00:00+00:00", model="cogumi-code"),
             line("routed-no-base", "2026-12-03T10:00:00+00:00", route="code"),
             line("routed", "2026-12-03T10:00:00+00:00", route="code", base_answer="b"),
             line("no-conf", "2026-12-03T10:00:00+00:00", raw_confidence=None)]
    everything = sample_requests(rows, 100, seed=0)
    assert {r["request_id"] for r in everything} == {f"r{i}" for i in range(10)} | {"routed"}
    four = sample_requests(rows, 4, seed=0)
    assert four == everything[:4] == sample_requests(list(reversed(rows)), 4, seed=0)
    assert [r["request_id"] for r in sample_requests(rows, 4, seed=1)] != [r["request_id"] for r in four]


@pytest.mark.parametrize(("ece_new", "q_new", "changed", "expected"), [
    (0.10, 0.50, True, []),
    (0.10, 0.50, False, ["equals"]),
    (0.21, 0.50, True, ["ECE"]),
    (0.10, 0.39, True, ["routing quality"]),
    (float("nan"), 0.50, True, ["ECE"]),
])
def test_a_refit_is_published_only_when_no_worse_and_changed(ece_new, q_new, changed, expected):
    why = refusals(0.20, ece_new, 0.45, q_new, changed, ece_margin=0.0, quality_margin=0.05)
    assert len(why) == len(expected) and all(e in w for e, w in zip(expected, why, strict=True))


@pytest.mark.parametrize(("cost_new", "margin", "refused"), [
    (1.20, None, False), (1.09, 0.10, False), (1.11, 0.10, True), (0.90, 0.0, False), (1.01, 0.0, True),
])
def test_cost_is_a_rule_only_when_its_margin_is_set(cost_new, margin, refused):
    why = refusals(0.20, 0.10, 0.45, 0.50, True, ece_margin=0.0, quality_margin=0.0, cost_live=1.0,
                   cost_new=cost_new, cost_margin=margin)
    assert [w.split(" ")[0] for w in why] == (["cost"] if refused else [])


def dummy_release(root: Path, calibrator: dict, threshold: float, rid: str, base: bytes = b"GGUF base") -> Path:
    from cogumi_tasks.serve.release import build_release

    parts = root / f"parts-{rid}"
    (parts / "router").mkdir(parents=True)
    (parts / "router" / "manifest.json").write_text(json.dumps({"models": ["base"], "threshold": 0.5}))
    (parts / "escalation").mkdir()
    (parts / "escalation" / "vocab.json").write_text("{}")
    (parts / "base.gguf").write_bytes(base)
    out = root / rid
    build_release(out, base=parts / "base.gguf", modifiers={}, router=parts / "router",
                  escalation=parts / "escalation", calibrator=calibrator, threshold=threshold, release_id=rid)
    return out


def test_calibration_releases_share_model_files_and_move_the_pointer_once(tmp_path, s3_server):
    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig
    from cogumi_tasks.serve.release import ReleaseError, load_release, publish_release
    from cogumi_tasks.serve.watch import ReleaseWatcher

    store = ArtifactStore(StorageConfig(bucket="recal-unit"), s3_server.credentials())
    store.ensure_bucket()
    registry = store.uri("t", "releases")
    r0 = dummy_release(tmp_path, {"method": "temperature", "t": 1.0}, 0.8, "r-zero")
    r1 = dummy_release(tmp_path, {"method": "platt", "a": 2.0, "b": -1.0}, 0.7, "r-one")
    other = dummy_release(tmp_path, {"method": "platt", "a": 2.0, "b": -1.0}, 0.7, "r-other", base=b"other base")
    assert load_release(r0).model_files == load_release(r1).model_files != load_release(other).model_files

    assert publish_release(store, r0, registry)["id"] == "r-zero"
    with pytest.raises(ReleaseError, match="names r-zero, not r-nobody"):
        publish_release(store, r1, registry, expect_current="r-nobody")
    pointer = publish_release(store, r1, registry, expect_current="r-zero")
    assert (pointer["id"], pointer["previous"]) == ("r-one", "r-zero")
    assert publish_release(store, r1, registry, expect_current="r-zero") == pointer  # again: nothing moves
    assert store.get_json(registry + "/current.json") == pointer

    class Gateway:  # what the watcher touches of the serving gateway
        release = load_release(r0)

        def swap(self, new):
            if new.model_files != self.release.model_files:
                return False
            self.release = new
            return True

    gw = Gateway()
    watcher = ReleaseWatcher(gw, store, registry, tmp_path / "fetched", every_s=3600)
    assert watcher.check() == "r-one" and gw.release.id == "r-one"
    assert watcher.check() is None
    publish_release(store, other, registry)
    assert watcher.check() is None and gw.release.id == "r-one" and watcher.refused == {"r-other"}


def test_an_interval_without_traffic_refits_nothing_even_before_any_release_is_current(tmp_path, store_for):
    """The first scheduled run of a new deployment: no logs, no current release; both steps succeed and say so."""
    import yaml

    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.core.steps import run_step
    from tests.conftest import REPO

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["name"] = "t-recal-empty"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(str(tmp_path / "c.yaml"))
    store = store_for(cfg)
    interval = {"start": "2026-12-01T10:00:00+00:00", "end": "2026-12-01T10:30:00+00:00"}
    labels = run_step("recalibrate.label", cfg, {}, params=interval, store=store)
    assert (labels.metrics["requests"], labels.metrics["sampled"], labels.metrics["release"]) == (0, 0, None)
    refit = run_step("recalibrate.refit", cfg, {"labels": labels.outputs["labels"]}, params=interval, store=store)
    assert refit.metrics["published"] is None and refit.metrics["current"] is None
    assert refit.metrics["reason"] == "0 labelled queries, fewer than recalibrate.min_labelled 12"
