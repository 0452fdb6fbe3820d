"""LoRA SFT on the packaged SmolLM2-135M: loss masking, that training moves the weights, resume after SIGKILL, merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cogumi_tasks.core.config import SFTConfig
from cogumi_tasks.train.sft import IGNORE, answer_window_loss, build_examples, choose_method, collate

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(20)]
CFG = SFTConfig(rank=4, alpha=8, dropout=0.05, max_steps=6, batch_size=2, max_seq_len=96, checkpoint_every=2,
                eval_fraction=0.2, lr=1e-3, early_stopping_patience=10)


@pytest.fixture(scope="session")
def tokenizer(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="session")
def trained(hf_dir, tmp_path_factory):
    """One uninterrupted 6-step run (shared by the weight, merge and resume-equivalence checks)."""
    from cogumi_tasks.train.sft import train_sft

    out = tmp_path_factory.mktemp("sft-run")
    seen: list[int] = []
    metrics = train_sft(hf_dir, ROWS, out, CFG, checkpoint_dir=out / "ckpt",
                        on_checkpoint=lambda path, step: seen.append(step))
    return out, metrics, seen


# ---------------------------------------------------------------- masking
def _answer_positions(tokenizer, row: dict) -> tuple[str, list[int], range]:
    """Render with the tokenizer alone: the prompt text, the full ids, and where the answer + <|im_end|> lie."""
    msgs = [{"role": "user", "content": row["prompt"]}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": row["response"]}], tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_answer = len(tokenizer(row["response"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
    return prompt, ids, range(n_prompt, n_prompt + n_answer)


def test_labels_mask_exactly_the_prompt_and_template(tokenizer):
    rows = [{"prompt": "Name a prime.", "response": "Seven is prime."},
            {"prompt": "Say hi in French", "response": "Bonjour ! Comment ça va ?"}]
    examples = build_examples(tokenizer, rows, max_len=512)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, ex in zip(rows, examples, strict=True):
        prompt, ids, answer = _answer_positions(tokenizer, row)
        assert ex["input_ids"] == ids  # same tokens as the rendered conversation
        labelled = [i for i, t in enumerate(ex["labels"]) if t != IGNORE]
        assert labelled == list(answer)
        assert all(ex["labels"][i] == ex["input_ids"][i] for i in labelled)
        assert tokenizer.decode(ex["input_ids"][:answer.start]) == prompt  # everything masked before is the prompt
        assert tokenizer.decode([ex["labels"][i] for i in labelled]) == row["response"] + "<|im_end|>"
        assert ex["labels"][labelled[-1]] == end
        assert prompt.endswith("<|im_start|>assistant\n")


def test_system_prompt_is_masked(tokenizer):
    row = {"system": "You answer tersely.", "prompt": "2+2?", "response": "4"}
    ex = build_examples(tokenizer, [row], max_len=512)[0]
    text = tokenizer.decode(ex["input_ids"])
    assert "You answer tersely." in text and "SmolLM" not in text
    assert tokenizer.decode([t for t in ex["labels"] if t != IGNORE]) == "4<|im_end|>"


def test_truncation_keeps_the_rule(tokenizer):
    row = {"prompt": "Count to ten.", "response": "one two three four five six seven eight nine ten"}
    _, ids, answer = _answer_positions(tokenizer, row)
    ex = build_examples(tokenizer, [row], max_len=answer.start + 3)[0]
    assert ex["input_ids"] == ids[:answer.start + 3]
    assert ex["labels"] == [IGNORE] * answer.start + ids[answer.start:answer.start + 3]
    # a prompt that fills max_len leaves nothing to learn: dropped
    assert build_examples(tokenizer, [row], max_len=answer.start) == []


def test_collate_masks_padding(tokenizer):
    rows = [{"prompt": "Hi", "response": "Hello there, how can I help you today?"},
            {"prompt": "Yes?", "response": "No."}]
    examples = build_examples(tokenizer, rows, max_len=512)
    batch = collate(examples, pad_id=0)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i].tolist() == ex["labels"] + [IGNORE] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        _, _, answer = _answer_positions(tokenizer, rows[i])
        assert [j for j, t in enumerate(batch["labels"][i].tolist()) if t != IGNORE] == list(answer)
    assert len(examples[1]["input_ids"]) < width  # the second row really was padded


def test_answer_window_loss_equals_the_full_loss_and_its_gradient(tokenizer, hf_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "A much longer question, with many words before the answer starts?", "response": "Yes."},
            {"prompt": "Short?", "response": "A longer answer of several words."}]
    batch = collate(build_examples(tokenizer, rows, max_len=512), pad_id=0)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32), lora)
    losses, grads = [], []
    for loss_of in (lambda: model(**batch, use_cache=False).loss, lambda: answer_window_loss(model, batch).loss):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    first = min(j for row in batch["labels"].tolist() for j, t in enumerate(row) if t != IGNORE)
    window = answer_window_loss(model, batch).logits.shape[1]
    assert window == batch["labels"].shape[1] - first + 1  # the head ran on the answer window, not the prompt


# ---------------------------------------------------------------- method
def test_choose_method(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        choose_method(SFTConfig(method="qlora"))
    assert choose_method(SFTConfig(method="auto")) == "lora"
    assert choose_method(SFTConfig(method="lora")) == "lora"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_method(SFTConfig(method="auto")) == "qlora"
    assert choose_method(SFTConfig(method="lora")) == "lora"


# ---------------------------------------------------------------- training
@pytest.mark.stack
def test_lora_weights_change_and_loss_is_finite(trained):
    import math

    from safetensors.torch import load_file

    out, metrics, seen = trained
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())  # initialised to zero: training moved them
    assert {k.split(".")[-3] for k in lora_b} == set(CFG.target_modules)
    assert metrics["steps"] == 6 and [s for s, _ in metrics["train_loss_curve"]] == list(range(1, 7))
    assert all(math.isfinite(loss) for _, loss in metrics["train_loss_curve"])
    assert metrics["train_loss_curve"][-1][1] < metrics["train_loss_curve"][0][1]
    assert [s for s, _ in metrics["eval_loss_curve"]] == [2, 4, 6] and math.isfinite(metrics["final_eval_loss"])
    assert metrics["method"] == "lora" and metrics["resumed_from"] is None
    assert seen == [2, 4, 6] and json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.stack
def test_merged_loads_generates_and_differs_only_where_lora_applied(trained, hf_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    base = load_file(str(hf_dir / "model.safetensors"))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert set(base) == set(merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    lora_keys = {k for k in base if any(f".{m}.weight" in k for m in CFG.target_modules)}
    assert changed and changed <= lora_keys
    assert all(merged[k].dtype == torch.float32 for k in merged)

    model = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


_CHILD = """
import sys, time
from pathlib import Path
from cogumi_tasks.core.config import SFTConfig
from cogumi_tasks.train.sft import train_sft

