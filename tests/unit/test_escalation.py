"""Escalation detector: the generated data's held-out split, the judged-JSONL reader's errors, the student's
determinism and reload, and one quick teacher + student training on the installed MiniLM (no download)."""

from __future__ import annotations

import json

import pytest

from cogumi_tasks.core.config import EscalationConfig
from cogumi_tasks.core.records import RecordError
from cogumi_tasks.routing.escalation import (
    STUDENT_FILE,
    VOCAB_FILE,
    EscalationDetector,
    build_vocab,
    fit,
    save_student,
    student_vocab,
    train_student,
    word_pool,
)
from cogumi_tasks.routing.escalation_data import Example, generate, held_out, read_examples

SHARES = (0.5, 1 / 3, 1 / 6)


def test_generated_test_split_uses_unseen_templates_or_fillers():
    examples = generate(300, SHARES, seed=3)
    assert examples == generate(300, SHARES, seed=3)
    held = held_out(3)
    held_templates = set(held["0"][1]) | set(held["1"][1])
    held_fillers = held["x"][1] + held["y"][1]
    by_split = {s: [e for e in examples if e.split == s] for s in ("train", "val", "test")}
    assert [len(v) for v in by_split.values()] == [150, 100, 50]
    for e in by_split["train"] + by_split["val"]:
        assert e.template not in held_templates
        assert not any(f in e.text for f in held_fillers), e.text
    for e in by_split["test"]:
        assert e.template in held_templates or any(f in e.text for f in held_fillers), e.text
    assert len({e.text for e in examples}) == len(examples)  # no test text is a training text
    assert sum(e.label for e in by_split["test"]) == 25  # val and test alternate labels


