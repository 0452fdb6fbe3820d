"""Models and datasets as step inputs and outputs: the rows of a Phase 0 dataset, the size of an HF model
directory, and passing an unchanged model on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cogumi_tasks.core.records import iter_jsonl_dicts
from cogumi_tasks.core.steps import StepContext, StepFailed


def dataset_rows(ctx: StepContext, name: str = "dataset") -> list[dict]:
    """The ``prompt``/``response`` pairs of a Phase 0 dataset input."""
    rows = []
    for i, r in enumerate(iter_jsonl_dicts(ctx.fetch(ctx.input(name))), 1):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            raise StepFailed(f"{ctx.input(name)} line {i}: needs string fields prompt and response")
        rows.append({"prompt": r["prompt"], "response": r["response"]})
    if not rows:
        raise StepFailed(f"{ctx.input(name)}: no rows")
    return rows


def model_stats(model_dir: Path) -> dict:
    """Parameter count, weight bytes on disk and vocabulary size of an HF model directory."""
    import json
    import math

    from safetensors import safe_open

    weights = sorted(Path(model_dir).glob("*.safetensors"))
    params = 0
    for f in weights:
        with safe_open(str(f), "pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {"parameters": params, "weight_bytes": sum(f.stat().st_size for f in weights),
            "vocab_size": cfg.get("vocab_size")}


def pass_on(ctx: StepContext, uri: str, src: Path | None = None, name: str = "model") -> str:
    """The output value for an unchanged model: the input's own S3 URI (nothing downloaded), or a copy of a
    local directory (``src``, else the input's local directory)."""
    if uri.startswith("s3://"):
        return uri
    shutil.copytree(src or ctx.fetch_dir(uri), ctx.out_dir / name)
    return f"{name}/"
