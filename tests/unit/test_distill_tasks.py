"""Distillation's task writing: world failures split by family, the teacher per family, a tasks reply read back to
instances with held-out tasks dropped and counted."""

from __future__ import annotations

import json

import pytest

from cogumi_tasks import world
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import StepFailed
from cogumi_tasks.train.distill_tasks import distill_teacher, split_examples, world_request, world_rows
from cogumi_tasks.world.strong_tier import parse_tasks_reply


def _teachers(families_b):
    cfg = load_config("tiny")
    data = cfg.model_dump()
    data["teachers"][1]["families"] = families_b
    return cfg.model_validate(data)


def test_the_teacher_of_a_family_and_of_general_prompts():
    cfg = _teachers(["list_fn", "word_arith", "tool_call"])
    distill = cfg.train.distill
    assert distill_teacher(cfg, distill, "list_fn").name == cfg.teachers[-1].name  # the strong tier
    assert distill_teacher(cfg, distill, None).name == cfg.teachers[0].name  # it never answers general prompts
    named = distill.model_copy(update={"teacher": cfg.teachers[-1].name})
    assert distill_teacher(cfg, named, None).name == cfg.teachers[0].name  # the named one does not answer them
    alone = cfg.model_copy(update={"teachers": cfg.teachers[1:]})
    with pytest.raises(StepFailed, match="no teacher answers general prompts"):
        distill_teacher(alone, distill, None)


def test_cluster_examples_split_by_family():
    code = world.generate("list_fn", 2, seed=1, part="heldout")
    maths = world.generate("word_arith", 1, seed=1, part="heldout")
    cluster = {"id": 0, "examples": [{"prompt": code[0].prompt}, {"prompt": "Write a haiku about rain."},
                                     {"prompt": maths[0].prompt}, {"prompt": code[1].prompt}]}
    fams, other = split_examples(cluster)
    assert fams == {"list_fn": [code[0].prompt, code[1].prompt], "word_arith": [maths[0].prompt]}
    assert other == [{"prompt": "Write a haiku about rain."}]


@pytest.mark.parametrize("family", sorted(world.FAMILIES))
def test_a_tasks_reply_keeps_train_tasks_and_drops_held_out_ones(family):
    train = world.generate(family, 3, seed=7, part="train")
    held = world.generate(family, 2, seed=7, part="heldout")
    other = next(f for f in world.FAMILIES if f != family)
    foreign = world.generate(other, 1, seed=7)[0]
    tasks = [{"prompt": i.prompt, "answer": i.reference} for i in (*train, *held, foreign)]
    rows, counts = world_rows(json.dumps({"tasks": tasks}), family, {"id": "c0-x", "cluster": 0})
    assert counts == {"received": 6, "dropped_heldout": 2, "unparsed": 1}
    assert [r["task"]["id"] for r in rows] == [i.id for i in train]
    assert [r["response"] for r in rows] == [i.reference for i in train]
    assert all(r["cluster"] == 0 and r["domain"] == world.family(family).domain for r in rows)
    assert len({r["id"] for r in rows}) == 3
    with pytest.raises(ValueError):
        world_rows('{"tasks": []}', family, {"id": "c0"})


def test_the_world_request_is_the_strong_tiers_format():
    examples = world.generate("tool_call", 2, seed=3, part="heldout")
    req = world_request("tool_call", [e.prompt for e in examples], 5, seed=1)
    text = req.messages[-1]["content"]
    assert text.startswith("Write 5 new tasks like these (family: tool_call).")
    assert all(f"<task>\n{e.prompt}\n</task>" in text for e in examples)
    assert req.max_tokens >= 5 * 210 and req.temperature == 0.0
    with pytest.raises(ValueError):
        parse_tasks_reply("not json")
