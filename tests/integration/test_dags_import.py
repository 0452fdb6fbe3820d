"""Every DAG in dags/ imports cleanly and is configuration only."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_no_import_errors_and_expected_tasks(dagbag):
    assert dagbag.import_errors == {}
    dag = dagbag.dags["phase0_dataset"]
    assert set(dag.task_ids) == {"prompts", "generate", "score", "dedup", "publish"}
    assert dag.params["config"] == "tiny"
    publish = dag.get_task("publish")
    assert [o.name for o in publish.outlets] == ["cogumi_phase0"]


def test_dag_files_do_not_import_heavy_modules_at_parse_time():
    import subprocess
    import sys

    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        "heavy = [m for m in ('torch', 'transformers', 'openai', 'datasketch', 'sentence_transformers', "
        "'llama_cpp') if m in sys.modules]; "
        "print('HEAVY=' + ','.join(heavy))"
    )
    for dag_file in (REPO / "dags").glob("*.py"):
        out = subprocess.run([sys.executable, "-c", code, str(dag_file)], capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(REPO / "plugins")}, check=True)
        heavy = [x for x in out.stdout.splitlines() if x.startswith("HEAVY=")][0][len("HEAVY="):]
        assert heavy == "", f"{dag_file.name} imports {out.stdout.strip()} at parse time"


def test_phase1_is_scheduled_on_phase0_and_publishes_phase1(dagbag):
    dag = dagbag.dags["phase1_base"]
    assert set(dag.task_ids) == {"base_model", "eval_untrained", "vocab_trim", "sft", "eval_sft", "failure_analysis",
                                 "distill", "eval_distilled", "before_after", "publish"}
    assert dag.get_task("eval_untrained").upstream_task_ids == {"base_model"}
    assert dag.get_task("before_after").upstream_task_ids == {"eval_untrained", "eval_sft", "eval_distilled"}
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["cogumi_phase0"]
    assert [o.name for o in dag.get_task("publish").outlets] == ["cogumi_phase1"]
    sft = dag.get_task("sft")
    assert sft.step == "train.sft" and sft.asset_inputs == {"dataset": "cogumi_phase0:dataset"}
    assert [i.name for i in sft.inlets] == ["cogumi_phase0"]
    assert dag.get_task("eval_sft").overrides["eval.judge_pairwise"] is False
    upstream = {t: sorted(dag.get_task(t).upstream_task_ids) for t in ("failure_analysis", "distill", "publish")}
    assert upstream == {"failure_analysis": ["eval_sft"], "distill": ["failure_analysis", "sft"],
                        "publish": ["before_after", "distill", "eval_distilled", "eval_sft"]}


def test_cpu_heavy_tasks_take_turns_in_the_tiny_pool(dagbag):
    p2 = dagbag.dags["phase2_compression"]
    pools = {t.task_id: t.pool for t in p2.tasks}
    assert {t for t, p in pools.items() if p == "cogumi_cpu"} == {
        "prune", "quantize_awq", "export_gguf", "eval_gguf", "recover", "calibrate"}
    assert pools["pack_zstd"] == pools["publish"] == "default_pool"
    assert dagbag.dags["phase0_dataset"].get_task("generate").pool == "default_pool"


def test_phase3_has_a_task_group_per_modifier_and_a_task_per_tier(dagbag):
    from cogumi_tasks.core.config import load_config

    dag = dagbag.dags["phase3_modifiers"]
    mods = load_config("tiny").modifiers
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["cogumi_phase2"]
    assert [o.name for o in dag.get_task("publish").outlets] == ["cogumi_phase3"]
    for m in mods:
        chain = ["test", *(f"tier_{k}" for k in range(1, len(m.tiers) + 1)), "train", "compress"]
        for before, after in zip(chain, chain[1:], strict=False):
            assert f"{m.name}.{before}" in dag.get_task(f"{m.name}.{after}").upstream_task_ids
        tier2 = dag.get_task(f"{m.name}.tier_2")
        assert tier2.step == "modifiers.tier" and tier2.step_params == {"modifier": m.name, "tier": 2}
        assert dag.get_task(f"{m.name}.train").pool == "cogumi_cpu"
        assert set(dag.get_task(f"{m.name}.train").upstream_task_ids) == {
            f"{m.name}.tier_{k}" for k in range(1, len(m.tiers) + 1)}  # every tier's solved rows
    assert dag.get_task("evaluate").upstream_task_ids == {f"{m.name}.compress" for m in mods}
    assert dag.get_task("code.test").asset_inputs["lora"] == "cogumi_phase2:lora_gguf?"


def test_phase4_is_scheduled_on_phase3_and_reads_phase2_and_phase3(dagbag):
    dag = dagbag.dags["phase4_routing"]
    assert set(dag.task_ids) == {"labels", "train_router", "escalation", "publish"}
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["cogumi_phase3"]
    assert [o.name for o in dag.get_task("publish").outlets] == ["cogumi_phase4"]
    assert dag.get_task("publish").upstream_task_ids == {"labels", "train_router", "escalation"}
    labels = dag.get_task("labels")
    assert labels.asset_inputs["items"] == "cogumi_phase3:items"
    assert labels.asset_inputs["calibrator"] == "cogumi_phase2:calibrator"
    assert {t.task_id for t in dag.tasks if t.pool == "cogumi_cpu"} == {"labels", "train_router", "escalation"}


def test_phase5_validates_before_it_promotes(dagbag):
    dag = dagbag.dags["phase5_deploy"]
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["cogumi_phase4"]
    assert dag.get_task("validate").upstream_task_ids == {"release"}
    assert dag.get_task("promote").upstream_task_ids == {"release", "validate"}
    assert [o.name for o in dag.get_task("promote").outlets] == ["cogumi_phase5"]
    assert dag.get_task("release").asset_inputs == {"routing": "cogumi_phase4:bundle",
                                                    "modifiers": "cogumi_phase3:bundle"}


def test_recalibrate_runs_on_the_configs_cron_schedule_and_reads_its_data_interval(dagbag):
    from cogumi_tasks.core.config import load_config

    dag = dagbag.dags["recalibrate"]
    # data intervals of the config's cron expression (a plain cron string would give empty intervals in Airflow 3)
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == load_config("tiny").recalibrate.schedule
    assert dag.catchup is False  # tiny sets no start_date: only the newest complete interval runs
    assert dag.get_task("refit").upstream_task_ids == {"label"}
    for task in ("label", "refit"):
        assert dag.get_task(task).step_params == {"start": "{{ params.start or data_interval_start.isoformat() }}",
                                                  "end": "{{ params.end or data_interval_end.isoformat() }}"}
    assert dag.get_task("label").pool == "cogumi_cpu"


def test_every_step_task_is_wired_to_declared_inputs_and_outputs(dagbag, monkeypatch):
    from cogumi_provider.wiring import asset_wiring_errors, step_arguments, wiring_errors

    for dag_id, dag in dagbag.dags.items():
        assert all(step_arguments(t) is not None for t in dag.tasks), dag_id  # every task is checked
        assert wiring_errors(dag) == [], dag_id
    assert asset_wiring_errors(dagbag.dags.values()) == []
    sft = dagbag.dags["phase1_base"].get_task("sft")
    monkeypatch.setattr(sft, "asset_inputs", {"dataset": "cogumi_phase0:datset"})
    assert asset_wiring_errors(dagbag.dags.values()) == [
        "task phase1_base.sft: asset input dataset='cogumi_phase0:datset': no task publishing cogumi_phase0 has "
        "output 'datset' (they have ['dataset', 'quarantine', 'stats'])"]


def test_a_misspelt_output_or_input_fails_the_dag_import(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    text = (REPO / "dags" / "phase0_dataset.py").read_text()
    broken = text.replace('dedup.output["deduped"]', 'dedup.output["dedupd"]')
    broken = broken.replace('input_name="shard"', 'input_name="shards"')
    assert broken.count("dedupd") == 1 and 'input_name="shards"' in broken
    (tmp_path / "broken.py").write_text(broken)
    bag = DagBag(dag_folder=str(tmp_path))
    assert list(bag.dags) == []
    [error] = bag.import_errors.values()
    assert "step data.dedup has no output 'dedupd' (it declares ['deduped', 'dropped']" in error
    assert "task generate (data.generate): input(s) ['shards'] are not declared by the step" in error


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def test_every_params_reference_in_a_template_names_a_param_of_its_dag(dagbag):
    """``{{ params.X }}`` must name a declared run param, and not a dict attribute: ``{{ params.items }}`` rendered
    the dict's method, and phase4_routing's labels task failed on it in a make demo."""
    import re

    seen = 0
    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            for field in task.template_fields:
                for text in _strings(getattr(task, field, None)):
                    for name in re.findall(r"\bparams\.([A-Za-z_]\w*)", text):
                        seen += 1
                        assert name in dag.params and not hasattr(dict, name), (dag_id, task.task_id, field, name)
    assert seen > 10  # the check saw the DAGs' param references


def test_a_run_param_named_like_a_dict_attribute_is_refused():
    from airflow.sdk import Param
    from cogumi_provider.placement import run_params

    with pytest.raises(ValueError, match=r"\['items'\] shadow dict attributes"):
        run_params(items=Param(None, type=["null", "string"]))
