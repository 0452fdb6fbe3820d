"""Benchmark: greedy answers of a quantized GGUF with two LoRAs, one context with every thread against one-thread
contexts side by side. Prints JSON.

    python bench/gguf_workers.py [--repeats 5] [--items 6] [--threads 2] [--out FILE]
                                 [--gguf Q5_K_M.gguf --lora A.gguf --lora B.gguf]

The setting of Phase 3's steps (``modifiers.test``, ``compress``, ``evaluate``): a Q5_K_M model with a recovery LoRA
and a modifier applied together, ``max_tokens`` 64. By default the packaged SmolLM2-135M, converted to f16 and
quantized to Q5_K_M here, with two seeded random LoRAs on tiny.yaml's ``train.sft.target_modules`` (rank 8 and 4,
small factors so that the answers stay readable); ``--gguf``/``--lora`` take real ones instead (e.g. a demo's Phase
2 GGUF and recovery LoRA and a Phase 3 modifier). Prompts: ``--items`` held-out instances of each world family, new
ones per repeat (seed = repeat). Ways, both :class:`cogumi_tasks.eval.backends.GGUFBackend` with
``n_threads=--threads``: ``one_context`` (``parallel=1``: the baseline, one context with every thread, what the
backend did before) and ``side_by_side`` (``parallel=--threads``: that many one-thread contexts, conversation i to
context i mod n). Model load is not timed. Figures: per way the median, min and max seconds over repeats, the
speed-up of the medians, and how many answers of ``side_by_side`` equal the baseline's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.eval_decode import conversations  # noqa: E402


def random_lora(hf_dir: Path, out: Path, rank: int, seed: int) -> Path:
    """A peft LoRA of ``rank`` on the tiny config's SFT target modules of ``hf_dir`` with seeded random factors,
    as a GGUF LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.models.convert import convert_lora_to_gguf

    torch.manual_seed(seed)
    targets = load_config("tiny").train.sft.target_modules
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(out.with_suffix(""))
    return convert_lora_to_gguf(out.with_suffix(""), hf_dir, out)


def main() -> None:
    from cogumi_tasks.compress.gguf import quantize_gguf
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.models.convert import convert_hf_to_gguf, hf_dir_from_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--items", type=int, default=6, help="held-out instances per family and repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", type=Path, help="a quantized GGUF (default: the packaged SmolLM2 as Q5_K_M)")
    ap.add_argument("--lora", type=Path, action="append", help="a GGUF LoRA for --gguf (repeat for several)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf, loras = args.gguf, args.lora or []
        if gguf is None:
            hf = hf_dir_from_gguf(smollm2_gguf(), Path(tmp) / "hf")
            f16 = convert_hf_to_gguf(hf, Path(tmp) / "f16.gguf", "f16", "smollm")
            gguf = quantize_gguf(f16, Path(tmp) / "q5_k_m.gguf", "Q5_K_M")
            loras = [random_lora(hf, Path(tmp) / f"lora{r}.gguf", r, seed=r) for r in (8, 4)]
        adapters = [(p, 1.0) for p in loras]
        ways = {"one_context": GGUFBackend(gguf, adapters, parallel=1, n_threads=args.threads),
                "side_by_side": GGUFBackend(gguf, adapters, parallel=args.threads, n_threads=args.threads)}
        seconds: dict[str, list[float]] = {w: [] for w in ways}
        same = total = tokens = 0
        try:
            for rep in range(args.repeats):
                convs = conversations(args.items, rep)
                texts = {}
                for way, backend in ways.items():
                    t0 = time.perf_counter()
                    gens = backend.generate(convs, 64)
                    seconds[way].append(time.perf_counter() - t0)
                    texts[way] = [g.text for g in gens]
                tokens += sum(g.completion_tokens for g in gens)
                same += sum(a == b for a, b in zip(texts["one_context"], texts["side_by_side"], strict=True))
                total += len(convs)
                print(f"repeat {rep}: " + ", ".join(f"{w} {s[-1]:.1f} s" for w, s in seconds.items())
                      + f" for {len(convs)} answers", file=sys.stderr)
        finally:
            for backend in ways.values():
                backend.close()
    from bench.figures import emit, summary

    emit({"model": str(args.gguf or "packaged SmolLM2-135M as Q5_K_M"),
          "loras": [str(p) for p in args.lora] if args.lora else ["random rank 8", "random rank 4"],
          "answers_per_repeat": 3 * args.items, "repeats": args.repeats, "max_tokens": 64, "threads": args.threads,
          "completion_tokens": tokens, "baseline": "one_context",
          "ways": {w: summary(s, 2) for w, s in seconds.items()},
          "speedup_median": round(statistics.median(seconds["one_context"])
                                  / statistics.median(seconds["side_by_side"]), 2),
          "side_by_side_same_as_one_context": f"{same}/{total}"}, args.out)


if __name__ == "__main__":
    main()
