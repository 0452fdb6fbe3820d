"""Trainer checkpoints mirrored to S3, so a killed or cleared task resumes on any machine.

A checkpoint is a local ``checkpoint-N`` folder (see :mod:`cogumi_tasks.train.sft`). It is uploaded under the step's
``_work/checkpoints/step-N/`` with a ``_complete.json`` marker written last: a folder without the marker was cut off
mid-upload and is never restored. Only the newest ``keep`` complete checkpoints stay in S3, and the one the newest
names as best (its adapter is restored at the end of training).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from cogumi_tasks.core.artifacts import ArtifactStore, join_uri
from cogumi_tasks.train.sft import CHECKPOINT_PREFIX, STATE_FILE

log = logging.getLogger("cogumi")

MARKER = "_complete.json"


def _complete_steps(store: ArtifactStore, work_uri: str) -> list[int]:
    steps = []
    for uri in store.list(work_uri.rstrip("/") + "/"):
        m = re.search(r"/step-(\d+)/" + re.escape(MARKER) + "$", uri)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def _best_step(path: Path) -> int | None:
    """The step of the best checkpoint the trainer state in ``path`` names, if any."""
    state = Path(path) / STATE_FILE
    return json.loads(state.read_text()).get("best_global_step") if state.exists() else None


def upload_checkpoint(store: ArtifactStore, work_uri: str, path: Path, step: int, keep: int = 2) -> None:
    """Upload ``path`` (a ``checkpoint-N`` folder) as ``step-N`` then its marker; delete older complete checkpoints
    beyond ``keep``, except the best."""
    base = join_uri(work_uri, f"step-{step}")
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        store.upload(file, join_uri(base, file.relative_to(path).as_posix()))
    store.put_json(join_uri(base, MARKER), {"step": step, "at": time.time()})
    best = _best_step(path)
    for old in _complete_steps(store, work_uri)[:-keep]:
        if old != best:
            store.delete_prefix(join_uri(work_uri, f"step-{old}") + "/")
    log.info("checkpoint step %d saved to %s", step, base)


def _download(store: ArtifactStore, work_uri: str, step: int, local_dir: Path) -> None:
    base = join_uri(work_uri, f"step-{step}")
    for uri in store.list(base + "/"):
        rel = uri[len(base) + 1:]
        if rel != MARKER:
            store.download(uri, Path(local_dir) / f"{CHECKPOINT_PREFIX}-{step}" / rel)
    log.info("restored checkpoint step %d from %s", step, base)


def restore_checkpoint(store: ArtifactStore, work_uri: str, local_dir: Path) -> int | None:
    """Download the newest complete checkpoint, and the best one it names, into ``local_dir/checkpoint-N``; the
    newest's step, or None if there is none."""
    steps = _complete_steps(store, work_uri)
    if not steps:
        return None
    step = steps[-1]
    _download(store, work_uri, step, local_dir)
    best = _best_step(Path(local_dir) / f"{CHECKPOINT_PREFIX}-{step}")
    if best is not None and best != step and best in steps:
        _download(store, work_uri, best, local_dir)
    return step
