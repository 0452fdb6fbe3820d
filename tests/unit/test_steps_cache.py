"""The step contract on a real S3 server: manifest last, verification, cache hits, lineage."""

from __future__ import annotations

import json

import pytest

from cogumi_tasks.core.artifacts import ArtifactError, join_uri, lineage
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import StepFailed, StepOutput, run_step, step
from cogumi_tasks.core.view import UndeclaredConfigKey

CALLS: list[str] = []


@step("test.write", version=1, reads=("dataset.dedup",), outputs=("a", "parts"))
def _write(ctx):
    CALLS.append("write")
    ctx.out("a.txt").write_text(f"threshold={ctx.config.dataset.dedup.threshold}\n")
    ctx.out("parts/p0.txt").write_text("zero")
    return StepOutput(files={"a": "a.txt", "parts": ["parts/p0.txt"]}, metrics={"n": 1})


@step("test.read", version=1, inputs=("a",), outputs=("b",))
def _read(ctx):
    CALLS.append("read")
    text = ctx.fetch(ctx.input("a")).read_text()
    ctx.out("b.txt").write_text(text.upper())
    return StepOutput(files={"b": "b.txt"}, metrics={"chars": len(text)})


@step("test.boom", version=1)
def _boom(ctx):
    ctx.out("quarantine.jsonl").write_text('{"bad": 1}\n')
    raise RuntimeError("boom")


@step("test.undeclared", version=1, reads=("dataset.dedup",), outputs=("a",))
def _undeclared(ctx):
    ctx.out("a.txt").write_text(f"{ctx.config.dataset.dedup.threshold} {ctx.config.judge.model}")
    return StepOutput(files={"a": "a.txt"})


@step("test.extra_output", version=1, outputs=("a",))
def _extra_output(ctx):
    ctx.out("a.txt").write_text("a")
    return StepOutput(files={"a": "a.txt", "b": "a.txt"})


@pytest.fixture
def cfg(s3_server, request):
    return load_config("tiny", {"name": f"t-{request.node.name[:40]}".replace("_", "-")})


def test_publish_then_cache_hit(cfg, store_for):
    store = store_for(cfg)
    CALLS.clear()
    first = run_step("test.write", cfg, store=store, run_id="r1")
    assert not first.skipped and CALLS == ["write"]
    manifest = store.get_json(first.manifest_uri)
    assert manifest["files"]["a.txt"]["size"] == len("threshold=0.8\n")
    assert manifest["config"] == {"dataset.dedup": cfg.section("dataset.dedup")}  # exactly what the step may read
    assert manifest["config_files"] == {} and len(manifest["code"]) == 64
    assert manifest["outputs"]["parts"] == [join_uri(manifest["prefix"], "parts/p0.txt")]
    again = run_step("test.write", cfg, store=store, run_id="r2")
    assert again.skipped and again.outputs == first.outputs and CALLS == ["write"]

    # a config value the step reads changes the key; one it does not read does not
    changed = load_config("tiny", {"name": cfg.name, "dataset.dedup.threshold": 0.7})
    assert not run_step("test.write", changed, store=store).skipped
    unrelated = load_config("tiny", {"name": cfg.name, "dataset.score.threshold": 3})
    assert run_step("test.write", unrelated, store=store).skipped


def test_downstream_cache_follows_input_content(cfg, store_for):
    store = store_for(cfg)
    a = run_step("test.write", cfg, store=store)
    b = run_step("test.read", cfg, {"a": a.outputs["a"]}, store=store)
    assert store.get_bytes(b.outputs["b"]) == b"THRESHOLD=0.8\n"
    assert run_step("test.read", cfg, {"a": a.outputs["a"]}, store=store).skipped
    ancestors = lineage(store, store.get_json(b.manifest_uri))
    assert [m["step"] for m in ancestors] == ["test.write"]


def test_missing_file_invalidates_cache_and_corruption_is_caught(cfg, store_for):
    store = store_for(cfg)
    a = run_step("test.write", cfg, store=store)
    store.put_bytes(a.outputs["a"], b"tampered!!!!!!")  # same size, other content
    with pytest.raises(ArtifactError, match="sha256"):
        run_step("test.read", cfg, {"a": a.outputs["a"]}, store=store)
    store.client.delete_object(Bucket=cfg.storage.bucket, Key=a.outputs["a"].split("/", 3)[3])
    assert not run_step("test.write", cfg, store=store).skipped


def test_failed_step_publishes_no_manifest_but_keeps_its_quarantine(cfg, store_for):
    store = store_for(cfg)
    with pytest.raises(RuntimeError, match="boom"):
        run_step("test.boom", cfg, store=store)
    uris = list(store.list(store.uri(cfg.name, "test.boom") + "/"))
    assert not any(u.endswith("_manifest.json") for u in uris)
    err = [u for u in uris if u.endswith("_failed/error.json")]
    assert len(err) == 1 and json.loads(store.get_bytes(err[0]))["error"] == "boom"
    assert any(u.endswith("_failed/quarantine.jsonl") for u in uris)


def test_undeclared_config_key_and_output_fail_the_step_and_publish_nothing(cfg, store_for):
    store = store_for(cfg)
    with pytest.raises(UndeclaredConfigKey, match=r"step test\.undeclared read config key 'judge'.*declare it in"):
        run_step("test.undeclared", cfg, store=store)
    with pytest.raises(StepFailed, match=r"test\.extra_output: returned outputs \['a', 'b'\].*undeclared \['b'\]"):
        run_step("test.extra_output", cfg, store=store)
    for name in ("test.undeclared", "test.extra_output"):
        uris = list(store.list(store.uri(cfg.name, name) + "/"))
        assert uris and not any(u.endswith("_manifest.json") for u in uris)
