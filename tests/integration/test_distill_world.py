"""train.distill through the strong tier on loopback: failure clusters of tiny-world tasks are sent as "write N new
tasks like these" to the teacher of their family, tasks of the held-out part are dropped and counted, the answers are
judged by the tasks' checkers through the judge interface, and a cluster of other failures keeps the LLM path."""

from __future__ import annotations

import json

import pytest

from cogumi_tasks import world
from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import run_step
from cogumi_tasks.world.base import task_key

pytestmark = pytest.mark.stack

PER_PATTERN = 4


@pytest.fixture(scope="module")
def distilled(s3_server, llm_server, strong_server, hf_dir, tmp_path_factory):
    import yaml

    from cogumi_tasks.core.config import apply_overrides, resolve_config_path

    tmp = tmp_path_factory.mktemp("distill-world")
    overrides = {"name": "distill-world", "train.distill.examples_per_pattern": PER_PATTERN,
                 "train.distill.task_max_tokens": 48, "train.distill.answer_max_tokens": 48,
                 "train.distill.epochs": 0.25, "dataset.score.max_tokens": 48, "judge.kind": "auto"}
    data = apply_overrides(yaml.safe_load(resolve_config_path("tiny").read_text()), overrides, "test")
    data["teachers"][-1]["families"] = sorted(world.FAMILIES)  # the strong tier answers only family prompts
    path = tmp / "distill-world.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(str(path))
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    held = {name: world.generate(name, 2, seed=11, part="heldout") for name in sorted(world.FAMILIES)}
    clusters = [{"id": k, "size": 2, "label": f"{name} failures",
                 "examples": [{"id": i.id, "prompt": i.prompt, "domain": i.domain} for i in insts]}
                for k, (name, insts) in enumerate(held.items())]
    clusters.append({"id": 3, "size": 1, "label": "general", "examples": [
        {"id": "g1", "prompt": "Explain in two sentences why the sky looks blue.", "domain": "general"}]})
    files = {"clusters": tmp / "clusters.json", "dataset": tmp / "dataset.jsonl"}
    files["clusters"].write_text(json.dumps({"clusters": clusters}))
    train = world.generate("word_arith", 4, seed=11, part="train")
    files["dataset"].write_text("".join(json.dumps({"prompt": i.prompt, "response": i.reference}) + "\n"
                                        for i in train))
    uris = {}
    for name, f in files.items():
        uris[name] = store.uri("distill-world", "inputs", f.name)
        store.upload(f, uris[name])
    # the session's converted SmolLM2: what train.base_model makes of tiny.yaml's GGUF
    result = run_step("train.distill", config, {"model": str(hf_dir), **uris}, store=store)
    return {"result": result, "store": store, "teacher": config.teachers[-1].name,
            "general_teacher": config.teachers[0].name}


def _jsonl(store: ArtifactStore, uri: str) -> list[dict]:
    return [json.loads(x) for x in store.get_bytes(uri).decode().splitlines() if x.strip()]


def test_world_clusters_go_to_the_strong_tier_and_held_out_tasks_are_dropped(distilled):
    m = distilled["result"].metrics
    rows = {(r["cluster"], r["path"]): r for r in m["by_cluster"]}
    assert set(rows) == {(0, "list_fn"), (1, "tool_call"), (2, "word_arith"), (3, "general")}
    assert m["teachers"] == {"general": distilled["general_teacher"], **dict.fromkeys(world.FAMILIES,
                                                                                       distilled["teacher"])}
    for fam in world.FAMILIES:
        r = next(r for (c, p), r in rows.items() if p == fam)
        assert r["asked"] == r["received"] == PER_PATTERN and r["unparsed"] == 0
        assert r["dropped_heldout"] + r["judged"] == r["received"]
        assert r["verified"] == r["judged"]  # the strong tier's answers pass their checkers
        assert r["kept"] <= r["verified"]
    assert m["dropped_heldout"] == sum(r["dropped_heldout"] for r in rows.values())
    assert m["requested"] == sum(r["asked"] for r in rows.values()) == 4 * PER_PATTERN
    assert m["kept"] + m["rejected"] == m["judged"] == sum(r["judged"] for r in rows.values())


def test_kept_world_examples_are_verified_train_part_tasks(distilled):
    store, outputs = distilled["store"], distilled["result"].outputs
    kept = _jsonl(store, outputs["examples"])
    world_kept = [r for r in kept if r.get("task")]
    assert world_kept, "no world example kept"
    for r in world_kept:
        inst = world.Instance.from_dict(r["task"])
        assert world.part_of(task_key(inst.family, inst.params)) == "train"
        assert r["judge_kind"] == "verifier" and r["judge_score"] == 10 and r["judge_reason"]
        assert world.instance_from_prompt(r["prompt"], inst.family).id == inst.id
    mix = _jsonl(store, outputs["mix"])
    assert {r["prompt"] for r in world_kept} <= {r["prompt"] for r in mix if r["source"] == "new"}
    general = [r for r in kept + _jsonl(store, outputs["rejected"]) if r["cluster"] == 3]
    assert all(r.get("task") is None and r["judge_kind"] == "llm" for r in general)
