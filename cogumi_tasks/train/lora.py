"""The LoRA training primitive shared by Phase 1 (SFT, distillation) and Phase 2 (recovery): SFT into the step's
outputs with checkpoints in its ``_work/``."""

from __future__ import annotations

import logging
from pathlib import Path

from cogumi_tasks.core.config import SFTConfig
from cogumi_tasks.core.steps import StepContext
from cogumi_tasks.models.step_io import model_stats

log = logging.getLogger("cogumi")


def train_lora(ctx: StepContext, model_dir: Path, rows: list[dict], cfg: SFTConfig, *, merge: bool = True) -> dict:
    """Run :func:`~cogumi_tasks.train.sft.train_sft` into the step's outputs, checkpointing to (and resuming
    from) its ``_work/``; with ``merge`` also the merged model (``merged/``, its stats under ``model``)."""
    from cogumi_tasks.train.checkpoints import restore_checkpoint, upload_checkpoint
    from cogumi_tasks.train.sft import train_sft

    ckpt_dir, work = ctx.tmp_dir / "checkpoints", ctx.work_uri("checkpoints")
    restored = restore_checkpoint(ctx.store, work, ckpt_dir)
    if restored is not None:
        log.info("%s: resuming from the checkpoint at step %d", ctx.spec.name, restored)
    metrics = train_sft(model_dir, rows, ctx.out_dir, cfg, checkpoint_dir=ckpt_dir,
                        on_checkpoint=lambda path, n: upload_checkpoint(ctx.store, work, path, n), merge=merge)
    if merge:
        metrics["model"] = model_stats(ctx.out_dir / "merged")
    return metrics
