"""modifiers.cascade.teacher_messages: the few-shot prompt a cascade tier's teacher gets."""

from __future__ import annotations

from cogumi_tasks import world
from cogumi_tasks.core.config import ModifierConfig
from cogumi_tasks.modifiers.cascade import teacher_messages
from cogumi_tasks.world.base import part_of, task_key

MOD = ModifierConfig(name="reasoning", domain="reasoning",
                     tasks={"kind": "world", "family": "word_arith", "n": 12, "seed": 3},
                     heldout={"kind": "world", "family": "word_arith", "n": 4, "seed": 0},
                     tiers=[{"teacher": "teacher-a", "shots": 3}])


def _rows(insts: list[world.Instance]) -> list[dict]:
    return [{"id": i.id, "prompt": i.prompt, "messages": [{"role": "user", "content": i.prompt}], "task": i.to_dict()}
            for i in insts]


def test_no_shots_keeps_every_rows_messages():
    rows = _rows(world.generate("word_arith", 3, 3, part="train"))
    assert teacher_messages(rows, MOD, 1, 0) == {r["id"]: r["messages"] for r in rows}


def test_shots_are_worked_train_part_examples_outside_the_modifiers_tasks():
    tasks = world.generate("word_arith", MOD.tasks.n, MOD.tasks.seed, part="train")
    rows = _rows(tasks[5:9])
    got = teacher_messages(rows, MOD, MOD.tasks.seed, 3)  # the tasks' own seed: only the exclusion keeps them out
    prefixes = {tuple(m["content"] for m in msgs[:-1]) for msgs in got.values()}
    assert len(prefixes) == 1  # one set of examples per family and tier
    for r in rows:
        msgs = got[r["id"]]
        assert len(msgs) == 7 and msgs[-1] == r["messages"][-1]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    shots = [world.instance_from_prompt(m["content"], "word_arith") for m in got[rows[0]["id"]][:-1:2]]
    answers = [m["content"] for m in got[rows[0]["id"]][1:-1:2]]
    assert all(s is not None for s in shots)
    assert [ok for ok, _ in world.check_many(shots, answers)] == [True] * 3  # each example's answer is right
    assert not world.keys_of(shots) & world.keys_of(tasks)  # none of the modifier's tasks, in any wording
    assert all(part_of(task_key(s.family, s.params)) == "train" for s in shots)  # never a held-out task
    assert teacher_messages(rows, MOD, 1, 3)[rows[0]["id"]][:-1] != got[rows[0]["id"]][:-1]  # tier K: seed K


def test_rows_without_a_family_keep_their_messages():
    inst = world.generate("word_arith", 1, 3, part="train")[0]
    general = {"id": "g1", "prompt": "Write a haiku.", "messages": [{"role": "user", "content": "Write a haiku."}]}
    got = teacher_messages([general, *_rows([inst])], MOD, 1, 2)
    assert got["g1"] == general["messages"] and len(got[inst.id]) == 5