cfg = SFTConfig.model_validate_json(sys.argv[4])
rows = {rows!r}

def hang(path, step):
    if step == 4:
        Path(sys.argv[3]).write_text(str(path))
        time.sleep(600)  # the parent SIGKILLs us here, after step-4 is on disk

train_sft(Path(sys.argv[1]), rows, Path(sys.argv[2]), cfg, checkpoint_dir=Path(sys.argv[2]) / "ckpt",
          on_checkpoint=hang)
"""


@pytest.mark.stack
def test_resume_after_sigkill_continues_the_step_count(hf_dir, tmp_path, trained):
    from cogumi_tasks.train.sft import latest_checkpoint, train_sft

    script, marker, out = tmp_path / "child.py", tmp_path / "at-step-4", tmp_path / "run"
    script.write_text(textwrap.dedent(_CHILD.format(rows=ROWS)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(hf_dir), str(out), str(marker), CFG.model_dump_json()],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not marker.exists():  # no deadline of its own: on a loaded machine 150 s was too short; the
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # test's pytest timeout guards hangs
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert latest_checkpoint(out / "ckpt")[1] == 4
    assert not (out / "metrics.json").exists()

    seen: list[int] = []
    metrics = train_sft(hf_dir, ROWS, out, CFG, checkpoint_dir=out / "ckpt", resume=True,
                        on_checkpoint=lambda path, step: seen.append(step))
    assert metrics["resumed_from"] == 4 and metrics["steps"] == 6 and seen == [6]
    steps = [s for s, _ in metrics["train_loss_curve"]]
    assert steps == list(range(1, 7))  # steps 1-4 from the checkpoint, then 5 and 6: no restart
    # resuming restored optimizer, scheduler, RNG and data order: same losses as the uninterrupted run
    expected = trained[1]["train_loss_curve"]
    assert [loss for _, loss in metrics["train_loss_curve"]] == pytest.approx([loss for _, loss in expected], rel=1e-3)
    assert (out / "merged" / "model.safetensors").exists() and (out / "adapter").is_dir()


@pytest.mark.stack
def test_a_finished_run_resumes_without_training(hf_dir, tmp_path, trained):
    import shutil

    import torch
    from safetensors.torch import load_file

    from cogumi_tasks.train.sft import train_sft

    out, metrics, _ = trained
    shutil.copytree(out / "ckpt", tmp_path / "ckpt")  # a run killed after its last checkpoint, before the merge
    seen: list[int] = []
    again = train_sft(hf_dir, ROWS, tmp_path, CFG, checkpoint_dir=tmp_path / "ckpt",
                      on_checkpoint=lambda path, step: seen.append(step))
    assert seen == [] and again["resumed_from"] == 6
    same = ("steps", "train_loss_curve", "eval_loss_curve", "final_eval_loss", "best_step", "stopped_early")
    assert {k: again[k] for k in same} == {k: metrics[k] for k in same}
    before, after = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, tmp_path))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.stack
def test_early_stopping_on_flat_eval_loss(hf_dir, tmp_path):
    from cogumi_tasks.train.sft import train_sft

    cfg = CFG.model_copy(update={"lr": 0.0, "max_steps": 10, "early_stopping_patience": 1})
    metrics = train_sft(hf_dir, ROWS, tmp_path, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert metrics["stopped_early"] and metrics["steps"] == 4 and metrics["best_step"] == 2
    assert [s for s, _ in metrics["eval_loss_curve"]] == [2, 4]
