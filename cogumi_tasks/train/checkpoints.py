"""Trainer checkpoints mirrored to S3, so a killed or cleared task resumes on any machine.

A checkpoint is a local ``step-N`` folder (see :mod:`cogumi_tasks.train.sft`). It is uploaded under the step's
``_work/checkpoints/step-N/`` with a ``_complete.json`` marker written last: a folder without the marker was cut off
mid-upload and is never restored. Only the newest ``keep`` complete checkpoints stay in S3.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from cogumi_tasks.core.artifacts import ArtifactStore, join_uri

log = logging.getLogger("cogumi")

MARKER = "_complete.json"


def _complete_steps(store: ArtifactStore, work_uri: str) -> list[int]:
    steps = []
    for uri in store.list(work_uri.rstrip("/") + "/"):
        m = re.search(r"/step-(\d+)/" + re.escape(MARKER) + "$", uri)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def upload_checkpoint(store: ArtifactStore, work_uri: str, path: Path, step: int, keep: int = 2) -> None:
    """Upload ``path`` (a ``step-N`` folder) then its marker; delete older complete checkpoints beyond ``keep``."""
    base = join_uri(work_uri, path.name)
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        store.upload(file, join_uri(base, file.relative_to(path).as_posix()))
    store.put_json(join_uri(base, MARKER), {"step": step, "at": time.time()})
    for old in _complete_steps(store, work_uri)[:-keep]:
        store.delete_prefix(join_uri(work_uri, f"step-{old}") + "/")
    log.info("checkpoint step %d saved to %s", step, base)


def restore_checkpoint(store: ArtifactStore, work_uri: str, local_dir: Path) -> int | None:
    """Download the newest complete checkpoint into ``local_dir/step-N``; its step, or None if there is none."""
    steps = _complete_steps(store, work_uri)
    if not steps:
        return None
    step = steps[-1]
    base = join_uri(work_uri, f"step-{step}")
    for uri in store.list(base + "/"):
        rel = uri[len(base) + 1:]
        if rel != MARKER:
            store.download(uri, Path(local_dir) / f"step-{step}" / rel)
    log.info("restored checkpoint step %d from %s", step, base)
    return step
