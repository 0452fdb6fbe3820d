"""What the demo prints while it follows a run."""

from cogumi_tasks.stack.demo import _progress


def test_a_task_waiting_in_a_pool_names_it():
    tis = [{"task_id": "eval_run", "state": "scheduled", "pool": "cogumi_cpu"},
           {"task_id": "sft", "state": "running", "pool": "cogumi_cpu"},
           {"task_id": "pack_zstd", "state": "scheduled", "pool": "default_pool"},
           {"task_id": "eval_gate", "state": None}]
    assert _progress(tis) == ("eval_run: scheduled (pool cogumi_cpu); sft: running; pack_zstd: scheduled; "
                              "eval_gate: none")
