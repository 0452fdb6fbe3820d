"""The verifier judge (cogumi_tasks.world.judge): a task's checker scores 10 or 1 with its reason, ``auto`` sends
rows without a task to the LLM judge, ``verifier`` refuses a row without one, and the stats count both kinds."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from cogumi_tasks.core.config import ConfigError, load_config
from cogumi_tasks.core.records import Quarantine
from cogumi_tasks.core.steps import StepFailed
from cogumi_tasks.world import generate
from cogumi_tasks.world.judge import judge_rows, threshold

needs_sandbox = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                   reason="bubblewrap not installed (code answers run in it)")


def _ctx(kind: str) -> SimpleNamespace:
    return SimpleNamespace(config=load_config("tiny", {"judge.kind": kind}))


def _row(inst, response: str) -> dict:
    return {"id": inst.id, "prompt": inst.prompt, "domain": inst.domain, "response": response,
            "task": inst.to_dict()}


@pytest.fixture
def fake_llm_judge(monkeypatch):
    """The LLM judge replaced by a recorder that scores 5 and quarantines rows whose answer is 'garbage'."""
    seen: list[dict] = []

    def judge_answers(ctx, rows, source=None):
        seen.extend(rows)
        q = Quarantine()
        for r in rows:
            if r["response"] == "garbage":
                q.add(source or "answers", None, "judge_verdict", "unparseable verdict after retries: x", r)
        judged = [{**r, "judge_score": 5, "judge_reason": "llm says so"} for r in rows if r["response"] != "garbage"]
        return judged, q, {"judge": {"calls": len(rows)}}

    monkeypatch.setattr("cogumi_tasks.llm.step_calls.judge_answers", judge_answers)
    return seen


@needs_sandbox
def test_correct_answers_score_10_and_wrong_ones_1_with_the_checkers_reason(fake_llm_judge):
    code, arith, tool = (generate(name, 1, seed=5, part="train")[0] for name in ("list_fn", "word_arith", "tool_call"))
    want = int(arith.reference.rsplit("Answer:", 1)[1])
    rows = [_row(code, code.reference), _row(arith, arith.reference), _row(tool, tool.reference),
            _row(code, "```python\ndef nothing(xs):\n    return 0\n```"),
            _row(arith, arith.reference.rsplit("Answer:", 1)[0] + f"Answer: {want + 1}"),
            _row(tool, '{"name": "no_such_tool", "arguments": {}}')]
    judged, quarantine, stats = judge_rows(_ctx("verifier"), rows)
    assert not fake_llm_judge and len(quarantine) == 0
    assert [r["judge_score"] for r in judged] == [10, 10, 10, 1, 1, 1]
    assert {r["judge_kind"] for r in judged} == {"verifier"}
    assert judged[0]["judge_reason"] == "passed every hidden test"
    assert judged[3]["judge_reason"].startswith("NameError: no function ")
    assert judged[4]["judge_reason"] == f"answered {want + 1}, expected {want}"
    assert judged[5]["judge_reason"].startswith("called 'no_such_tool', expected ")
    assert [r["response"] for r in judged] == [r["response"] for r in rows]  # input order, rows kept whole
    assert stats["judge_kinds"] == {"verifier": 6} and stats["faults"] == {}
    assert stats["per_domain"] == {"automation": {"verifier": 2}, "code": {"verifier": 2}, "reasoning": {"verifier": 2}}


def test_auto_verifies_rows_with_a_task_and_asks_the_llm_about_the_rest(fake_llm_judge):
    arith = generate("word_arith", 2, seed=1, part="train")
    rows = [{"id": "g1", "prompt": "Say hi.", "domain": "general", "response": "hi"},
            _row(arith[0], arith[0].reference),
            {"id": "g2", "prompt": "Name a colour.", "domain": "general", "response": "garbage"},
            {"id": "g3", "prompt": "Add 2 and 2.", "domain": "reasoning", "response": "4"},
            _row(arith[1], "I think 3.")]
    judged, quarantine, stats = judge_rows(_ctx("auto"), rows)
    assert [r["id"] for r in fake_llm_judge] == ["g1", "g2", "g3"]
    assert [(r["id"], r["judge_kind"], r["judge_score"]) for r in judged] == [
        ("g1", "llm", 5), (arith[0].id, "verifier", 10), ("g3", "llm", 5), (arith[1].id, "verifier", 1)]
    assert judged[3]["judge_reason"] == "no final line 'Answer: <integer>'"
    assert [q["raw"]["id"] for q in quarantine.rows] == ["g2"] and "_judge_index" not in quarantine.rows[0]["raw"]
    assert not any("_judge_index" in r for r in judged)
    assert stats["judge_kinds"] == {"llm": 2, "verifier": 2} and stats["faults"] == {"judge": {"calls": 3}}
    assert stats["per_domain"] == {"general": {"llm": 1}, "reasoning": {"verifier": 2, "llm": 1}}


def test_llm_kind_sends_every_row_to_the_llm(fake_llm_judge):
    inst = generate("word_arith", 1, seed=2, part="train")[0]
    judged, _, stats = judge_rows(_ctx("llm"), [_row(inst, inst.reference)])
    assert [r["judge_kind"] for r in judged] == ["llm"] and stats["judge_kinds"] == {"llm": 1}


def test_verifier_on_a_row_without_a_task_is_a_config_error_naming_it(fake_llm_judge):
    inst = generate("word_arith", 1, seed=2, part="train")[0]
    rows = [_row(inst, inst.reference), {"id": "g7", "prompt": "Hi?", "domain": "general", "response": "Hello."}]
    with pytest.raises(ConfigError, match=r"judge.kind is verifier but row 'g7' carries no task \(1 of 2 rows"):
        judge_rows(_ctx("verifier"), rows)
    assert not fake_llm_judge


def test_a_malformed_task_fails_the_step_naming_the_row():
    inst = generate("tool_call", 1, seed=2, part="train")[0]
    broken = {**_row(inst, inst.reference), "task": {**inst.to_dict(), "family": "chess"}}
    with pytest.raises(StepFailed, match=rf"row '{inst.id}': its task has family 'chess', not one of list_fn"):
        judge_rows(_ctx("auto"), [broken])
    partial = {**_row(inst, inst.reference), "task": {"id": "x"}}
    with pytest.raises(StepFailed, match=r"its task is not an instance: instance x: missing field"):
        judge_rows(_ctx("auto"), [partial])


def test_threshold_is_llm_threshold_for_llm_verdicts_only():
    cfg = load_config("tiny").dataset.score  # threshold 7, llm_threshold 1
    assert threshold({"judge_kind": "verifier"}, cfg) == 7 and threshold({"judge_kind": "llm"}, cfg) == 1
    plain = load_config("production").dataset.score
    assert threshold({"judge_kind": "llm"}, plain) == threshold({"judge_kind": "verifier"}, plain) == 7
