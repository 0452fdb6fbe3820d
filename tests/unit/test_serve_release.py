"""Release bundles: build writes every file's sha256 into release.json last; load refuses an altered, missing or
unlisted file by name; the calibrator and model table read back; `current` resolves through the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cogumi_tasks.serve.release import ReleaseError, build_release, load_release


def _router(path):
    from cogumi_tasks.routing.features import Pca
    from cogumi_tasks.routing.router import Router, build_mlp

    pca = Pca(np.zeros(8, np.float32), np.eye(4, 8, dtype=np.float32), np.full(4, 0.25, np.float32))
    models = ["base", "code", "reasoning"]
    net = build_mlp(4 + 1 + 2 * 3 + 2, [8], 3, 0.0)
    Router(net, pca, models, {"base": 1.0, "code": 1.2, "reasoning": 1.3}, 5, "builtin:x", 0.8).save(path)
    return path


@pytest.fixture
def parts(tmp_path):
    (tmp_path / "base.gguf").write_bytes(b"GGUF base")
    (tmp_path / "code.gguf").write_bytes(b"GGUF code")
    (tmp_path / "reasoning.gguf").write_bytes(b"GGUF reasoning")
    esc = tmp_path / "esc"
    esc.mkdir()
    (esc / "vocab.json").write_text("{}")
    (esc / "student.safetensors").write_bytes(b"x")
    return {"base": tmp_path / "base.gguf", "router": _router(tmp_path / "router"), "escalation": esc,
            "modifiers": {"code": tmp_path / "code.gguf", "reasoning": tmp_path / "reasoning.gguf"},
            "calibrator": {"method": "temperature", "t": 1.7}}


def test_build_then_load_round_trips(tmp_path, parts):
    m = build_release(tmp_path / "rel", **parts, lineage=[{"step": "data.dedup"}], release_id="r1",
                      domains={"code": "code"})
    rel = load_release(tmp_path / "rel")
    assert rel.id == "r1" and rel.models == ["base", "code", "reasoning"] and rel.recovery is None
    assert rel.threshold == 0.8 and rel.costs == {"base": 1.0, "code": 1.2, "reasoning": 1.3}  # the router's
    assert rel.modifiers == {"code": rel.root / "modifiers/code.gguf",
                             "reasoning": rel.root / "modifiers/reasoning.gguf"}
    assert rel.modifiers["code"].read_bytes() == b"GGUF code"
    assert sorted(m["files"]) == ["base.gguf", "calibrator.json", "escalation/student.safetensors",
                                  "escalation/vocab.json", "modifiers/code.gguf", "modifiers/reasoning.gguf",
                                  "router/manifest.json", "router/router.safetensors"]
    cal = rel.calibrator()
    assert cal.method == "temperature" and cal.t == 1.7
    assert m["models"]["code"] == {"adapter": "modifiers/code.gguf", "scale": 1.0, "domain": "code"}
    with pytest.raises(ReleaseError, match="exists already"):
        build_release(tmp_path / "rel", **parts)


def test_load_names_the_altered_missing_or_unlisted_file(tmp_path, parts):
    build_release(tmp_path / "rel", **parts)
    root = tmp_path / "rel"
    (root / "modifiers/code.gguf").write_bytes(b"GGUF tampered")
    with pytest.raises(ReleaseError, match=r"modifiers/code.gguf: sha256 differs from release.json"):
        load_release(root)
    (root / "modifiers/code.gguf").write_bytes(b"GGUF code")
    (root / "extra.txt").write_text("x")
    with pytest.raises(ReleaseError, match=r"extra.txt: not listed in release.json"):
        load_release(root)
    (root / "extra.txt").unlink()
    (root / "calibrator.json").unlink()
    with pytest.raises(ReleaseError, match=r"calibrator.json: listed in release.json but missing"):
        load_release(root)
    with pytest.raises(ReleaseError, match=r"release.json: missing"):
        load_release(tmp_path)


def test_build_refuses_a_router_without_adapters_and_a_bad_calibrator(tmp_path, parts):
    with pytest.raises(ReleaseError, match=r"routes to \['reasoning'\]"):
        build_release(tmp_path / "a", **{**parts, "modifiers": {"code": parts["modifiers"]["code"]}})
    with pytest.raises(ReleaseError, match="field 'method'"):
        build_release(tmp_path / "b", **{**parts, "calibrator": {"method": "isotonic"}})


def test_current_pointer_resolves_through_the_store(tmp_path, parts):
    from cogumi_tasks.serve.release import resolve_release

    build_release(tmp_path / "rel", **parts, release_id="r7")

    class Store:  # the two ArtifactStore calls resolve_release makes
        def get_json(self, uri):
            assert uri == "s3://b/tiny/releases/current.json"
            return {"id": "r7"}

        def fetch_prefix(self, uri, dest):
            assert uri == "s3://b/tiny/releases/r7"
            return tmp_path / "rel"

    assert resolve_release("current", tmp_path / "dl", Store(), "s3://b/tiny/releases").id == "r7"
    assert resolve_release(str(tmp_path / "rel"), tmp_path / "dl").id == "r7"
    with pytest.raises(ReleaseError, match="needs an artifact store"):
        resolve_release("current", tmp_path / "dl")
    assert json.loads((tmp_path / "rel/release.json").read_text())["format"] == "cogumi-release/1"
