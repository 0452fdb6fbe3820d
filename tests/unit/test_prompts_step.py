"""The prompts step: validation with file/line/field, quarantine, error-rate stop, teacher split."""

from __future__ import annotations

import json

import pytest

from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.records import ErrorRateExceeded
from cogumi_tasks.core.steps import run_step
from cogumi_tasks.data.steps import split_by_weight


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [{"id": f"p{i}", "prompt": f"Question number {i}?", "domain": "general"} for i in range(40)]


def test_split_by_weight_is_exact_and_order_free():
    ids = [f"x{i}" for i in range(100)]
    split = split_by_weight(ids, {"a": 0.40, "b": 0.35, "c": 0.25})
    counts = {t: list(split.values()).count(t) for t in "abc"}
    assert counts == {"a": 40, "b": 35, "c": 25}
    assert split_by_weight(list(reversed(ids)), {"a": 0.40, "b": 0.35, "c": 0.25}) == split


def test_bad_lines_are_quarantined_with_line_and_field(s3_server, store_for, tmp_path):
    src = _write(tmp_path / "prompts.jsonl", GOOD + [
        '{"id": "bad1", "prompt": "no domain"}',
        "{not json",
    ])
    cfg = load_config("tiny", {"name": "t-prompts-q", "dataset.prompts.source": str(src),
                               "dataset.prompts.max_error_rate": 0.1, "dataset.prompts.limit": 100000})
    store = store_for(cfg)
    res = run_step("data.prompts", cfg, store=store)
    assert res.metrics["source_prompts"] == 40 and res.metrics["prompts_quarantined"] == 2
    q = [json.loads(x) for x in store.get_bytes(res.outputs["quarantine"]).decode().splitlines()]
    assert {(r["line"], r["field"]) for r in q} == {(41, "domain"), (42, "<line>")}
    assert all(r["source"] == str(src) for r in q)
    shards = [store.get_bytes(u).decode().splitlines() for u in res.outputs["shards"]]
    assert sum(len(s) for s in shards) == 40 + res.metrics["world_prompts"] == res.metrics["prompts"]
    assert len(shards) == cfg.dataset.prompts.shards


def test_error_rate_stops_with_file_line_field_and_publishes_nothing(s3_server, store_for, tmp_path):
    src = _write(tmp_path / "prompts.jsonl", GOOD[:10] + [
        {"id": "b1", "prompt": "x", "domain": "cooking"},
        {"id": "p1", "prompt": "dup id", "domain": "code"},
    ])
    cfg = load_config("tiny", {"name": "t-prompts-rate", "dataset.prompts.source": str(src)})
    store = store_for(cfg)
    with pytest.raises(ErrorRateExceeded) as err:
        run_step("data.prompts", cfg, store=store)
    msg = str(err.value)
    assert "2 of 12 records bad" in msg and f"{src}:11: field 'domain'" in msg
    uris = list(store.list(store.uri(cfg.name) + "/"))
    assert not any(u.endswith("_manifest.json") for u in uris)
    q = [u for u in uris if u.endswith("_failed/quarantine.jsonl")]
    assert len(q) == 1 and len(store.get_bytes(q[0]).decode().splitlines()) == 2


def test_builtin_prompt_set_is_valid(s3_server, store_for):
    cfg = load_config("tiny", {"name": "t-prompts-builtin", "dataset.prompts.limit": 100000})
    res = run_step("data.prompts", cfg, store=store_for(cfg))
    assert res.metrics["prompts_quarantined"] == 0
    assert res.metrics["prompts"] >= 300
    assert set(res.metrics["per_domain"]) == {"code", "reasoning", "automation", "general"}


def test_malformed_prompt_file_bom_bad_utf8_oversized_line_and_duplicate(s3_server, store_for, tmp_path):
    src = tmp_path / "prompts.jsonl"
    good = [json.dumps(r).encode() for r in GOOD]
    huge = json.dumps({"id": "huge", "prompt": "x" * (10 * 1024 * 1024), "domain": "general"}).encode()
    latin1 = '{"id": "caf\u00e9", "prompt": "q", "domain": "code"}'.encode("latin-1")
    again = json.dumps({"id": "p3", "prompt": "again", "domain": "code"}).encode()
    lines = [b"\xef\xbb\xbf" + good[0], *good[1:], latin1, huge, again]
    src.write_bytes(b"\n".join(lines) + b"\n")
    cfg = load_config("tiny", {"name": "t-prompts-malformed", "dataset.prompts.source": str(src),
                               "dataset.prompts.max_error_rate": 0.1, "dataset.prompts.limit": 100000,
                               "dataset.prompts.world.families": {}})  # only the file's prompts in the shards
    store = store_for(cfg)
    res = run_step("data.prompts", cfg, store=store)
    assert res.metrics["source_prompts"] == 40 and res.metrics["prompts_quarantined"] == 3  # the BOM line is p0
    rows = [json.loads(x) for x in store.get_bytes(res.outputs["quarantine"]).decode().splitlines()]
    q = {r["line"]: r for r in rows}
    assert sorted(q) == [41, 42, 43] and all(r["source"] == str(src) for r in q.values())
    bad_start = sum(len(x) + 1 for x in lines[:40])
    assert q[41]["field"] == "<line>" and q[41]["offset"] == bad_start
    bad_byte = bad_start + latin1.index(0xE9)
    assert q[41]["reason"] == f"invalid UTF-8: at byte offset {bad_byte} of the file"
    assert q[42]["field"] == "<line>" and q[42]["reason"] == (
        f"record too large: {len(huge)} bytes, above the limit of {cfg.dataset.prompts.max_record_bytes} bytes")
    assert q[43]["field"] == "id" and q[43]["reason"] == "duplicate id: 'p3' first at line 4"
    shards = b"".join(store.get_bytes(u) for u in res.outputs["shards"])
    assert len(shards) < 100_000 and b"huge" not in shards and "\ufffd" not in shards.decode()


