"""A release uploaded to the Hugging Face Hub through ``huggingface_hub`` (create_repo, preupload, Git LFS batch and
upload, the commit's NDJSON), against tests/servers/hub.py, a stand-in for the Hub API on 127.0.0.1: every file
arrives byte-identical to its sha256 in release.json, README.md is the model card with YAML front matter, the
commit names the release; a wrong token fails naming the repo and HTTP 401; the same release again makes no
commit; serve.promote uploads only with serve.hub.repo_id set, and without HF_TOKEN fails before moving current."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import shutil

import pytest
import yaml

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import StepFailed, run_step
from cogumi_tasks.serve.deploy import model_card
from cogumi_tasks.serve.hub import HubError, hub_token, push_release
from cogumi_tasks.serve.release import build_release, load_release
from tests.servers.hub import HubServer

TOKEN = "hf_test_" + secrets.token_hex(12)
REPO = "cogumi/tiny-release"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)  # conftest turns Hub access off; this Hub is on loopback
    monkeypatch.setattr(hf, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks Git LFS, not Xet
    with HubServer(tmp_path / "hub", {TOKEN: "cogumi"}) as server:
        yield server


def make_release(root, rid: str):
    """A small release of dummy parts (a 1 MB binary base GGUF, one modifier), its card written as serve.release
    writes it."""
    parts = root / f"parts-{rid}"
    (parts / "router").mkdir(parents=True)
    (parts / "router" / "manifest.json").write_text(json.dumps({"models": ["base", "code"], "threshold": 0.8,
                                                                "costs": {"base": 1.0, "code": 1.2}}))
    (parts / "router" / "router.safetensors").write_bytes(b"\0router weights")
    (parts / "escalation").mkdir()
    (parts / "escalation" / "vocab.json").write_text('{"<pad>": 0}')
    (parts / "escalation" / "student.safetensors").write_bytes(b"\0lstm weights")
    (parts / "base.gguf").write_bytes(b"GGUF" + random.Random(0).randbytes(1 << 20))
    (parts / "code.gguf").write_bytes(b"GGUF lora code")
    out = root / rid
    out.mkdir()
    (out / "MODEL_CARD.md").write_text(model_card(rid, {"release size": ("1.0 MB", "668 MB (for Llama-3.1-8B)")}))
    build_release(out, base=parts / "base.gguf", modifiers={"code": parts / "code.gguf"}, router=parts / "router",
                  escalation=parts / "escalation", calibrator={"method": "temperature", "t": 1.5}, release_id=rid)
    return out


def test_push_uploads_every_file_and_the_card(hub, tmp_path):
    rel = make_release(tmp_path, "r-hub1")
    manifest = json.loads((rel / "release.json").read_text())
    out = push_release(rel, REPO, token=TOKEN, endpoint=hub.url)

    stored = hub.files(REPO)
    assert set(stored) == {*manifest["files"], "release.json", "README.md"}
    for path, sha in manifest["files"].items():
        assert hashlib.sha256(stored[path].read_bytes()).hexdigest() == sha, path
    assert stored["release.json"].read_bytes() == (rel / "release.json").read_bytes()
    assert stored["README.md"].read_bytes() == (rel / "MODEL_CARD.md").read_bytes()
    text = stored["README.md"].read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert {"license", "base_model", "tags"} <= set(meta) and "cogumi" in meta["tags"]

    [commit] = hub.commits
    assert commit["message"] == "Cogumi release r-hub1" and "r-hub1" in commit["description"]
    assert sorted(commit["files"]) == sorted(stored)
    # the GGUFs and weights went through Git LFS (uploaded by PUT, sha256-checked), the JSON and card inline
    assert {"base.gguf", "modifiers/code.gguf", "router/router.safetensors"} <= set(commit["lfs"])
    assert "README.md" not in commit["lfs"] and len(hub.lfs_puts) == len(commit["lfs"])
    assert hub.repos[REPO]["private"] is True
    assert out == {"repo_id": REPO, "commit": commit["oid"], "files": sorted(stored), "url": f"{hub.url}/{REPO}",
                   "commit_url": f"{hub.url}/{REPO}/commit/{commit['oid']}"}

    # what the repo holds, less the README copy, is the release itself: it verifies
    copy = tmp_path / "downloaded"
    for path, src in stored.items():
        if path != "README.md":
            (copy / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, copy / path)
    assert load_release(copy).id == "r-hub1"


def test_same_release_again_is_harmless_and_a_new_one_reuses_stored_objects(hub, tmp_path):
    rel = make_release(tmp_path, "r-hub2")
    first = push_release(rel, REPO, token=TOKEN, endpoint=hub.url)
    puts = len(hub.lfs_puts)
    again = push_release(rel, REPO, token=TOKEN, endpoint=hub.url)
    assert again["commit"] == first["commit"] and len(hub.commits) == 1 and len(hub.lfs_puts) == puts

    newer = make_release(tmp_path, "r-hub3")  # same parts, another id: only the manifest and the card change
    out = push_release(newer, REPO, token=TOKEN, endpoint=hub.url)
    assert out["commit"] != first["commit"] and hub.commits[-1]["message"] == "Cogumi release r-hub3"
    assert sorted(hub.commits[-1]["files"]) == ["MODEL_CARD.md", "README.md", "release.json"]
    assert len(hub.lfs_puts) == puts


def test_wrong_token_fails_naming_the_repo_and_status(hub, tmp_path):
    rel = make_release(tmp_path, "r-hub4")
    wrong = "hf_wrong_" + secrets.token_hex(12)
    with pytest.raises(HubError) as err:
        push_release(rel, REPO, token=wrong, endpoint=hub.url)
    msg = str(err.value)
    assert REPO in msg and "HTTP 401" in msg and "HF_TOKEN" in msg and wrong not in msg
    assert hub.commits == [] and hub.repos == {}


def test_token_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="HF_TOKEN is empty"):
        hub_token()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub_token() == TOKEN


def _config(tmp_path, hub_section: dict):
    from tests.conftest import REPO

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["name"] = "hub-" + secrets.token_hex(4)
    data.setdefault("serve", {})["hub"] = hub_section
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(str(path))


def test_promote_uploads_when_configured_and_needs_hf_token(hub, tmp_path, s3_server, monkeypatch):
    rel = make_release(tmp_path, "r-hub5")
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"release": "r-hub5", "passed": True, "gates": []}))
    inputs = {"release": str(rel), "validation": str(validation)}
    config = _config(tmp_path, {"repo_id": REPO, "endpoint": hub.url})
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    current = store.uri(config.name, "releases", "current.json")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StepFailed, match="not promoted: .*HF_TOKEN is empty"):
        run_step("serve.promote", config, inputs, store=store)
    assert not store.exists(current) and hub.repos == {}  # checked before anything moved

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = run_step("serve.promote", config, inputs, store=store)
    assert store.get_json(current)["id"] == "r-hub5"
    [commit] = hub.commits
    assert commit["message"] == "Cogumi release r-hub5"
    assert result.metrics["hub"]["commit"] == commit["oid"] and result.metrics["hub"]["repo_id"] == REPO

    plain = _config(tmp_path, {})  # no repo_id: promoted, nothing uploaded
    result = run_step("serve.promote", plain, inputs, store=store)
    assert "hub" not in result.metrics and len(hub.commits) == 1
