"""llm-compressor one-shot runs from recipe files: gradual pruning stages and AWQ W4A16.

Recipes live in ``configs/recipes/`` in llm-compressor's own YAML format. For a gradual schedule the pruning
recipe is applied once per stage with its ``sparsity`` set to that stage's target, each stage starting from the
previous stage's weights; sparsity actually reached is counted from the weights, per layer and overall.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("cogumi")

PRUNABLE = re.compile(r".*\.(self_attn|mlp)\.\w+_proj\.weight$")


def load_recipe(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: a recipe is a YAML mapping of stages (llm-compressor format)")
    return data


def with_value(recipe: dict, key: str, value: Any) -> dict:
    """A copy of ``recipe`` with every modifier argument named ``key`` set to ``value``."""
    out = copy.deepcopy(recipe)

    def walk(node: Any) -> int:
        found = 0
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    node[k] = value
                    found += 1
                else:
                    found += walk(v)
        elif isinstance(node, list):
            found += sum(walk(v) for v in node)
        return found

    if not walk(out):
        raise ValueError(f"recipe has no {key!r} argument to set")
    return out


def calibration_dataset(tokenizer: Any, texts: list[str], max_len: int) -> Any:
    """A tokenized ``datasets.Dataset`` of calibration texts, as ``oneshot`` takes it."""
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts})
    return ds.map(lambda r: tokenizer(r["text"], truncation=True, max_length=max_len, add_special_tokens=False),
                  remove_columns=["text"])


@contextlib.contextmanager
def cpu_safe() -> Iterator[None]:
    """Without an accelerator, llm-compressor's intermediate cache calls ``Tensor.pin_memory`` and fails
    ("Cannot access accelerator device"); pinning is only a transfer optimisation, so skip it there."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original


def run_oneshot(model: Any, tokenizer: Any, recipe: dict, texts: list[str], max_len: int) -> Any:
    """Apply ``recipe`` to ``model`` in place with ``texts`` as calibration data."""
    import yaml
    from llmcompressor import oneshot

    with cpu_safe():
        oneshot(model=model, tokenizer=tokenizer, dataset=calibration_dataset(tokenizer, texts, max_len),
                recipe=yaml.safe_dump(recipe), num_calibration_samples=len(texts), max_seq_length=max_len)
    return model


def sparsity(model: Any) -> dict:
    """Share of exact zeros in each prunable projection, per layer and overall (embeddings excluded)."""
    per_layer: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        if PRUNABLE.match(name):
            layer = re.search(r"layers\.(\d+)\.", name)
            key = layer.group(1) if layer else name
            z, n = per_layer.setdefault(key, [0, 0])
            per_layer[key] = [z + int((p == 0).sum()), n + p.numel()]
    zeros, total = sum(z for z, _ in per_layer.values()), sum(n for _, n in per_layer.values())
    return {"overall": round(zeros / total, 5) if total else None,
            "per_layer": {k: round(z / n, 5) for k, (z, n) in sorted(per_layer.items(), key=lambda kv: int(kv[0])
                                                                     if kv[0].isdigit() else 0)}}


def gradual_prune(model: Any, tokenizer: Any, recipe: dict, schedule: list[float], texts: list[str], max_len: int,
                  measure: Callable[[Any], dict]) -> list[dict]:
    """Prune in stages of increasing target sparsity; after each: sparsity reached and ``measure(model)``."""
    stages = []
    for target in schedule:
        log.info("prune: stage to %.0f%% sparsity with %d calibration samples", target * 100, len(texts))
        run_oneshot(model, tokenizer, with_value(recipe, "sparsity", target), texts, max_len)
        reached = sparsity(model)
        stages.append({"target": target, "sparsity": reached["overall"], "per_layer": reached["per_layer"],
                       **measure(model)})
        log.info("prune: stage %.2f reached %.4f; %s", target, reached["overall"],
                 {k: v for k, v in stages[-1].items() if k not in ("per_layer",)})
    return stages
