"""``cogumi run-step train.sft`` (what a task or a pod runs) killed with SIGKILL mid-training, then run again
in a fresh process with a fresh temporary directory (a cleared task on any machine): it resumes from the
last checkpoint in S3 and the step count continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config

pytestmark = pytest.mark.stack

ROWS = [{"prompt": f"What is {i} times 3?", "response": f"{i} times 3 is {3 * i}."} for i in range(24)]


def test_killed_sft_task_resumes_from_its_s3_checkpoint(hf_dir, s3_server, write_config, tmp_path):
    path = write_config("p1-kill", {"train.sft.max_steps": 8, "train.sft.checkpoint_every": 2,
                                    "train.sft.batch_size": 2, "train.sft.max_seq_len": 64, "train.sft.rank": 4,
                                    "train.sft.early_stopping_patience": 10})
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    store = ArtifactStore(load_config(path).storage, s3_server.credentials())
    store.ensure_bucket()
    cmd = [sys.executable, "-m", "cogumi_tasks.cli", "run-step", "train.sft", "--config", path, "--run-id", "kill",
           "--input", f"model={hf_dir}", "--input", f"dataset={dataset}", "--output-json", str(tmp_path / "out.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not [u for u in store.list(store.uri("p1-kill", "train.sft") + "/")
                   if u.endswith("/step-4/_complete.json")]:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4 in S3"
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not [u for u in store.list(store.uri("p1-kill", "train.sft") + "/") if u.endswith("/_manifest.json")]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    metrics = store.get_json(out["manifest"])["metrics"]
    assert metrics["resumed_from"] >= 4 and metrics["steps"] == 8
    # the loss curve is continuous: steps 1..8 once each, the first ones carried over from the killed run
    assert [s for s, _ in metrics["train_loss_curve"]] == list(range(1, 9))
    assert "resuming from the checkpoint at step" in done.stderr
