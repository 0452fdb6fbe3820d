"""The cascade's task source: a world suite gives train-part instances carrying their task (the verifier judges
them); any other suite gives the evaluation harness's items without one (the LLM judge decides)."""

from __future__ import annotations

from types import SimpleNamespace

from cogumi_tasks import world
from cogumi_tasks.core.config import ModifierConfig
from cogumi_tasks.eval.suites import load_suite
from cogumi_tasks.modifiers.cascade import task_rows
from cogumi_tasks.world.base import part_of, task_key


def _modifier(tasks: dict) -> ModifierConfig:
    return ModifierConfig(name="m", domain="code", tasks=tasks, heldout={"kind": "world", "family": "list_fn", "n": 2},
                          tiers=[{"teacher": "teacher-a"}])


def _no_fetch(uri: str):
    raise AssertionError(f"fetched {uri}")


def test_a_world_suite_gives_train_part_instances_with_their_task():
    rows = task_rows(SimpleNamespace(fetch=_no_fetch), _modifier({"kind": "world", "family": "list_fn", "n": 12,
                                                                   "seed": 3}))
    assert [r["id"] for r in rows] == [i.id for i in world.generate("list_fn", 12, 3, part="train")]
    assert all(part_of(task_key(r["task"]["family"], r["task"]["params"])) == "train" for r in rows)
    assert all(r["messages"] == [{"role": "user", "content": r["prompt"]}] and r["domain"] == "code" for r in rows)
    held = {i.id for i in world.generate("list_fn", 40, 3, part="heldout")}
    assert not held & {r["id"] for r in rows}


def test_another_suite_gives_the_harness_items_without_a_task():
    suite = {"kind": "mbpp", "source": "builtin:tiny_mbpp", "limit": 3}
    rows = task_rows(SimpleNamespace(fetch=_no_fetch), _modifier(suite))
    items = load_suite(_modifier(suite).tasks, _no_fetch)[:3]
    assert [r["id"] for r in rows] == [i.id for i in items] and len(rows) == 3
    assert all("task" not in r for r in rows)
    assert [r["messages"] for r in rows] == [i.messages for i in items]
    assert [r["prompt"] for r in rows] == [i.messages[-1]["content"] for i in items]
