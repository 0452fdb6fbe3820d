"""Directory inputs: only the files the producer's manifest lists are downloaded, each sha256-checked."""

from __future__ import annotations

import pytest

from cogumi_tasks.core.artifacts import ArtifactError, join_uri
from cogumi_tasks.core.config import load_config


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_fetch_prefix_downloads_only_listed_files_and_verifies_them(s3_server, store_for, tmp_path):
    cfg = load_config("tiny", {"name": "t-fetch-prefix"})
    store = store_for(cfg)
    src = tmp_path / "src"
    (src / "model" / "sub").mkdir(parents=True)
    (src / "model" / "a.bin").write_bytes(b"a" * 100)
    (src / "model" / "sub" / "b.txt").write_text("b")
    (src / "other.txt").write_text("o")
    prefix = store.uri(cfg.name, "fake.step", "k1")
    store.publish(prefix, src, {"prefix": prefix, "step": "fake.step"})
    store.put_bytes(join_uri(prefix, "model", "stray.bin"), b"left by an earlier attempt, not in the manifest")

    root = store.fetch_prefix(prefix + "/model/", tmp_path / "dl")
    assert files_under(root) == ["a.bin", "sub/b.txt"] and (root / "a.bin").read_bytes() == b"a" * 100

    store.put_bytes(join_uri(prefix, "model", "a.bin"), b"b" * 100)  # same size, other content
    with pytest.raises(ArtifactError, match="a.bin: sha256 differs from its manifest"):
        store.fetch_prefix(prefix + "/model", tmp_path / "dl2")


def test_fetch_prefix_without_manifest_takes_every_file(s3_server, store_for, tmp_path):
    cfg = load_config("tiny", {"name": "t-fetch-prefix-hand"})
    store = store_for(cfg)
    prefix = store.uri(cfg.name, "uploads", "model")
    for name in ("config.json", "w/x.bin", "_work/state.json"):
        store.put_bytes(join_uri(prefix, name), name.encode())
    assert files_under(store.fetch_prefix(prefix, tmp_path / "dl")) == ["config.json", "w/x.bin"]
    with pytest.raises(ArtifactError, match="nothing under"):
        store.fetch_prefix(store.uri(cfg.name, "uploads", "none"), tmp_path / "dl")
