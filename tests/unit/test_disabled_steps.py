"""A disabled step checks ``enabled`` before it downloads its model: an S3 model is passed on by URI."""

from __future__ import annotations

import pytest

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import run_step

CASES = [  # step, the config key that disables it, the model output it passes on (None: no output)
    ("compress.prune", "compress.prune.enabled", "model"),
    ("compress.quantize_awq", "compress.awq.enabled", None),
    ("compress.recover", "compress.recover.enabled", None),
    ("train.vocab_trim", "train.vocab_trim.enabled", "model"),
]


@pytest.mark.parametrize(("name", "flag", "output"), CASES)
def test_disabled_step_downloads_nothing(s3_server, store_for, tmp_path, monkeypatch, name, flag, output):
    cfg = load_config("tiny", {"name": f"t-disabled-{name.replace('.', '-')}", flag: False})
    store = store_for(cfg)
    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "model" / "config.json").write_text("{}")
    (src / "model" / "model.safetensors").write_bytes(b"\0" * 1024)
    prefix = store.uri(cfg.name, "train.sft", "k1")
    store.publish(prefix, src, {"prefix": prefix, "step": "train.sft"})
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text('{"prompt": "p", "response": "r"}\n')

    def no_download(self, *args, **kwargs):
        raise AssertionError(f"{name} downloaded {args[0]} although disabled")

    monkeypatch.setattr(ArtifactStore, "fetch_prefix", no_download)
    monkeypatch.setattr(ArtifactStore, "fetch", no_download)
    model = prefix + "/model/"
    res = run_step(name, cfg, {"model": model, "dataset": str(dataset)}, store=store)
    assert res.metrics["enabled"] is False
    assert (res.outputs.get(output) if output else None) == (model if output else None)
    if not output:
        assert "model" not in res.outputs
