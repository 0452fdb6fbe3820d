"""Phase 3's LoRA steps on loopback S3 and llama.cpp: modifiers.train on a handful of strong-tier answers (the
adapter's GGUF loads on the packaged SmolLM2 and changes its answers), several GGUF LoRAs applied together,
modifiers.compress (reduced ranks measured, the choice by the gate rule) and modifiers.evaluate's table.

Small settings (rank 4, a few training steps, 3-4 held-out items, 48 answer tokens) keep it to a few minutes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import apply_overrides, load_config, resolve_config_path
from cogumi_tasks.core.steps import StepFailed, run_step

pytestmark = pytest.mark.stack

MODIFIER = {"name": "reasoning", "domain": "reasoning",
            "tasks": {"kind": "world", "family": "word_arith", "n": 12, "seed": 3},
            "heldout": {"kind": "world", "family": "word_arith", "n": 4, "seed": 0},
            "tiers": [{"teacher": "teacher-b"}], "rank": 4, "alpha": 8, "lr": 2e-3, "epochs": 1,
            "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"], "replay_fraction": 0.25,
            "sparsity": [0.5, 0.75], "gate_pct": 100}
PROMPTS = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "What is 3 + 4?"}]]


def _config(tmp: Path, name: str):
    data = apply_overrides(yaml.safe_load(resolve_config_path("tiny").read_text()),
                           {"name": name, "eval.max_tokens": 48, "train.sft.max_seq_len": 160,
                            "train.sft.checkpoint_every": 100}, "test")
    data["modifiers"] = [MODIFIER]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(str(path))


def _rows(store: ArtifactStore, uri: str) -> list[dict]:
    return [json.loads(x) for x in store.get_bytes(uri).decode().splitlines() if x.strip()]


def _answers(adapters: list[tuple[Path, float]], prompts=PROMPTS) -> list[str]:
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.models.packaged import smollm2_gguf

    backend = GGUFBackend(smollm2_gguf(), adapters)
    try:
        return [g.text for g in backend.generate(prompts, 24)]
    finally:
        backend.close()


def _noise_lora(like: Path, out: Path, seed: int = 7, std: float = 0.05) -> Path:
    """A GGUF LoRA with the tensor names and shapes of ``like`` and seeded random factors."""
    import gguf

    reader = gguf.GGUFReader(str(like))
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(reader.tensors[0].data.shape[0]))
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        writer.add_tensor(t.name, rng.normal(0, std, size=t.data.shape).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def trained(s3_server, llm_server, hf_dir, tmp_path_factory):
    from cogumi_tasks import world

    tmp = tmp_path_factory.mktemp("modlora")
    config = _config(tmp, f"modlora-{uuid.uuid4().hex[:8]}")
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    insts = world.generate("word_arith", 12, 3, part="train")
    solved = tmp / "solved.jsonl"
    solved.write_text("".join(json.dumps({"id": i.id, "prompt": i.prompt, "response": i.reference, "tier": 3,
                                          "teacher": "teacher-b", "sample": 0}) + "\n" for i in insts))
    dataset = tmp / "dataset.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"Say the word {w}.", "response": w.capitalize() + "."}) + "\n"
                               for w in ("apple", "river", "stone", "cloud", "tiger", "lamp")))
    result = run_step("modifiers.train", config, {"model": str(hf_dir), "solved": [str(solved)],
                                                  "dataset": str(dataset)}, params={"modifier": "reasoning"},
                      store=store)
    gguf_path = store.fetch(result.outputs["lora_gguf"], tmp / "fetched")
    return {"config": config, "store": store, "result": result, "gguf": gguf_path, "tmp": tmp,
            "dataset": dataset, "hf_dir": hf_dir}


def test_train_mixes_solved_rows_with_the_replay_share(trained):
    m = trained["result"].metrics
    assert (m["solved_rows"], m["solved_by_tier"], m["replay_rows"], m["rows"]) == (12, {"3": 12}, 4, 16)
    assert m["rank"] == 4 and m["training"]["steps"] >= 1 and m["gguf_bytes"] > 0 and m["safetensors_bytes"] > 0
    mix = _rows(trained["store"], trained["result"].outputs["mix"])
    assert sum(r["source"] == "replay" for r in mix) == 4


def test_trained_adapter_loads_on_the_packaged_gguf_and_changes_answers(trained):
    from cogumi_tasks.core.config import SuiteConfig
    from cogumi_tasks.eval.suites import world_items

    prompts = [i.messages for i in world_items(SuiteConfig(kind="world", family="word_arith", n=3, seed=0))]
    assert _answers([(trained["gguf"], 1.0)], prompts) != _answers([], prompts)


def test_two_adapters_together_differ_from_each_alone_and_repeat(trained):
    """Two LoRAs together answer otherwise than either alone; switching sets leaves nothing behind; a fresh
    context gives the same answers, and two one-thread contexts side by side each answer their share as one context
    would."""
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.models.packaged import smollm2_gguf

    noise = _noise_lora(trained["gguf"], trained["tmp"] / "noise.gguf")
    backend = GGUFBackend(smollm2_gguf())
    try:
        def ask(adapters):
            backend.set_adapters(adapters)
            return [g.text for g in backend.generate(PROMPTS, 24)]

        base, one, two = ask([]), ask([(trained["gguf"], 1.0)]), ask([(noise, 1.0)])
        both = ask([(trained["gguf"], 1.0), (noise, 1.0)])
        assert both != one and both != two and one != base and two != base
        assert ask([(trained["gguf"], 1.0)]) == one and ask([]) == base  # switching leaves no state behind
        assert ask([(trained["gguf"], 1.0), (noise, 1.0)]) == both
    finally:
        backend.close()
    assert _answers([(trained["gguf"], 1.0), (noise, 1.0)]) == both  # a fresh context gives the same answers
    side = GGUFBackend(smollm2_gguf(), [(trained["gguf"], 1.0), (noise, 1.0)], parallel=2, n_threads=2)
    try:  # two one-thread contexts side by side: context k answers conversations k, k + 2, ... as one context would
        assert len(side.workers) == 2
        convs = PROMPTS * 3  # each context gets one prompt three times: its prefix cache comes into play
        got = [g.text for g in side.generate(convs, 24)]
        side.set_adapters([])
        got_base = [g.text for g in side.generate(PROMPTS, 24)]
    finally:
        side.close()
    for k in range(2):
        for adapters, asked, answered in (([(trained["gguf"], 1.0), (noise, 1.0)], convs, got),
                                          ([], PROMPTS, got_base)):
            alone = GGUFBackend(smollm2_gguf(), adapters, parallel=1, n_threads=1)
            try:
                assert [g.text for g in alone.generate(asked[k::2], 24)] == answered[k::2]
            finally:
                alone.close()


def test_train_fails_clearly_without_solved_rows(trained):
    empty = trained["tmp"] / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(StepFailed, match="solved no task"):
        run_step("modifiers.train", trained["config"], {"model": str(trained["hf_dir"]), "solved": [str(empty)],
                                                        "dataset": str(trained["dataset"])},
                 params={"modifier": "reasoning"}, store=trained["store"])


@pytest.fixture(scope="module")
def compressed(trained):
    from cogumi_tasks.models.packaged import smollm2_gguf

    out = trained["result"].outputs
    return run_step("modifiers.compress", trained["config"],
                    {"adapter": out["adapter"], "adapter_gguf": out["lora_gguf"], "gguf": str(smollm2_gguf())},
                    params={"modifier": "reasoning"}, store=trained["store"])


def test_compress_measures_each_rank_and_chooses_by_the_gate_rule(trained, compressed):
    from cogumi_tasks.modifiers.lora_steps import choose

    table = json.loads(trained["store"].get_bytes(compressed.outputs["variants"]))
    v = table["variants"]
    assert [(x["sparsity"], x["rank"], x["params_kept_share"]) for x in v] == [(0.0, 4, 1.0), (0.5, 2, 0.5),
                                                                             (0.75, 1, 0.25)]
    assert v[0]["gguf_bytes"] > v[1]["gguf_bytes"] > v[2]["gguf_bytes"]
    assert v[0]["safetensors_bytes"] > v[1]["safetensors_bytes"] > v[2]["safetensors_bytes"]
    assert all(x["n"] == 4 and x["reference"] == v[0]["reference"] for x in v)
    items = _rows(trained["store"], compressed.outputs["items"])
    base = [r["score"] for r in sorted((r for r in items if r["rank"] == 0), key=lambda r: r["id"])]
    assert table["base"]["n"] == 4 and table["base"]["accuracy"]["accuracy"] == sum(base) / 4
    for x in v:  # each variant is paired with the base (no modifier) on the same items
        ours = [r["score"] for r in sorted((r for r in items if r["rank"] == x["rank"]), key=lambda r: r["id"])]
        assert x["vs_base"]["points"] == pytest.approx(100 * (sum(ours) - sum(base)) / 4)
        assert set(x["gate"]["parts"]) == {"pct_of_reference", "over_base"}
    chosen, passed = choose(v)
    assert table["chosen"] == {"sparsity": chosen["sparsity"], "rank": chosen["rank"]}
    assert table["passed_gate"] == passed and compressed.outputs["lora_gguf"].endswith(f"rank{chosen['rank']}.gguf")
    assert sorted({r["rank"] for r in items}) == [0, 1, 2, 4] and len(items) == 16


def test_a_reduced_variant_loads_and_changes_answers(trained, compressed):
    prefix = compressed.outputs["variants"].rsplit("/", 1)[0]
    small = trained["store"].fetch(prefix + "/variants/rank2.gguf", trained["tmp"] / "rank2")
    assert _answers([(small, 1.0)]) != _answers([])


def test_evaluate_tables_every_model_on_every_domain(trained, compressed):
    from cogumi_tasks.models.packaged import smollm2_gguf

    recovery = _noise_lora(trained["gguf"], trained["tmp"] / "recovery.gguf", seed=3, std=0.01)
    result = run_step("modifiers.evaluate", trained["config"],
                      {"gguf": str(smollm2_gguf()), "lora": str(recovery),
                       "modifiers": [compressed.outputs["lora_gguf"]], "known": [compressed.outputs["items"]]},
                      store=trained["store"])
    summary = json.loads(trained["store"].get_bytes(result.outputs["summary"]))
    assert summary["answers"] == {"generated": 12, "reused": 0}  # compress ran without this recovery LoRA
    assert summary["models"] == ["base", "reasoning", "reasoning/alone"] and summary["domains"] == ["reasoning"]
    row = summary["table"]["reasoning"]["reasoning"]
    assert row["n"] == 4 and set(row) >= {"accuracy", "reference", "pct_of_reference", "vs_base"}
    assert "vs_base" not in summary["table"]["base"]["reasoning"]
    assert "vs_with_recovery" in summary["table"]["reasoning/alone"]["reasoning"]
    assert summary["verdicts"]["reasoning"]["raises_domain"]["verdict"] in ("met", "inconclusive", "not met")
    items = _rows(trained["store"], result.outputs["items"])
    assert len(items) == 12 and {r["model"] for r in items} == set(summary["models"])

    config = trained["config"]  # alone: false -> base and modifier only, 8 answers
    config = config.model_copy(update={"modifiers": [config.modifiers[0].model_copy(update={"alone": False})]})
    result = run_step("modifiers.evaluate", config,
                      {"gguf": str(smollm2_gguf()), "lora": str(recovery),
                       "modifiers": [compressed.outputs["lora_gguf"]], "known": [compressed.outputs["items"]]},
                      store=trained["store"])
    summary = json.loads(trained["store"].get_bytes(result.outputs["summary"]))
    assert summary["models"] == ["base", "reasoning"] and summary["answers"] == {"generated": 8, "reused": 0}


def test_evaluate_reuses_what_compress_answered_with_the_same_models(trained, compressed):
    from cogumi_tasks.models.packaged import smollm2_gguf

    inputs = {"gguf": str(smollm2_gguf()), "modifiers": [compressed.outputs["lora_gguf"]]}  # as compress ran
    fresh = run_step("modifiers.evaluate", trained["config"], inputs, store=trained["store"])
    reused = run_step("modifiers.evaluate", trained["config"], {**inputs, "known": [compressed.outputs["items"]]},
                      store=trained["store"])
    store = trained["store"]
    counts = [json.loads(store.get_bytes(r.outputs["summary"]))["answers"] for r in (fresh, reused)]
    assert counts == [{"generated": 8, "reused": 0}, {"generated": 0, "reused": 8}]  # base and modifier, 4 items
    a, b = (_rows(store, r.outputs["items"]) for r in (fresh, reused))
    assert [(r["model"], r["id"], r["answer"], r["score"]) for r in a] == [
        (r["model"], r["id"], r["answer"], r["score"]) for r in b]
    assert all(r["reused"] for r in b) and not any(r.get("reused") for r in a)
