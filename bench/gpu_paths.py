"""GPU path check: Phase 1 SFT and Phase 2 llm-compressor recipes on CUDA, called as the steps call them. Prints JSON.

    python bench/gpu_paths.py [--model builtin|DIR] [--steps 60] [--out FILE]
    python bench/gpu_paths.py --export-arch DIR   # the packaged model's config and tokenizer, no weights

The tiny config trains and compresses on CPU; production (configs/production.yaml) runs the same functions on a GPU
pod: ``train.sft`` with method ``qlora`` (bitsandbytes NF4) and ``compress.prune`` / ``compress.quantize_awq``
through llm-compressor. This script runs those code paths on whatever device torch finds and reports what they did:

- ``sft``: :func:`cogumi_tasks.train.sft.train_sft` with method ``auto`` (``qlora`` on CUDA) and again with ``lora``,
  same rows, seed and steps: train and eval loss curves, 4-bit modules and memory footprint of the loaded model,
  whether the saved adapter's ``lora_B`` weights moved from zero, and a second call on the same checkpoint folder
  (it must resume from the finished checkpoint instead of training again);
- ``prune``: :func:`cogumi_tasks.compress.oneshot.gradual_prune` with ``configs/recipes/prune_sparsegpt.yaml`` and
  tiny.yaml's schedule: the sparsity reached per stage;
- ``awq``: :func:`cogumi_tasks.compress.oneshot.run_oneshot` with ``configs/recipes/awq_w4a16.yaml`` (group 64),
  saved in compressed-tensors format and reloaded with transformers: bytes, bits per weight, per-byte perplexity
  of the pruned and of the reloaded model on held-out rows.

Rows: tiny-world training instances (``cogumi_tasks.world``, train part) answered with their references; the
perplexity rows are other instances. ``--model DIR`` without weight files (a machine that cannot carry the 94 MB
packaged GGUF) gets SmolLM2-135M's architecture and tokenizer with seeded random weights: then the figures show that
the paths run and train, not what they do to a trained model; ``weights`` in the JSON says which it was. Seconds
are one run each (not a benchmark of speed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
PRUNE_SCHEDULE = [0.2, 0.3, 0.4]  # tiny.yaml's compress.prune.schedule


def packaged_model(dest: Path) -> Path:
    """The packaged SmolLM2-135M GGUF as an HF directory in ``dest`` (dequantized, as ``train.base_model`` makes it)."""
    from cogumi_tasks.models.convert import hf_dir_from_gguf
    from cogumi_tasks.models.packaged import builtin_gguf

    return hf_dir_from_gguf(builtin_gguf("builtin:smollm2-135m"), dest)


def export_arch(dest: Path) -> Path:
    """The packaged SmolLM2's config, generation config and tokenizer in ``dest`` (its weights removed)."""
    packaged_model(dest)
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    return dest


def prepare_model(spec: str, work: Path) -> tuple[Path, str]:
    """An HF model directory and what its weights are: ``packaged`` (the GGUF, dequantized) or ``random-init``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dest = work / "model"
    if spec == "builtin":
        return packaged_model(work / "arch"), "packaged"
    src = Path(spec)
    if any(src.glob("*.safetensors")):
        return src, "given"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)), dtype=torch.float32)
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dest))
    return dest, "random-init"


def world_rows(n: int, part: str) -> list[dict]:
    """``n`` tiny-world rows per family ({prompt, response}) of ``part`` (train or heldout), the reference as the
    answer."""
    from cogumi_tasks import world

    return [{"prompt": inst.prompt, "response": inst.reference}
            for name in sorted(world.FAMILIES) for inst in world.generate(name, n, seed=0, part=part)]


def lora_moved(adapter_dir: Path) -> dict:
    """Largest |lora_B| in the saved adapter (PEFT initialises B at zero: > 0 means training reached it)."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b = [t.abs().max().item() for k, t in weights.items() if "lora_B" in k]
    return {"lora_B_tensors": len(b), "lora_B_max_abs": max(b) if b else 0.0}


def loaded_model(model_dir: Path, method: str) -> dict:
    """4-bit modules and memory footprint of the model as SFT loads it for ``method``."""
    import torch

    from cogumi_tasks.core.config import SFTConfig
    from cogumi_tasks.train.sft import _load_model

    model = _load_model(model_dir, SFTConfig(method=method, rank=8, alpha=16), method,
                        "cuda" if torch.cuda.is_available() else "cpu")
    four_bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    out = {"linear4bit_modules": four_bit, "footprint_bytes": model.get_memory_footprint()}
    del model
    return out


