"""Phase 1 step plumbing: before/after comparison, task parsing, S3 checkpoints, directory digests, asset inputs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import StorageConfig
from cogumi_tasks.train.distill_tasks import parse_task
from cogumi_tasks.train.improve_steps import compare_evaluations


def _row(i: int, correct: bool, domain: str = "code") -> dict:
    return {"id": f"x{i}", "correct": correct, "score": float(correct), "domain": domain}


def test_compare_evaluations_splits_failure_and_general_sets():
    before = [_row(0, False), _row(1, False), _row(2, True, "reasoning"), _row(3, True, "reasoning")]
    after = [_row(0, True), _row(1, False), _row(2, True, "reasoning"), _row(3, False, "reasoning")]
    out = compare_evaluations(before, after)
    assert out["failure_set"] == {"n": 2, "correct_before": 0.0, "correct_after": 0.5}
    assert out["general_set"] == {"n": 2, "correct_before": 1.0, "correct_after": 0.5}
    assert out["score_before"] == 0.5 and out["score_after"] == 0.5
    assert out["by_domain"]["code"] == {"n": 2, "before": 0.0, "after": 0.5}
    assert out["by_domain"]["reasoning"] == {"n": 2, "before": 1.0, "after": 0.5}


def test_compare_evaluations_refuses_different_item_sets():
    with pytest.raises(ValueError, match="1 items missing"):
        compare_evaluations([_row(0, False), _row(1, True)], [_row(0, True)])


def test_compare_evaluations_with_nothing_passing_has_an_empty_general_set():
    out = compare_evaluations([_row(0, False)], [_row(0, False)])
    assert out["general_set"] == {"n": 0, "correct_before": None, "correct_after": None}


def test_parse_task_rejects_trivial_text():
    assert parse_task("  Write a function that adds two numbers.\n") == "Write a function that adds two numbers."
    for bad in ("", "  ", "Sure!", "ok then"):
        with pytest.raises(ValueError):
            parse_task(bad)


def test_asset_output_reads_the_newest_inlet_event():
    from airflow.sdk import Asset
    from cogumi_provider.operators import CogumiStepOperator

    def asset_output(context, op, ref):
        return CogumiStepOperator.asset_output(op, context, ref)

    phase0 = Asset(name="cogumi_phase0", uri="cogumi://pipeline/phase0")
    phase1 = Asset(name="cogumi_phase1", uri="cogumi://pipeline/phase1")
    old = SimpleNamespace(extra={"outputs": {"dataset": "s3://b/old.jsonl"}})
    new = SimpleNamespace(extra={"outputs": {"dataset": "s3://b/new.jsonl"}})
    model = SimpleNamespace(extra={"outputs": {"model": "s3://b/m/"}})
    op = SimpleNamespace(task_id="prune", inlets=[phase1, phase0])
    events = {phase0: [old, new], phase1: [model]}
    assert asset_output({"inlet_events": events}, op, "cogumi_phase0:dataset") == "s3://b/new.jsonl"
    assert asset_output({"inlet_events": events}, op, "cogumi_phase1:model") == "s3://b/m/"
    with pytest.raises(ValueError, match="no event yet"):
        asset_output({"inlet_events": {phase0: [], phase1: []}}, op, "cogumi_phase0:dataset")
    with pytest.raises(ValueError, match="has no output 'model'"):
        asset_output({"inlet_events": events}, op, "cogumi_phase0:model")
    with pytest.raises(ValueError, match="needs the form"):
        asset_output({}, op, "cogumi_phase2:model")
    # optional ("?"): None where there is no event or the newest lacks the output, else the output
    assert asset_output({"inlet_events": {phase0: [], phase1: []}}, op, "cogumi_phase0:dataset?") is None
    assert asset_output({"inlet_events": events}, op, "cogumi_phase0:model?") is None
    assert asset_output({"inlet_events": events}, op, "cogumi_phase1:model?") == "s3://b/m/"


@pytest.fixture
def store(s3_server) -> ArtifactStore:
    s = ArtifactStore(StorageConfig(bucket="phase1-unit", endpoint_url=s3_server.endpoint), s3_server.credentials())
    s.ensure_bucket()
    return s


def test_checkpoints_round_trip_through_s3_and_skip_incomplete_ones(store, tmp_path):
    from cogumi_tasks.train.checkpoints import restore_checkpoint, upload_checkpoint

    work = store.uri("p", "train.sft", "k", "_work", "checkpoints")
    for step in (2, 4, 6):
        folder = tmp_path / "local" / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / "adapter.bin").write_bytes(bytes([step]) * 100)
        (folder / "sub" / "state.pt").write_text(f"step {step}")
        upload_checkpoint(store, work, folder, step, keep=2)
    # a newer checkpoint cut off mid-upload (no marker) is never restored
    store.put_bytes(f"{work}/step-8/adapter.bin", b"partial")
    assert not any("/step-2/" in u for u in store.list(work + "/")), "older checkpoints are pruned"
    assert restore_checkpoint(store, work, tmp_path / "restored") == 6
    restored = tmp_path / "restored" / "checkpoint-6"
    assert (restored / "adapter.bin").read_bytes() == bytes([6]) * 100
    assert (restored / "sub" / "state.pt").read_text() == "step 6"
    assert not (restored / "_complete.json").exists()
    assert restore_checkpoint(store, store.uri("p", "none"), tmp_path / "none") is None


def test_the_best_checkpoint_stays_in_s3_and_is_restored(store, tmp_path):
    from cogumi_tasks.train.checkpoints import restore_checkpoint, upload_checkpoint

    work = store.uri("p", "train.sft", "best", "_work", "checkpoints")
    for step, best in ((2, 2), (4, 2), (6, 4)):  # the trainer state names the best checkpoint so far
        folder = tmp_path / "local" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_global_step": best}))
        upload_checkpoint(store, work, folder, step, keep=1)
    assert sorted({u.split("/")[-2] for u in store.list(work + "/")}) == ["step-4", "step-6"]
    assert restore_checkpoint(store, work, tmp_path / "restored") == 6
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_directory_outputs_have_content_digests(store, tmp_path):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "model" / "weights.bin").write_bytes(b"abc")
    prefix = store.uri("p", "train.base_model", "k1")
    store.publish(prefix, out, {"step": "train.base_model", "prefix": prefix, "outputs": {}, "metrics": {}})
    digest = store.digest(prefix + "/model/")
    assert digest.startswith("sha256-dir:") and digest == store.digest(prefix + "/model")
    (out / "model" / "weights.bin").write_bytes(b"abd")
    prefix2 = store.uri("p", "train.base_model", "k2")
    store.publish(prefix2, out, {"step": "train.base_model", "prefix": prefix2, "outputs": {}, "metrics": {}})
    assert store.digest(prefix2 + "/model/") != digest
    # a directory nobody published (a user's own model in S3) digests by its objects' ETags
    store.put_bytes(store.uri("user", "mine", "config.json"), b"{}")
    assert store.digest(store.uri("user", "mine") + "/").startswith("etag-dir:")
