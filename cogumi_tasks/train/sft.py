"""Supervised fine-tuning with LoRA (CPU or GPU) or QLoRA (CUDA only) through TRL's ``SFTTrainer``.

``train_sft`` tokenizes the rows itself (:func:`build_examples`: the loss only on the answer and its end-of-turn
token) and hands TRL the ``input_ids``/``labels`` as they are. On CPU the loss applies the LM head only from the
batch's first answer position on (:func:`answer_window_loss`; ``bench/sft_loss.py``). The Trainer checkpoints the
adapter, optimizer, scheduler, RNG and step every ``checkpoint_every`` steps into ``checkpoint_dir/checkpoint-N``
(its trainer state written last: a folder without it is never resumed from), and each checkpoint goes to
``on_checkpoint`` (the step uploads it to S3). A run resumes from the latest and continues the step count, stops
early on the held-out loss (restoring the best adapter), and writes ``adapter/``, ``merged/`` (LoRA merged onto the
base loaded fresh in fp32, never onto 4-bit weights) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cogumi_tasks.core.config import SFTConfig

log = logging.getLogger(__name__)

IGNORE = -100
CHECKPOINT_PREFIX = "checkpoint"  # transformers' Trainer writes output_dir/checkpoint-<step>/
STATE_FILE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint
KEEP_CHECKPOINTS = 3  # older local checkpoints are pruned, the best one kept (they went to on_checkpoint already)
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


# ---------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir: Path) -> tuple[Path, int] | None:
    """The complete ``checkpoint-N`` folder (its trainer state, written last, is there) with the highest N, or None."""
    found = [(p, int(m.group(1))) for p in Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}-*")
             if (m := re.fullmatch(CHECKPOINT_PREFIX + r"-(\d+)", p.name)) and (p / STATE_FILE).exists()]
    return max(found, key=lambda x: x[1]) if found else None


def _finished(path: Path, total: int, patience: int) -> bool:
    """Whether the run that wrote checkpoint ``path`` had already ended there (last step, or stopped early)."""
    state = json.loads((path / STATE_FILE).read_text())
    stopper = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback", {})
    counter = stopper.get("attributes", {}).get("early_stopping_patience_counter", 0)
    return state["global_step"] >= total or counter >= patience


def _callback(total: int, progress: bool, on_checkpoint: Callable[[Path, int], None] | None) -> Any:
    from transformers import TrainerCallback

    class SFTCallback(TrainerCallback):
        """Progress lines every PROGRESS_EVERY_S, a non-finite loss fails the run, each saved checkpoint goes to
        ``on_checkpoint``."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_log, self.last_step = time.monotonic(), state.global_step

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            step, logs = state.global_step, logs or {}
            if "loss" in logs:
                if not math.isfinite(logs["loss"]):
                    raise FloatingPointError(f"sft: non-finite training loss at step {step}")
                now = time.monotonic()
                if progress and (now - self.last_log >= PROGRESS_EVERY_S or step == total):
                    log.info("sft: step %d/%d loss %.4f lr %.2e %.2f steps/s", step, total, logs["loss"],
                             logs.get("learning_rate", 0.0), (step - self.last_step) / max(now - self.last_log, 1e-9))
                    self.last_log, self.last_step = now, step
            if "eval_loss" in logs:
                log.info("sft: step %d eval loss %.4f", step, logs["eval_loss"])

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_checkpoint:
                step = state.global_step
                on_checkpoint(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{step}", step)

    return SFTCallback()


# ---------------------------------------------------------------- training
def answer_window_loss(model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
    """The causal LM loss of a collated batch (:func:`collate`) with the LM head applied only from the position before
    the batch's first labelled token on: the logits of earlier positions would only predict prompt tokens, which the
    loss ignores. Same value as the model's own loss over the whole sequence. Returns the model's output."""
    labels = inputs["labels"]
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    start = max(int(labelled[0]) - 1, 0) if len(labelled) else labels.shape[1] - 1
    return model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=labels[:, start:],
                 logits_to_keep=labels.shape[1] - start, use_cache=False, num_items_in_batch=num_items_in_batch)


def _answer_window_trainer(base: type) -> type:
    """``base`` (TRL's SFTTrainer) with :func:`answer_window_loss` as its loss. TRL's fused head scores only the
    labelled positions where Triton runs (CUDA) and every position elsewhere; on CPU each prompt position (about
    two thirds of a tiny-world example) would cost a product with the 49,152-token head, its softmax, entropy and
    top-1. TRL's entropy and token-accuracy metrics are not logged."""

    class AnswerWindowTrainer(base):
        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            outputs = answer_window_loss(model, inputs, num_items_in_batch)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return AnswerWindowTrainer


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction))) if fraction > 0 and len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def train_sft(model_dir: Path, rows: list[dict], out_dir: Path, cfg: SFTConfig, *, checkpoint_dir: Path,
              on_checkpoint: Callable[[Path, int], None] | None = None, resume: bool = True,
              progress: bool = True, merge: bool = True) -> dict:
    """LoRA/QLoRA SFT of the model in ``model_dir`` on ``rows``; see the module docstring. Returns the metrics.
    ``merge=False`` writes the adapter only (no ``merged/`` copy of the model)."""
    import torch
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, EarlyStoppingCallback, PrinterCallback, TrainerState
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

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
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_ex) / cfg.batch_size) / cfg.grad_accum))
    found = latest_checkpoint(checkpoint_dir) if resume else None
    model = _load_model(model_dir, cfg, method, device)
    evals = bool(eval_ex)
    if found:
        log.info("sft: resumed from %s (step %d of %d)", found[0], found[1], total)
    log.info("sft: method=%s device=%s train=%d eval=%d steps=%d batch=%d", method, device, len(train_ex),
             len(eval_ex), total, cfg.batch_size)
    if found and _finished(found[0], total, cfg.early_stopping_patience):  # the Trainer would take one more step
        state = TrainerState.load_from_json(str(found[0] / STATE_FILE))
        best = checkpoint_dir / f"{CHECKPOINT_PREFIX}-{state.best_global_step}"
        weights = load_file(str((best if best.exists() else found[0]) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
    else:
        args = TRLSFTConfig(
            output_dir=str(checkpoint_dir), max_steps=total, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
            learning_rate=cfg.lr, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0.03, max_grad_norm=1.0,
            seed=cfg.seed, bf16=cfg.bf16 or method == "qlora", use_cpu=device == "cpu", gradient_checkpointing=False,
            max_length=None, logging_steps=1, logging_nan_inf_filter=False, save_strategy="steps",
            save_steps=cfg.checkpoint_every, save_total_limit=KEEP_CHECKPOINTS,
            eval_strategy="steps" if evals else "no", eval_steps=cfg.checkpoint_every, load_best_model_at_end=evals,
            prediction_loss_only=True,  # else each evaluation recomputes and gathers every position's logits
            metric_for_best_model="eval_loss", greater_is_better=False, restore_callback_states_from_checkpoint=True,
            report_to="none", disable_tqdm=True)
        callbacks = [_callback(total, progress, on_checkpoint)]
        if evals:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
        trainer_class = SFTTrainer if device == "cuda" else _answer_window_trainer(SFTTrainer)
        trainer = trainer_class(model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
                                data_collator=lambda batch: collate(batch, pad_id),
                                train_dataset=Dataset.from_list(train_ex),
                                eval_dataset=Dataset.from_list(eval_ex) if evals else None)
        trainer.remove_callback(PrinterCallback)  # our callback prints progress
        trainer.train(resume_from_checkpoint=str(found[0]) if found else None)
        state, model = trainer.state, trainer.model
        del trainer

    train_curve = [[e["step"], e["loss"]] for e in state.log_history if "loss" in e]
    eval_curve = [[e["step"], e["eval_loss"]] for e in state.log_history if "eval_loss" in e]
    stopped_early = state.global_step < total
    if stopped_early:
        log.info("sft: early stop at step %d (no eval improvement in %d evaluations; best step %d)",
                 state.global_step, cfg.early_stopping_patience, state.best_global_step)
    if evals and eval_curve and state.best_global_step != eval_curve[-1][0]:
        log.info("sft: restored the best adapter (step %d, eval loss %.4f)", state.best_global_step, state.best_metric)
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    del model
    if merge:
        merge_adapter(model_dir, adapter_dir, out_dir / "merged")

    metrics = {"steps": state.global_step, "train_loss_curve": train_curve, "eval_loss_curve": eval_curve,
               "final_eval_loss": state.best_metric, "best_step": state.best_global_step,
               "stopped_early": stopped_early, "method": method, "resumed_from": found[1] if found else None,
               "seconds": round(time.monotonic() - started, 2)}
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