def test_read_examples_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "ex.jsonl"
    cases = [
        ('{"text": "thanks", "label": 0}\n{"text": "wrong", "label": 2}\n', r"ex.jsonl:2: field 'label': 2"),
        ('{"text": "thanks", "label": 0}\n\n{"text": "", "label": 1}\n', r"ex.jsonl:3: field 'text'"),
        ('{"text": "thanks", "label": 0}\n{"text": "x", "label": 1\n', r"ex.jsonl:2: invalid JSON"),
        ('{"text": "a", "label": "angry"}\n', r"ex.jsonl:1: field 'label': 'angry'"),
        ('{"text": "a", "label": 1, "split": "dev"}\n', r"ex.jsonl:1: field 'split': 'dev'"),
        ('{"text": "a", "label": 1, "split": "train"}\n{"text": "b", "label": 0}\n', "some rows name a split"),
        ('{"text": "a", "label": 1, "split": "train"}\n', "the val split is empty"),
    ]
    for content, message in cases:
        path.write_text(content)
        with pytest.raises(RecordError, match=message):
            read_examples(path, SHARES)
    rows = [{"text": f"message {i}", "label": "dissatisfied" if i % 2 else "satisfied"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_examples(path, SHARES, seed=1)
    assert [sum(e.split == s for e in got) for s in ("train", "val", "test")] == [30, 20, 10]
    assert got == read_examples(path, SHARES, seed=1)
    assert {e.text: e.label for e in got} == {r["text"]: int(r["label"] == "dissatisfied") for r in rows}


def _student(examples: list[Example], cfg: EscalationConfig):
    import torch

    train = [e for e in examples if e.split == "train"]
    val = [e for e in examples if e.split == "val"]
    soft = torch.tensor([[2.0, -2.0] if e.label == 0 else [-2.0, 2.0] for e in train])  # a stand-in teacher
    texts = [e.text for e in train]
    val_soft = torch.tensor([[2.0, -2.0] if e.label == 0 else [-2.0, 2.0] for e in val])
    return train_student(texts, [e.label for e in train], soft, build_vocab(texts, cfg.max_words, cfg.min_count), val,
                         val_soft, cfg)


def test_student_is_deterministic_and_reloads_identically(tmp_path):
    import torch

    cfg = EscalationConfig(student_epochs=3, seed=5)
    examples = generate(200, SHARES, seed=0)
    a, b = _student(examples, cfg), _student(examples, cfg)
    assert a.vocab == b.vocab
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    c = _student(examples, cfg.model_copy(update={"seed": 6}))
    assert not torch.equal(a.model.head.weight, c.model.head.weight)

    files = save_student(a, cfg, tmp_path / "student")
    assert [f.name for f in files] == [STUDENT_FILE, VOCAB_FILE]
    detector = EscalationDetector(tmp_path / "student")
    texts = [e.text for e in examples if e.split == "test"] + ["", "zzz qqq never seen"]
    from cogumi_tasks.routing.escalation import encode

    with torch.no_grad():
        ids, lengths = encode(texts, {w: i for i, w in enumerate(a.vocab)}, cfg.max_words)
        direct = torch.softmax(a.model(ids, lengths), -1)[:, 1].tolist()
    assert detector.predict_many(texts) == pytest.approx(direct, abs=1e-6)
    assert detector.predict(texts[0]) == pytest.approx(direct[0], abs=1e-6)
    assert detector.escalate(texts[0]) == (direct[0] >= cfg.threshold)


def test_student_vocab_adds_frequent_teacher_words_with_the_teachers_geometry():
    import torch
    from transformers import AutoModel, AutoTokenizer

    from cogumi_tasks.train.failures import model_source

    source = model_source("builtin:all-minilm-l6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source)
    texts = ["wrong answer", "thanks, that works"]
    cfg = EscalationConfig(pretrained_words=500, embed_dim=32)
    vocab, init = student_vocab(texts, tokenizer, model, cfg)
    trained = build_vocab(texts, cfg.max_words, cfg.min_count)
    ids = tokenizer.get_vocab()
    frequent = sorted(word_pool(tokenizer), key=ids.__getitem__)[:500]
    assert vocab[: len(trained)] == trained and vocab[len(trained):] == [w for w in frequent if w not in trained]
    assert init.shape == (len(vocab), 32) and not init[:2].any()
    assert torch.allclose(init[2:].std(0), torch.ones(32), atol=1e-4)
    unit = torch.nn.functional.normalize(init[2:], dim=-1)

    def nearest(word: str, k: int) -> list[str]:
        return [vocab[i + 2] for i in (unit @ unit[vocab.index(word) - 2]).topk(k + 1).indices[1:].tolist()]

    assert "work" not in trained and "worked" not in trained  # frequent words the texts never used ...
    assert {"work", "worked"} <= set(nearest("works", 3))  # ... placed beside their training-word relatives
    assert student_vocab(texts, tokenizer, model, cfg.model_copy(update={"pretrained_words": 0}))[0] == trained


def test_quick_teacher_and_student_on_generated_data(tmp_path):
    cfg = EscalationConfig(generated=240, teacher_epochs=2, max_length=24, augment=2, student_epochs=8,
                           latency_messages=20, threads=1, seed=0)
    examples = generate(cfg.generated, cfg.split, cfg.seed)
    m = fit(examples, cfg, tmp_path / "student", tmp_path / "teacher")
    t, s = m["teacher"], m["student"]
    assert m["examples"] == {"train": 120, "val": 80, "test": 40} and m["augmented"] == 240
    assert s["bytes"] * 20 <= t["bytes"], (s["bytes"], t["bytes"])
    assert m["size_ratio"] >= 20
    assert t["accuracy"] > m["majority_rate_test"], t
    assert s["accuracy"] > m["majority_rate_test"], s
    assert t["ci"][0] <= t["accuracy"] <= t["ci"][1] and s["ci"][0] <= s["accuracy"] <= s["ci"][1]
    lo, hi = m["accuracy_gap_ci"]  # paired over the same messages: the interval holds the point difference
    assert lo <= m["accuracy_gap_points"] <= hi and hi - lo <= 100 * (t["ci"][1] - t["ci"][0] + s["ci"][1] - s["ci"][0])
    assert (tmp_path / "student" / STUDENT_FILE).stat().st_size == s["weights_bytes"]
    assert (tmp_path / "teacher" / "model.safetensors").stat().st_size == t["weights_bytes"]
    assert s["latency"]["n"] == 20 and 0 < s["latency"]["p50_ms"] <= s["latency"]["p99_ms"]
    assert t["train"]["wall_s"] > 0 and s["train"]["wall_s"] > 0


def test_step_publishes_a_student_that_loads_and_is_cached(s3_server, store_for, tmp_path):
    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.core.steps import run_step

    cfg = load_config("tiny", {"name": "t-escalation-step", "routing.escalation.generated": 60,
                               "routing.escalation.teacher_epochs": 1, "routing.escalation.augment": 1,
                               "routing.escalation.student_epochs": 2, "routing.escalation.latency_messages": 10})
    store = store_for(cfg)
    first = run_step("routing.escalation", cfg, store=store, run_id="r1")
    assert not first.skipped and sorted(first.outputs) == ["metrics", "student"]  # no teacher unless save_teacher
    assert first.metrics["data"].startswith("generated")
    metrics = json.loads(store.get_bytes(first.outputs["metrics"]))
    assert metrics["student"]["bytes"] == first.metrics["student"]["bytes"]
    bundle = store.fetch_prefix(first.outputs["student"], tmp_path / "bundle")
    detector = EscalationDetector(bundle)
    assert 0.0 <= detector.predict("that is not what I asked") <= 1.0
    assert run_step("routing.escalation", cfg, store=store, run_id="r2").skipped
