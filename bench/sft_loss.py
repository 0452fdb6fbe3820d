"""Benchmark: one LoRA SFT step (loss, backward) on CPU: TRL's fused LM head or the answer window, or LoRA dropout on
or off. Prints JSON.

    python bench/sft_loss.py [--compare loss|dropout] [--repeats 5] [--steps 8] [--out FILE]

Model: the packaged SmolLM2-135M converted to an fp32 HF directory, with tiny.yaml's ``train.sft`` LoRA (rank 16,
every linear layer). Batches: 4 training rows each of the tiny world's Phase 0 mix (30 / 100 / 80 list_fn /
word_arith / tool_call instances with their reference answers), collated as ``train_sft`` does, the same
``--steps`` batches in every repeat; gradients are zeroed and never applied, so every repeat does the same work.
Ways: ``trl_fused_head`` is the baseline, TRL's own CPU path (``add_fused_lm_head`` with the outputs SFTTrainer
asks for, called with ``fused_lm_head=True``: every position through the head in chunks); ``answer_window`` is
:func:`cogumi_tasks.train.sft.answer_window_loss` (the head only from the batch's first answer position). Figures:
seconds per step (median, min, max over repeats), the speed-up of the medians, and the largest relative
difference between the two losses.

``--compare dropout``: both ways take the answer-window loss; ``dropout_0.05`` (the baseline: ``SFTConfig``'s default,
peft drawing a dropout mask on every adapter's input) against ``dropout_0`` (no mask; what tiny.yaml trains with).
The losses differ there by design (the masks), so the JSON gives each way's mean loss instead of the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTS = {"list_fn": 30, "word_arith": 100, "tool_call": 80}


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from bench.figures import emit, summary
    from bench.tiny_world_learning import sft_config
    from cogumi_tasks import world
    from cogumi_tasks.core.config import SFTConfig
    from cogumi_tasks.models.convert import hf_dir_from_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf
    from cogumi_tasks.train.sft import answer_window_loss, build_examples, collate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", choices=["loss", "dropout"], default="loss")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="batches per repeat")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = sft_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [])
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_dir_from_gguf(smollm2_gguf(), Path(tmp) / "hf")
        tok = AutoTokenizer.from_pretrained(str(hf))
        rows = [{"prompt": i.prompt, "response": i.reference}
                for f, n in COUNTS.items() for i in world.generate(f, n, 0, part="train")]
        examples = build_examples(tok, rows, cfg.max_seq_len)
        examples.sort(key=lambda ex: len(ex["input_ids"]))  # batches of similar length, as group_by_length makes
        stride = len(examples) // args.steps
        batches = [collate(examples[k * stride:k * stride + cfg.batch_size], tok.pad_token_id)
                   for k in range(args.steps)]

        def lora_model(dropout: float, fused_head: bool):
            model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
            if fused_head:
                add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=dropout,
                                                     target_modules=list(cfg.target_modules),
                                                     init_lora_weights=False))
            model.train()
            return model

        # way -> (the model it trains, its loss on a batch)
        if args.compare == "loss":
            model = lora_model(0.0, fused_head=True)
            baseline = "trl_fused_head"
            ways = {"trl_fused_head": (model, lambda b: model(**b, use_cache=False, fused_lm_head=True).loss),
                    "answer_window": (model, lambda b: answer_window_loss(model, b).loss)}
        else:
            default = SFTConfig.model_fields["dropout"].default
            with_mask, without = lora_model(default, fused_head=False), lora_model(0.0, fused_head=False)
            baseline = f"dropout_{default}"
            ways = {baseline: (with_mask, lambda b: answer_window_loss(with_mask, b).loss),
                    "dropout_0": (without, lambda b: answer_window_loss(without, b).loss)}
        seconds: dict[str, list[float]] = {w: [] for w in ways}
        losses: dict[str, list[float]] = {w: [] for w in ways}
        for rep in range(args.repeats):
            for way, (trained, loss_of) in ways.items():
                t0 = time.perf_counter()
                for b in batches:
                    trained.zero_grad()
                    loss = loss_of(b)
                    loss.backward()
                    if rep == 0:
                        losses[way].append(loss.item())
                seconds[way].append((time.perf_counter() - t0) / len(batches))
            print(f"repeat {rep}: " + ", ".join(f"{w} {s[-1]:.2f} s/step" for w, s in seconds.items()),
                  file=sys.stderr)
    medians = {w: statistics.median(s) for w, s in seconds.items()}
    other = next(w for w in ways if w != baseline)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    result = {"compare": args.compare, "repeats": args.repeats, "steps": args.steps, "batch_size": cfg.batch_size,
              "threads": 2, "tokens_per_step": round(tokens, 1),
              "baseline": baseline, "seconds_per_step": {w: summary(s, 3) for w, s in seconds.items()},
              "speedup_median": round(medians[baseline] / medians[other], 2)}
    if args.compare == "loss":
        result["max_relative_loss_difference"] = max(
            abs(a - b) / abs(a) for a, b in zip(losses[baseline], losses[other], strict=True))
    else:
        result["mean_loss"] = {w: round(statistics.mean(v), 4) for w, v in losses.items()}
    emit(result, args.out)


if __name__ == "__main__":
    main()
