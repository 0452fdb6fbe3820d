"""Every DAG in dags/ imports cleanly and is configuration only."""

from __future__ import annotations

from pathlib import Path

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
