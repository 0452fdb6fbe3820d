"""Supervised fine-tuning with LoRA (CPU or GPU) or QLoRA (CUDA only): a plain, resumable training loop.

``train_sft`` checkpoints the adapter, optimizer, scheduler, RNG and step every ``checkpoint_every`` steps into
``checkpoint_dir/step-N`` (written to a temporary folder, then renamed: a killed run never leaves a half one),
resumes from the latest and continues the step count, stops early on the held-out loss, and writes ``adapter/``,
``merged/`` (LoRA merged onto the base loaded fresh in fp32, never onto 4-bit weights) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cogumi_tasks.core.config import SFTConfig

log = logging.getLogger(__name__)

IGNORE = -100
STATE_FILE = "trainer_state.pt"
KEEP_CHECKPOINTS = 3  # older local step-N folders are pruned (they were handed to on_checkpoint already)
PROGRESS_EVERY_S = 5.0


# ---------------------------------------------------------------- data
def build_examples(tokenizer: Any, rows: list[dict], max_len: int) -> list[dict]:
    """Chat-format ``rows`` ({prompt, response, optional system}) into ``input_ids`` and ``labels``.

    Labels are -100 on every prompt/template token up to and including the assistant header, and the real ids on
    the answer and its end-of-turn token (template tokens after it, e.g. ChatML's trailing newline, are -100).
    Sequences are cut on the right at ``max_len``; an example with no answer token left is dropped.
    """
    out, dropped = [], 0
    for row in rows:
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": row["prompt"]}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["response"]}],
                                                  tokenize=False)
        completion = full_text[len(prompt_text):]
        if not full_text.startswith(prompt_text) or not completion.startswith(row["response"]):
            raise ValueError("chat template does not render the prompt as a prefix of the conversation")
        suffix = completion[len(row["response"]):]
        prompt_ids = _encode(tokenizer, prompt_text)
        answer_ids = _encode(tokenizer, row["response"])
        suffix_ids = _encode(tokenizer, suffix) if suffix else [tokenizer.eos_token_id]
        input_ids = prompt_ids + answer_ids + suffix_ids
        labels = [IGNORE] * len(prompt_ids) + answer_ids + suffix_ids[:1] + [IGNORE] * (len(suffix_ids) - 1)
        input_ids, labels = input_ids[:max_len], labels[:max_len]
        if all(t == IGNORE for t in labels):
            dropped += 1
            continue
        out.append({"input_ids": input_ids, "labels": labels})
    if dropped:
        log.warning("build_examples: dropped %d of %d rows whose prompt fills max_len=%d", dropped, len(rows), max_len)
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int:
    """The id that closes an assistant turn in the chat template (ChatML: ``<|im_end|>``)."""
    ex = build_examples(tokenizer, [{"prompt": "a", "response": "b"}], 10_000)[0]
    return [t for t in ex["labels"] if t != IGNORE][-1]


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a list of examples into tensors: ``input_ids``, ``attention_mask`` (0 on padding), ``labels``."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- method and model
def choose_method(cfg: SFTConfig) -> str:
    """``qlora`` when asked for, or on ``auto`` where CUDA is present; else ``lora``. QLoRA without CUDA raises."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.method == "qlora" and not cuda:
        raise RuntimeError("SFT method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit); none is available here. "
                           "Use method 'lora' (or 'auto') on CPU.")
    if cfg.method == "qlora" or (cfg.method == "auto" and cuda):
        return "qlora"
    return "lora"


def _load_model(model_dir: Path, cfg: SFTConfig, method: str, device: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise RuntimeError("SFT method 'qlora' needs the bitsandbytes package (install it on the GPU image)") from e
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant,
                                                     dtype=torch.bfloat16, device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()  # before any forward: an eval-mode forward on 4-bit weights breaks backprop (bitsandbytes trap)
    return model


@contextmanager
def _no_dropout(model: Any):
    """Evaluate without dropout while every other module stays in train mode (keeps 4-bit layers trainable)."""
    import torch

    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in drops:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in drops:
            m.train()


# ---------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir: Path) -> tuple[Path, int] | None:
    """The complete ``step-N`` folder with the highest N, or None."""
    found = [(p, int(m.group(1))) for p in Path(checkpoint_dir).glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / STATE_FILE).exists()]
    return max(found, key=lambda x: x[1]) if found else None


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(model: Any, checkpoint_dir: Path, step: int, state: dict) -> Path:
    import torch

    final = checkpoint_dir / f"step-{step}"
    tmp = checkpoint_dir / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save({**state, "rng": _rng_state()}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    steps = sorted((int(m.group(1)), p) for p in checkpoint_dir.glob("step-*")
                   if (m := re.fullmatch(r"step-(\d+)", p.name)))
    for _, old in steps[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(model: Any, path: Path) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    return torch.load(path / STATE_FILE, weights_only=False)


# ---------------------------------------------------------------- training
def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction))) if fraction > 0 and len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def _batch_indices(n: int, batch_size: int, micro: int, seed: int) -> list[int]:
    """Example indices of micro-batch number ``micro``: a fresh seeded permutation per epoch (resumable)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, pos = divmod(micro, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * batch_size:(pos + 1) * batch_size]


def _eval_loss(model: Any, examples: list[dict], pad_id: int, batch_size: int, device: str, autocast: Any) -> float:
    total, tokens = 0.0, 0
    with _no_dropout(model):
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            with autocast():
                loss = model(**batch).loss.float().item()
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total, tokens = total + loss * n, tokens + n
    return total / max(tokens, 1)


def train_sft(model_dir: Path, rows: list[dict], out_dir: Path, cfg: SFTConfig, *, checkpoint_dir: Path,
              on_checkpoint: Callable[[Path, int], None] | None = None, resume: bool = True,
              progress: bool = True) -> dict:
    """LoRA/QLoRA SFT of the model in ``model_dir`` on ``rows``; see the module docstring. Returns the metrics."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoTokenizer

    started = time.monotonic()
    model_dir, out_dir, checkpoint_dir = Path(model_dir), Path(out_dir), Path(checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    method = choose_method(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    train_rows, eval_rows = _split(rows, cfg.eval_fraction, cfg.seed)
    train_ex = build_examples(tokenizer, train_rows, cfg.max_seq_len)
    eval_ex = build_examples(tokenizer, eval_rows, cfg.max_seq_len)
    if not train_ex:
        raise ValueError("no training examples left after formatting")
    micro_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))

    model = _load_model(model_dir, cfg, method, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, math.ceil(0.03 * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / total))
    use_bf16 = cfg.bf16 or method == "qlora"

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)

    step, resumed_from, stopped_early = 0, None, False
    train_curve: list[list[float]] = []
    eval_curve: list[list[float]] = []
    best: dict = {"loss": math.inf, "step": None, "bad": 0, "adapter": None}
    found = latest_checkpoint(checkpoint_dir) if resume else None
    if found:
        path, _ = found
        state = _load_checkpoint(model, path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step = resumed_from = state["step"]
        train_curve, eval_curve, best = state["train_curve"], state["eval_curve"], state["best"]
        stopped_early = state.get("stopped_early", False)
        log.info("sft: resumed from %s (step %d of %d)", path, step, total)
    log.info("sft: method=%s device=%s train=%d eval=%d steps=%d batch=%d", method, device, len(train_ex),
             len(eval_ex), total, cfg.batch_size)

    last_log, last_log_step = time.monotonic(), step
    model.train()
    while step < total and not stopped_early:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for k in range(cfg.grad_accum):
            idx = _batch_indices(len(train_ex), cfg.batch_size, step * cfg.grad_accum + k, cfg.seed)
            batch = {n: t.to(device) for n, t in collate([train_ex[i] for i in idx], pad_id).items()}
            with autocast():
                loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
            step_loss += loss.item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"sft: non-finite training loss at step {step + 1}")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        train_curve.append([step, step_loss])
        now = time.monotonic()
        if progress and (now - last_log >= PROGRESS_EVERY_S or step == total):
            log.info("sft: step %d/%d loss %.4f lr %.2e %.2f steps/s", step, total, step_loss,
                     scheduler.get_last_lr()[0], (step - last_log_step) / max(now - last_log, 1e-9))
            last_log, last_log_step = now, step
        if step % cfg.checkpoint_every == 0 or step == total:
            if eval_ex:
                ev = _eval_loss(model, eval_ex, pad_id, cfg.batch_size, device, autocast)
                eval_curve.append([step, ev])
                log.info("sft: step %d eval loss %.4f", step, ev)
                if ev < best["loss"]:
                    weights = get_peft_model_state_dict(model)
                    best = {"loss": ev, "step": step, "bad": 0,
                            "adapter": {k: v.detach().cpu().clone() for k, v in weights.items()}}
                else:
                    best["bad"] += 1
                    stopped_early = best["bad"] >= cfg.early_stopping_patience
                    if stopped_early:
                        log.info("sft: early stop at step %d (no eval improvement in %d evaluations; best step %d)",
                                 step, best["bad"], best["step"])
            if step % cfg.checkpoint_every == 0:
                state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "train_curve": train_curve, "eval_curve": eval_curve, "best": best, "total": total,
                         "stopped_early": stopped_early}
                path = _save_checkpoint(model, checkpoint_dir, step, state)
                if on_checkpoint:
                    on_checkpoint(path, step)

    if best["adapter"] is not None and eval_curve and eval_curve[-1][1] > best["loss"]:
        log.info("sft: restoring the best adapter (step %d, eval loss %.4f)", best["step"], best["loss"])
        set_peft_model_state_dict(model, best["adapter"])
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    del model, optimizer
    merge_adapter(model_dir, adapter_dir, out_dir / "merged")

    metrics = {"steps": step, "train_loss_curve": train_curve, "eval_loss_curve": eval_curve,
               "final_eval_loss": best["loss"] if math.isfinite(best["loss"]) else None,
               "best_step": best["step"], "stopped_early": stopped_early, "method": method,
               "resumed_from": resumed_from, "seconds": round(time.monotonic() - started, 2)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def merge_adapter(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Merge a LoRA adapter onto the base weights loaded fresh in fp32 (never onto 4-bit); save model+tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    return out