def _sft_run(model_dir: Path, rows: list[dict], steps: int, work: Path, asked: str) -> dict:
    import torch

    from cogumi_tasks.core.config import SFTConfig
    from cogumi_tasks.train.sft import choose_method, train_sft

    cfg = SFTConfig(method=asked, rank=16, alpha=32, lr=2e-3, max_steps=steps, batch_size=8, max_seq_len=256,
                    eval_fraction=0.1, checkpoint_every=max(1, steps // 3), early_stopping_patience=10,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    method = choose_method(cfg)
    run_dir, ckpt = work / f"sft-{asked}", work / f"ckpt-{asked}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    m = train_sft(model_dir, rows, run_dir, cfg, checkpoint_dir=ckpt, progress=False)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    again = train_sft(model_dir, rows, work / f"sft-{asked}-again", cfg, checkpoint_dir=ckpt, progress=False)
    curve = m["train_loss_curve"]
    return {
        "method": m["method"], "chosen": method, "steps": m["steps"], "seconds": m["seconds"],
        "train_loss_first": curve[0][1], "train_loss_last": curve[-1][1],
        "eval_loss_curve": m["eval_loss_curve"], "best_eval_loss": m["final_eval_loss"],
        "peak_cuda_bytes": peak, **lora_moved(run_dir / "adapter"), "loaded": loaded_model(model_dir, method),
        "second_call": {"resumed_from": again["resumed_from"], "steps": again["steps"],
                        "seconds": again["seconds"], "same_best_eval_loss": again["final_eval_loss"]
                        == m["final_eval_loss"]}}


def check_sft(model_dir: Path, rows: list[dict], steps: int, work: Path) -> dict:
    """``auto`` (QLoRA where CUDA is present) and ``lora``, each trained, inspected and called again."""
    import torch

    out: dict = {}
    methods = ["auto", "lora"] if torch.cuda.is_available() else ["lora"]
    for asked in methods:
        try:
            out[asked] = _sft_run(model_dir, rows, steps, work, asked)
        except Exception as exc:  # report it and go on: one device run checks every path
            out[asked] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def check_compress(model_dir: Path, texts: list[str], held: list[str], work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi_tasks.compress.oneshot import gradual_prune, load_recipe, run_oneshot, with_value
    from cogumi_tasks.models.nll import nll_stats
    from cogumi_tasks.models.step_io import model_stats

    def ppl(model) -> float | str:  # as the prune step measures each stage; an error is reported, not raised
        try:
            return round(nll_stats(model, held, tokenizer=tok).byte_ppl, 4)
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out: dict = {"before_byte_ppl": ppl(model)}
    started = time.monotonic()
    stages = gradual_prune(model, tok, load_recipe(ROOT / "configs/recipes/prune_sparsegpt.yaml"), PRUNE_SCHEDULE,
                           texts, 256, lambda m: {"byte_ppl": ppl(m)})
    out["prune"] = {"seconds": round(time.monotonic() - started, 2), "schedule": PRUNE_SCHEDULE,
                    "stages": [{k: v for k, v in s.items() if k != "per_layer"} for s in stages],
                    "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    recipe = with_value(load_recipe(ROOT / "configs/recipes/awq_w4a16.yaml"), "group_size", 64)  # 576 = 9 x 64
    recipe = with_value(recipe, "n_grid", 5)  # tiny.yaml's compress.awq.n_grid
    started = time.monotonic()
    run_oneshot(model, tok, recipe, texts, 256)
    seconds = time.monotonic() - started
    dest = work / "awq"
    model.save_pretrained(str(dest), save_compressed=True)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(str(dest))
    weights = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    params = model_stats(model_dir)["parameters"]
    out["awq"] = {"seconds": round(seconds, 2), "weight_bytes": weights,
                  "bits_per_weight": round(weights * 8 / params, 3),
                  "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                  "reloaded_byte_ppl": ppl(reloaded),
                  "quantized_modules": sum(1 for m in reloaded.modules() if hasattr(m, "weight_scale")
                                           or type(m).__name__.startswith("Compressed"))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin", help="builtin (the packaged GGUF) or an HF directory")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rows", type=int, default=60, help="training instances per family")
    ap.add_argument("--calib", type=int, default=24, help="calibration texts for pruning and AWQ")
    ap.add_argument("--only", choices=["sft", "compress"], default=None)
    ap.add_argument("--export-arch", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.export_arch:
        print(export_arch(args.export_arch))
        return
    import torch
    import transformers

    from cogumi_tasks.models.nll import chat_texts

    result: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, result["weights"] = prepare_model(args.model, work)
        rows = world_rows(args.rows, "train")
        held_rows = world_rows(4, "heldout")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        texts = chat_texts(tok, [(r["prompt"], r["response"]) for r in rows[:args.calib]])
        held = chat_texts(tok, [(r["prompt"], r["response"]) for r in held_rows])
        parts = [args.only] if args.only else ["sft", "compress"]
        for part in parts:
            started = time.monotonic()
            try:
                result[part] = (check_sft(model_dir, rows, args.steps, work) if part == "sft"
                                else check_compress(model_dir, texts, held, work))
            except Exception as exc:  # report and go on to the next part: one device run checks both
                result[part] = {"error": f"{type(exc).__name__}: {exc}"}
            result[part]["wall_seconds"] = round(time.monotonic() - started, 2)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
