"""Config loading: unknown keys rejected with their dotted path, overrides, env expansion."""

from __future__ import annotations

import pytest

from cogumi_tasks.core.config import ConfigError, load_config, parse_set_flags


def test_tiny_and_production_load():
    tiny = load_config("tiny")
    prod = load_config("production")
    assert tiny.name == "tiny" and prod.name == "production"
    assert [t.weight for t in prod.teachers if t.weight] == [0.40, 0.35, 0.25]  # the others: Phase 3 tiers only
    assert [m.rank for m in prod.modifiers] == [128, 112, 96]  # the plan's ranks
    assert {t.teacher for m in prod.modifiers for t in m.tiers} <= {t.name for t in prod.teachers}
    assert prod.judge.api_key_env == "OPENAI_API_KEY"


def test_unknown_key_names_file_and_dotted_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (load_config.__globals__["resolve_config_path"]("tiny")).read_text()
    bad.write_text(text.replace("    shingle_size: 5", "    shingle_size: 5\n    shingle_sise: 4"))
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value)
    assert "dataset.dedup.shingle_sise: unknown key" in str(err.value)


def test_mistyped_value_is_reported():
    with pytest.raises(ConfigError, match=r"dataset.prompts.limit: .*integer"):
        load_config("tiny", {"dataset.prompts.limit": "many"})


def test_overrides_set_single_values_and_skip_empty():
    cfg = load_config("tiny", parse_set_flags(["dataset.prompts.limit=7", "llm.budget_usd=0.5"]))
    assert cfg.dataset.prompts.limit == 7 and cfg.llm.budget_usd == 0.5
    assert load_config("tiny", {"dataset.prompts.limit": None}).dataset.prompts.limit == 20
    assert load_config("tiny", {"teachers.1.weight": "0.9"}).teachers[1].weight == 0.9


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("COGUMI_LLM_URL", "http://127.0.0.1:9/v1")
    assert load_config("tiny").judge.base_url == "http://127.0.0.1:9/v1"


def test_unknown_config_name_lists_known():
    with pytest.raises(ConfigError, match="known: .*tiny"):
        load_config("nope")


def test_pools_and_placement_name_registered_steps_once(tmp_path):
    from cogumi_tasks.core.steps import all_steps

    for name in ("tiny", "production"):
        compute = load_config(name).compute
        named = [s for p in compute.pools.values() for s in p.steps] + list(compute.steps)
        assert set(named) <= set(all_steps()), f"{name}: unknown steps {set(named) - set(all_steps())}"
    tiny = load_config("tiny").compute
    assert tiny.pool("compress.quantize_awq") == "cogumi_cpu" and tiny.pools["cogumi_cpu"].slots == 1
    assert tiny.pool("data.generate") is None  # LLM calls wait on the server, not on this box's cores
    bad = tmp_path / "bad.yaml"
    text = (load_config.__globals__["resolve_config_path"]("tiny")).read_text()
    bad.write_text(text.replace("  pools:\n", "  pools:\n    other: {slots: 2, steps: [eval.run]}\n"))
    with pytest.raises(ConfigError, match=r"compute: .*'eval.run' is in two pools"):
        load_config(str(bad))


def test_world_prompts_teacher_families_and_judge_kind():
    tiny, prod = load_config("tiny"), load_config("production")
    assert tiny.judge.kind == prod.judge.kind == "auto" and prod.dataset.prompts.world is None
    assert (tiny.dataset.score.threshold, tiny.dataset.score.llm_threshold) == (7, 1)
    assert prod.dataset.score.llm_threshold is None and all(t.families is None for t in prod.teachers)
    strong = tiny.teacher("teacher-b")
    assert strong.families == ["list_fn", "word_arith", "tool_call"] and strong.price == "strong-tier-local"
    assert load_config("tiny", {"judge.kind": None}).judge.kind == "auto"  # an empty override changes nothing


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dataset.prompts.world.families": {"list_fn": 3, "sorting": 2}},
     r"dataset.prompts.world.families.sorting.\[key\]: Input should be 'list_fn', 'word_arith' or 'tool_call'"),
    ({"teachers.1.families": ["list_fn", "chess"]},
     r"teachers.1.families.1: Input should be 'list_fn', 'word_arith' or 'tool_call'"),
    ({"teachers.0.families": ["list_fn"], "teachers.1.families": ["list_fn"]},
     r"no teacher with a positive weight answers family 'tool_call'"),
    ({"dataset.prompts.world.families": {"list_fn": -1}}, r"counts must be >= 0"),
    ({"judge.kind": "oracle"}, r"judge.kind: Input should be 'llm', 'verifier' or 'auto'"),
], ids=["unknown-family", "unknown-teacher-family", "family-without-teacher", "negative-count", "judge-kind"])
def test_world_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_modifier_tier_names_an_unknown_teacher(tmp_path):
    import yaml

    data = yaml.safe_load(load_config.__globals__["resolve_config_path"]("tiny").read_text())
    data["modifiers"][0]["tiers"][1]["teacher"] = "nobody"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"modifiers\.code\.tiers\.2: no teacher named 'nobody'"):
        load_config(str(path))
    data["modifiers"][0]["tiers"][1]["teacher"] = "teacher-a"
    data["modifiers"][0]["sparsity"] = [1.2]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="sparsity 1.2: must be between 0 and 1"):
        load_config(str(path))
