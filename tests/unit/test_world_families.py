"""The tiny world's task families: references pass, near-miss answers fail with a reason, generation is
deterministic, held-out and training sets never share a task or a normalised prompt."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from cogumi_tasks import world
from cogumi_tasks.world import (
    FAMILIES,
    Instance,
    assert_disjoint,
    check,
    check_many,
    generate,
    instance_from_prompt,
    keys_of,
    normalise_text,
    split,
)
from cogumi_tasks.world.base import task_key
from cogumi_tasks.world.code import ALL_PARAMS, entry_point, evaluate, near_misses
from cogumi_tasks.world.reasoning import final_answer
from cogumi_tasks.world.sandbox import Limits

needs_sandbox = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                   reason="bubblewrap not installed (apt-get install bubblewrap)")
N = 1000


@pytest.fixture(scope="module")
def instances() -> dict[str, list[Instance]]:
    return {name: generate(name, N, seed=11) for name in FAMILIES}


def _code_answer(params: dict, name: str) -> str:
    """The reference of task ``params`` with its function renamed to ``name`` (a near miss, well formed)."""
    ref = FAMILIES["list_fn"].solve(params)
    return ref.replace(f"def {entry_point(params)}(", f"def {name}(")


# ---------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("name", ["word_arith", "tool_call"])
def test_reference_passes_its_checker(instances, name):
    verdicts = [check(inst, inst.reference) for inst in instances[name]]
    assert len(instances[name]) == N
    assert [r for ok, r in verdicts if not ok] == []


@needs_sandbox
def test_code_references_pass_their_hidden_tests_in_the_sandbox(instances):
    code = instances["list_fn"]
    verdicts = check_many(code, [i.reference for i in code], code_batch=100)  # our own code: batching is fair
    assert len(code) == N and [r for ok, r in verdicts if not ok] == []
    assert {r for _, r in verdicts} == {"passed every hidden test"}


# ---------------------------------------------------------------------------------------------- wrong answers


@needs_sandbox
def test_code_near_misses_fail_with_the_failing_test():
    """Another filter, map or reduce: whenever it differs from the task on some list, a hidden test catches it."""
    rng = random.Random(5)
    lists = [[rng.randint(-12, 12) for _ in range(rng.randint(0, 8))] for _ in range(400)]
    code = generate("list_fn", 150, seed=3)
    wrong: list[tuple[Instance, str]] = []
    for inst in code:
        candidates = near_misses(inst.params)
        rng.shuffle(candidates)
        other = next(p for p in candidates if any(evaluate(p, xs) != evaluate(inst.params, xs) for xs in lists))
        wrong.append((inst, _code_answer(other, inst.payload["entry_point"])))
    verdicts = check_many([i for i, _ in wrong], [a for _, a in wrong], code_batch=25)
    assert [i.id for (i, _), (ok, _) in zip(wrong, verdicts, strict=True) if ok] == []
    assert all(r.startswith("hidden test ") and "expected" in r for _, r in verdicts)


@needs_sandbox
def test_code_bad_answers_blame_only_themselves_in_a_batch():
    code = generate("list_fn", 4, seed=4)
    name = code[1].payload["entry_point"]
    answers = [code[0].reference, f"def {name}(xs):\n    while True:\n        pass\n",
               "import os\nos._exit(0)\n", "no code here at all"]
    verdicts = check_many(code, answers, Limits(cpu_s=2, wall_s=3.0), code_batch=4)
    assert verdicts[0] == (True, "passed every hidden test")
    assert verdicts[1][0] is False and ("timeout" in verdicts[1][1] or "cpu_limit" in verdicts[1][1])
    assert verdicts[2][0] is False and "did not finish" in verdicts[2][1]
    assert verdicts[3][0] is False and "SyntaxError" in verdicts[3][1]


def test_reasoning_wrong_or_missing_answer_line_fails(instances):
    for inst in instances["word_arith"][:200]:
        want = inst.payload["expected"]
        steps = inst.reference.rsplit("\n", 1)[0]
        assert check(inst, f"{steps}\nAnswer: {want + 1}") == (False, f"answered {want + 1}, expected {want}")
        assert check(inst, steps) == (False, "no final line 'Answer: <integer>'")
        assert check(inst, f"Answer: {want + 1}\nAnswer: {want}")[0]  # the last answer line counts
    assert final_answer("so 3 + 4 = 7\n**Answer: 7**") == 7


def test_tool_call_wrong_tool_or_argument_fails(instances):
    for inst in instances["tool_call"][:200]:
        want = inst.payload["expected"]
        other = next(t["name"] for t in inst.payload["tools"] if t["name"] != want["name"])
        ok, reason = check(inst, json.dumps({"name": other, "arguments": want["arguments"]}))
        assert not ok and reason == f"called {other!r}, expected {want['name']!r}"
        key = next(iter(want["arguments"]))
        bad = {**want["arguments"], key: 999 if isinstance(want["arguments"][key], int) else "Atlantis"}
        ok, reason = check(inst, json.dumps({"name": want["name"], "arguments": bad}))
        assert not ok and reason.startswith("arguments ") and "differ" in reason
        wire = json.dumps({"name": want["name"], "arguments": json.dumps(want["arguments"])})
        ok, _ = check(inst, f"```json\n{wire}\n```")
        assert ok  # the wire format (arguments as a JSON string) in a fence is the same call
    assert check(instances["tool_call"][0], "I would call the tool.") == (False, "no JSON object in the answer")


# ---------------------------------------------------------------------------------------------- generation


def _digest(insts: list[Instance]) -> str:
    return hashlib.sha256(json.dumps([i.to_dict() for i in insts], sort_keys=True).encode()).hexdigest()


def test_generation_is_deterministic_per_seed_and_across_processes(instances):
    for name in FAMILIES:
        assert _digest(generate(name, 300, seed=11)) == _digest(instances[name][:300])  # a prefix: same draws
        assert _digest(generate(name, 50, seed=12)) != _digest(instances[name][:50])
    code = "from cogumi_tasks.world import generate, FAMILIES;import hashlib, json;print(hashlib.sha256(json.dumps(" \
           "[i.to_dict() for n in FAMILIES for i in generate(n, 300, seed=11)], sort_keys=True).encode()).hexdigest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert other == _digest([i for n in FAMILIES for i in instances[n][:300]])


def test_instances_are_distinct_json_and_recoverable_from_their_prompt(instances):
    for insts in instances.values():
        assert len({normalise_text(i.prompt) for i in insts}) == len(insts)
        assert len({i.id for i in insts}) == len(insts)
        for inst in insts[:300]:
            assert Instance.from_dict(json.loads(json.dumps(inst.to_dict()))) == inst
            assert instance_from_prompt(inst.prompt) == inst
            assert instance_from_prompt(inst.prompt.replace("x", "q", 1) + " Thanks!") is None
    assert len(ALL_PARAMS) > N  # the code family has more distinct tasks than the test draws


def test_split_and_exclude_keep_held_out_tasks_out_of_training(instances):
    for name, insts in instances.items():
        train, held = split(insts, 200, seed=1)
        assert len(held) == 200 and len(train) == N - 200
        assert not {normalise_text(i.prompt) for i in train} & {normalise_text(i.prompt) for i in held}
        assert_disjoint(train, held)
        fresh = generate(name, 300, seed=99, exclude=keys_of(held))
        assert_disjoint(fresh, held)
    # a paraphrase of a held-out task (same parameters, other wording) counts as an overlap
    held = generate("word_arith", 1, seed=1)
    fam = FAMILIES["word_arith"]
    rewording = next(p for s in range(50) if (p := fam.render(held[0].params, random.Random(s))) != held[0].prompt)
    with pytest.raises(ValueError, match="overlap the held-out set"):
        assert_disjoint([fam.make(held[0].params, rewording)], held)
    # so does the same tool request listed with other distractor tools
    call = generate("tool_call", 1, seed=1)[0]
    tools = FAMILIES["tool_call"]
    others = [t for t in ("add_todo", "set_alarm", "call_contact", "get_weather") if t != call.params["tool"]][:2]
    moved = {**call.params, "tools": [call.params["tool"], *others]}
    with pytest.raises(ValueError, match="overlap the held-out set"):
        assert_disjoint([tools.make(moved, tools.render(moved, random.Random(0)))], [call])
    dup = [held[0], fam.make(held[0].params, rewording), *generate("word_arith", 20, seed=2)]
    train, kept = split(dup, 1, seed=0)
    assert_disjoint(train, kept)


@pytest.mark.parametrize("name", sorted(world.FAMILIES))
def test_train_and_heldout_parts_never_share_a_task(name):
    held = world.generate(name, 60, seed=7, part="heldout")
    train = world.generate(name, 200, seed=3, part="train")
    assert {world.part_of(task_key(name, i.params)) for i in held} == {"heldout"}
    assert {world.part_of(task_key(name, i.params)) for i in train} == {"train"}
    world.assert_disjoint(train, held)