def test_cli_turns_error_rate_into_one_line_and_exit_code(s3_server, store_for, tmp_path):
    import subprocess
    import sys

    src = _write(tmp_path / "prompts.jsonl", GOOD[:10] + [
        {"id": "b1", "prompt": "x", "domain": "cooking"},
        {"id": "p1", "prompt": "dup id", "domain": "code"},
    ])
    store_for(load_config("tiny", {"name": "t-prompts-cli"}))  # the bucket
    proc = subprocess.run([sys.executable, "-m", "cogumi_tasks.cli", "run-step", "data.prompts", "--config", "tiny",
                           "--set", "name=t-prompts-cli", "--input", f"source={src}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cogumi:")]
    assert errors == [errors[0]] and errors[0].startswith("cogumi: data.prompts failed: prompts from ")
    assert "2 of 12 records bad" in errors[0] and f"{src}:11: field 'domain'" in errors[0]
    assert f"{src}:12: field 'id': duplicate id: 'p1' first at line 2" in errors[0]


WORLD = {"dataset.prompts.world.families": {"list_fn": 30, "word_arith": 20, "tool_call": 10},
         "dataset.prompts.world.seed": 3, "teachers.0.weight": 0.25, "teachers.1.weight": 0.75}


def _prompt_rows(store, res) -> list[dict]:
    return [json.loads(x) for x in store.get_bytes(res.outputs["prompts"]).decode().splitlines()]


def test_world_prompts_come_on_top_with_their_task_and_eligible_teachers(s3_server, store_for, tmp_path):
    from cogumi_tasks.world import Instance, assert_disjoint, generate

    src = _write(tmp_path / "prompts.jsonl", GOOD)
    over = {"dataset.prompts.source": str(src), "dataset.prompts.limit": 25, **WORLD}
    cfg = load_config("tiny", {"name": "t-prompts-world", **over})
    store = store_for(cfg)
    res = run_step("data.prompts", cfg, store=store)
    m = res.metrics
    assert (m["source_prompts"], m["world_prompts"], m["prompts"]) == (25, 60, 85)  # limit: source prompts only
    assert m["per_family"] == {"list_fn": 30, "word_arith": 20, "tool_call": 10}
    assert m["per_domain"] == {"general": 25, "code": 30, "reasoning": 20, "automation": 10}
    rows = _prompt_rows(store, res)
    general, family = [r for r in rows if "task" not in r], [r for r in rows if "task" in r]
    assert len(general) == 25 and all(r["teacher"] == "teacher-a" for r in general)  # strong tier: families only
    insts = [Instance.from_dict(r["task"]) for r in family]
    assert [(r["id"], r["prompt"], r["domain"]) for r in family] == [(i.id, i.prompt, i.domain) for i in insts]
    assert insts == [i for name, n in WORLD["dataset.prompts.world.families"].items()
                     for i in generate(name, n, 3, part="train")]
    # the family prompts split by weight among the two teachers that may answer them, exactly and per family
    assert sum(r["teacher"] == "teacher-a" for r in family) == 15
    assert sum(v for k, v in m["per_family_teacher"].items() if k.endswith("/teacher-b")) == 45
    for name, n in WORLD["dataset.prompts.world.families"].items():
        assert_disjoint(insts, generate(name, 2 * n, 3, part="heldout"))
        assert_disjoint(insts, generate(name, 2 * n, 4, part="heldout"))  # whatever seed a suite uses

    again = run_step("data.prompts", load_config("tiny", {"name": "t-prompts-world-2", **over}), store=store)
    assert _prompt_rows(store, again) == rows


def test_teachers_are_assigned_among_those_eligible():
    from cogumi_tasks.core.config import ConfigError, TeacherConfig
    from cogumi_tasks.data.steps import assign_teachers

    def teacher(name, weight, families=None):
        return TeacherConfig(name=name, base_url="http://x/v1", model="m", price="p", weight=weight,
                             families=families)

    rows = [{"id": f"g{i}"} for i in range(10)]
    rows += [{"id": f"c{i}", "task": {"family": "list_fn"}} for i in range(20)]
    rows += [{"id": f"r{i}", "task": {"family": "word_arith"}} for i in range(8)]
    teachers = [teacher("cheap", 1.0), teacher("code", 3.0, ["list_fn"]), teacher("off", 0.0, ["word_arith"])]
    got = assign_teachers(rows, teachers)
    assert {got[f"g{i}"] for i in range(10)} == {"cheap"}
    assert sorted(got[f"c{i}"] for i in range(20)) == ["cheap"] * 5 + ["code"] * 15
    assert {got[f"r{i}"] for i in range(8)} == {"cheap"}  # a zero weight answers nothing
    assert assign_teachers(list(reversed(rows)), teachers) == got
    with pytest.raises(ConfigError, match=r"no teacher .* answers prompt 'g0', a general prompt"):
        assign_teachers(rows, [teacher("code", 1.0, ["list_fn"]), teacher("r", 1.0, ["word_arith"])])
    with pytest.raises(ConfigError, match=r"answers prompt 'r0', of family 'word_arith'"):
        assign_teachers(rows[10:], [teacher("code", 1.0, ["list_fn"]), teacher("none", 1.0, [])])
