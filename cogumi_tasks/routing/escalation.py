"""The escalation detector: is the user's message a sign of dissatisfaction with the last answer?

A BERT-class teacher (the encoder named by ``routing.escalation.teacher``, fine-tuned with a classification head)
labels the training messages; a small student, a word-level LSTM (plan: 2 layers, hidden 128) over a vocabulary
built from the training text, learns from the teacher's softened probabilities (temperature) plus the hard labels.
Its vocabulary is the training words plus the teacher's most frequent whole words, each embedding initialised
from the teacher's own input embeddings (:func:`student_vocab`), so a word the training messages never used still
means to the student roughly what it means to the teacher. The student is what serving runs:
``student.safetensors`` + ``vocab.json``, loaded by :class:`EscalationDetector`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogumi_tasks.core.config import EscalationConfig
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.routing.escalation_data import Example, generate, read_examples

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cogumi")

WORD = re.compile(r"[a-z0-9']+|[?!]")
PAD, UNK = "<pad>", "<unk>"
STUDENT_FILE, VOCAB_FILE = "student.safetensors", "vocab.json"


def words(text: str, max_words: int) -> list[str]:
    """The student's tokens: lower-cased words, digits and ``?``/``!``, at most ``max_words`` (the first ones)."""
    return WORD.findall(text.lower())[:max_words]


def build_vocab(texts: list[str], max_words: int, min_count: int) -> list[str]:
    """PAD, UNK, then every training word seen ``min_count`` times or more, most frequent first (ties by word)."""
    counts = Counter(w for t in texts for w in words(t, max_words))
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK, *kept]


def _student_class() -> type:
    from torch import nn

    class LSTMClassifier(nn.Module):
        """Embedding -> LSTM -> the last layer's final hidden state -> 2 logits."""

        def __init__(self, vocab_size: int, embed_dim: int, hidden: int, layers: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
            self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True,
                                dropout=0.2 if layers > 1 else 0.0)
            self.head = nn.Linear(hidden, 2)

        def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                       enforce_sorted=False)
            _, (h, _) = self.lstm(packed)
            return self.head(h[-1])

    return LSTMClassifier


def new_student(vocab_size: int, cfg: dict) -> Any:
    return _student_class()(vocab_size, cfg["embed_dim"], cfg["hidden"], cfg["layers"])


def encode(texts: list[str], index: dict[str, int], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded word ids and lengths (an empty message is one UNK)."""
    import torch

    seqs = [[index.get(w, 1) for w in words(t, max_words)] or [1] for t in texts]
    ids = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


# ---------------------------------------------------------------- teacher
def train_teacher(train: list[Example], cfg: EscalationConfig) -> tuple[Any, Any]:
    """The teacher encoder with a fresh 2-way head, fine-tuned on ``train`` (AdamW, ``teacher_epochs``)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cogumi_tasks.train.failures import model_source

    source = model_source(cfg.teacher)
    torch.manual_seed(cfg.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point here, not a problem
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    finally:
        hf_logging.set_verbosity(verbosity)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = torch.tensor([e.label for e in train])
    model.train()
    for epoch in range(cfg.teacher_epochs):
        total = 0.0
        for batch in torch.randperm(len(train), generator=gen).split(cfg.teacher_batch):
            enc = tokenizer([train[i].text for i in batch.tolist()], padding=True, truncation=True,
                            max_length=cfg.max_length, return_tensors="pt")
            loss = model(**enc, labels=labels[batch]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        log.info("escalation teacher epoch %d: loss %.4f", epoch + 1, total / len(train))
    model.eval()
    return model, tokenizer


def teacher_logits(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch: int = 64) -> torch.Tensor:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i: i + batch], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            out.append(model(**enc).logits)
    return torch.cat(out)


# ---------------------------------------------------------------- student
@dataclass
class StudentResult:
    model: Any
    vocab: list[str]
    best_epoch: int
    val_accuracy: float


def augment(texts: list[str], copies: int, pool: list[str], seed: int) -> list[str]:
    """``copies`` variants of each text for the teacher to label (Tang et al. 2019): each word is dropped with
    probability 0.1 or replaced by a random ``pool`` word with probability 0.15. Most pool words are outside
    the student's vocabulary (it holds the ``pretrained_words`` most frequent), so the student learns from the
    teacher what an unknown word does to the label."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(copies):
        for text in texts:
            kept = []
            for w in text.split():
                r = rng.random()
                if r >= 0.25:
                    kept.append(w)
                elif r >= 0.1:
                    kept.append(rng.choice(pool))
            out.append(" ".join(kept) or text)
    return out


def word_pool(tokenizer: Any) -> list[str]:
    """Whole lower-case words of the teacher's vocabulary (3+ letters), sorted: the replacement words."""
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3)


def student_vocab(train_texts: list[str], tokenizer: Any, model: Any, cfg: EscalationConfig
                  ) -> tuple[list[str], torch.Tensor]:
    """The student's vocabulary and initial embeddings: :func:`build_vocab` of the training texts, then the first
    ``pretrained_words`` words of :func:`word_pool` by token id (BERT-style vocabularies list whole words roughly
    by frequency). A word's vector is the mean of the teacher's input embeddings over its word pieces; the vectors
    are centred, projected on their top ``embed_dim`` principal components and scaled to unit variance per
    component (``nn.Embedding``'s own init scale). PAD and UNK start at zero."""
    import torch

    vocab = build_vocab(train_texts, cfg.max_words, cfg.min_count)
    ids = tokenizer.get_vocab()
    known = set(vocab)
    vocab += [w for w in sorted(word_pool(tokenizer), key=ids.__getitem__)[: cfg.pretrained_words] if w not in known]
    table = model.get_input_embeddings().weight.detach().float()
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id] for w in vocab[2:]]
    vectors = torch.stack([table[p].mean(0) for p in pieces])
    vectors = vectors - vectors.mean(0)
    k = min(cfg.embed_dim, *vectors.shape)
    projected = vectors @ torch.linalg.svd(vectors, full_matrices=False).Vh[:k].T
    init = torch.zeros(len(vocab), cfg.embed_dim)
    init[2:, :k] = projected / projected.std(0).clamp_min(1e-8)
    return vocab, init


def train_student(texts: list[str], labels: list[int], soft_logits: torch.Tensor, vocab: list[str],
                  val: list[Example], val_logits: torch.Tensor, cfg: EscalationConfig,
                  init: torch.Tensor | None = None) -> StudentResult:
    """Distil: loss = soft_weight * T^2 * KL(teacher_T || student_T) + (1 - soft_weight) * CE(student, label)
    (a text labelled -1, an augmented one, has the soft term only); ``student_epochs`` epochs, the epoch with the
    lowest loss on the validation split (its teacher logits ``val_logits`` and labels) kept. ``vocab`` (PAD, UNK
    first) and ``init``, its starting embeddings, come from :func:`student_vocab` (or :func:`build_vocab` and
    random init)."""
    import copy

    import torch
    import torch.nn.functional as F

    index = {w: i for i, w in enumerate(vocab)}
    torch.manual_seed(cfg.seed)
    model = new_student(len(vocab), cfg.model_dump())
    if init is not None:
        model.embed.weight.data.copy_(init)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.student_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids, lengths = encode(texts, index, cfg.max_words)
    labels_t = torch.tensor(labels)
    t = cfg.temperature
    soft = F.softmax(soft_logits / t, dim=-1)

    def distil_loss(logits: torch.Tensor, soft_t: torch.Tensor, hard_labels: torch.Tensor) -> torch.Tensor:
        kd = F.kl_div(F.log_softmax(logits / t, dim=-1), soft_t, reduction="batchmean") * t * t
        hard = F.cross_entropy(logits, hard_labels, ignore_index=-1, reduction="sum") / len(logits)
        return cfg.soft_weight * kd + (1 - cfg.soft_weight) * hard

    val_ids, val_lengths = encode([e.text for e in val], index, cfg.max_words)
    val_labels = torch.tensor([e.label for e in val])
    val_soft = F.softmax(val_logits / t, dim=-1)
    best = (float("inf"), 0, None, 0.0)
    for epoch in range(1, cfg.student_epochs + 1):
        model.train()
        for batch in torch.randperm(len(texts), generator=gen).split(cfg.student_batch):
            loss = distil_loss(model(ids[batch], lengths[batch]), soft[batch], labels_t[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(val_ids, val_lengths)
            val_loss = float(distil_loss(logits, val_soft, val_labels))
            acc = float((logits.argmax(-1) == val_labels).float().mean())
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()), acc)
    model.load_state_dict(best[2])
    model.eval()
    return StudentResult(model, vocab, best[1], best[3])


def save_student(result: StudentResult, cfg: EscalationConfig, out_dir: Path) -> list[Path]:
    """``student.safetensors`` (the weights) and ``vocab.json`` (words, tokenizer pattern, shapes, threshold)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / STUDENT_FILE
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(weights))
    meta = {"format": 1, "pattern": WORD.pattern, "lowercase": True, "max_words": cfg.max_words,
            "embed_dim": cfg.embed_dim, "hidden": cfg.hidden, "layers": cfg.layers, "threshold": cfg.threshold,
            "labels": {"0": "satisfied", "1": "dissatisfied"}, "tokens": result.vocab}
    vocab = out_dir / VOCAB_FILE
    vocab.write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
    return [weights, vocab]


class EscalationDetector:
    """The saved student: ``predict(text)`` -> probability that the message is dissatisfied."""

    def __init__(self, bundle: str | Path) -> None:
        import torch
        from safetensors.torch import load_file

        bundle = Path(bundle)
        meta = json.loads((bundle / VOCAB_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != 1 or meta.get("pattern") != WORD.pattern:
            raise ValueError(f"{bundle / VOCAB_FILE}: format {meta.get('format')!r} / tokenizer pattern "
                             f"{meta.get('pattern')!r} is not the one this code reads (format 1, {WORD.pattern!r})")
        self.max_words = int(meta["max_words"])
        self.threshold = float(meta["threshold"])
        self.index = {w: i for i, w in enumerate(meta["tokens"])}
        self.model = new_student(len(meta["tokens"]), meta)
        self.model.load_state_dict(load_file(str(bundle / STUDENT_FILE)))
        self.model.eval()
        self._torch = torch

    def predict_many(self, texts: list[str]) -> list[float]:
        with self._torch.no_grad():
            ids, lengths = encode(texts, self.index, self.max_words)
            return self._torch.softmax(self.model(ids, lengths), dim=-1)[:, 1].tolist()

    def predict(self, text: str) -> float:
        return self.predict_many([text])[0]

    def escalate(self, text: str) -> bool:
        return self.predict(text) >= self.threshold


# ---------------------------------------------------------------- measurements
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def latency_ms(predict: Any, texts: list[str], n: int, warmup: int = 10) -> dict:
    """p50/p99 wall milliseconds of ``predict(text)`` over ``n`` single messages (``texts`` cycled), one torch
    thread, after ``warmup`` calls."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(warmup):
            predict(texts[i % len(texts)])
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            predict(texts[i % len(texts)])
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"p50_ms": round(float(np.percentile(times, 50)), 4), "p99_ms": round(float(np.percentile(times, 99)), 4),
            "n": n, "threads": 1}


def _scores(pred: list[int], examples: list[Example]) -> dict:
    from cogumi_tasks.eval.tables import accuracy

    out = accuracy([float(p == e.label) for p, e in zip(pred, examples, strict=True)])
    tp = sum(p == 1 and e.label == 1 for p, e in zip(pred, examples, strict=True))
    out["precision"] = round(tp / max(1, sum(pred)), 4)
    out["recall"] = round(tp / max(1, sum(e.label for e in examples)), 4)
    return out


def fit(examples: list[Example], cfg: EscalationConfig, student_dir: Path, teacher_dir: Path) -> dict:
    """Fine-tune the teacher, distil the student, save both, and measure them on the test split: accuracy with
    a 95% bootstrap interval, the teacher's lead in points with a paired interval, precision/recall of
    "dissatisfied", bytes on disk, single-message latency, and the wall and CPU seconds of each training. The
    student's figures are those of the saved bundle, reloaded."""
    import torch

    from cogumi_tasks.eval.tables import paired_difference

    split = {s: [e for e in examples if e.split == s] for s in ("train", "val", "test")}
    for name, rows in split.items():
        if not rows:
            raise ValueError(f"escalation examples: the {name} split is empty")
    test_texts = [e.text for e in split["test"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        model, tokenizer = train_teacher(split["train"], cfg)
        teacher_time = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
        teacher_pred = teacher_logits(model, tokenizer, test_texts, cfg.max_length).argmax(-1).tolist()
        val_logits = teacher_logits(model, tokenizer, [e.text for e in split["val"]], cfg.max_length)
        teacher_val = val_logits.argmax(-1)
        wall, cpu = time.perf_counter(), time.process_time()  # distillation: the teacher labels, the student learns
        train_texts = [e.text for e in split["train"]]
        extra = augment(train_texts, cfg.augment, word_pool(tokenizer), cfg.seed)
        soft = teacher_logits(model, tokenizer, train_texts + extra, cfg.max_length)
        labels = [e.label for e in split["train"]] + [-1] * len(extra)
        torch.set_num_threads(1)  # a small LSTM only loses to thread synchronisation
        vocab, init = student_vocab(train_texts, tokenizer, model, cfg)
        student = train_student(train_texts + extra, labels, soft, vocab, split["val"], val_logits, cfg, init)
        student_time = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    save_student(student, cfg, student_dir)
    detector = EscalationDetector(student_dir)
    student_prob = detector.predict_many(test_texts)
    student_pred = [int(p >= 0.5) for p in student_prob]

    def one_teacher(text: str) -> float:
        with torch.no_grad():
            enc = tokenizer([text], truncation=True, max_length=cfg.max_length, return_tensors="pt")
            return float(torch.softmax(model(**enc).logits, -1)[0, 1])

    test_labels = [e.label for e in split["test"]]
    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    teacher_bytes = dir_bytes(teacher_dir)
    student_bytes = dir_bytes(student_dir)
    teacher = {**_scores(teacher_pred, split["test"]), "bytes": teacher_bytes,
               "weights_bytes": (teacher_dir / "model.safetensors").stat().st_size,
               "val_accuracy": round(float((teacher_val == torch.tensor([e.label for e in split["val"]]))
                                           .float().mean()), 4),
               "latency": latency_ms(one_teacher, test_texts, cfg.latency_messages), "train": teacher_time,
               "model": cfg.teacher, "parameters": sum(p.numel() for p in model.parameters())}
    student_m = {**_scores(student_pred, split["test"]), "bytes": student_bytes,
                 "weights_bytes": (student_dir / STUDENT_FILE).stat().st_size,
                 "val_accuracy": round(student.val_accuracy, 4), "best_epoch": student.best_epoch,
                 "vocab_size": len(student.vocab), "latency": latency_ms(detector.predict, test_texts,
                                                                         cfg.latency_messages),
                 "train": student_time, "parameters": sum(p.numel() for p in detector.model.parameters())}
    agree = sum(a == b for a, b in zip(teacher_pred, student_pred, strict=True)) / len(test_texts)
    gap = paired_difference([float(p == y) for p, y in zip(teacher_pred, test_labels, strict=True)],
                            [float(p == y) for p, y in zip(student_pred, test_labels, strict=True)], seed=cfg.seed)
    return {
        "examples": {s: len(rows) for s, rows in split.items()}, "augmented": len(extra),
        "dissatisfied_share": {s: round(sum(e.label for e in rows) / len(rows), 4) for s, rows in split.items()},
        "majority_rate_test": round(majority, 4),
        "teacher": teacher, "student": student_m,
        "size_ratio": round(teacher_bytes / student_bytes, 2),
        "accuracy_gap_points": round(100 * (teacher["accuracy"] - student_m["accuracy"]), 2),
        "accuracy_gap_ci": [round(x, 2) for x in gap["ci"]],  # paired: both on the same test messages
        "agreement_test": round(agree, 4), "threads": cfg.threads,
    }


# ---------------------------------------------------------------- the step
@step("routing.escalation", version=1, reads=("routing.escalation",), outputs=("student", "teacher?", "metrics"),
      code=("cogumi_tasks.routing.escalation_data", "cogumi_tasks.eval.tables", "cogumi_tasks.train.failures"))
def escalation_step(ctx: StepContext) -> StepOutput:
    """The escalation detector: fine-tune the teacher, distil the LSTM student, measure both on the test split.

    Data: ``routing.escalation.examples`` (judged JSONL) or, when empty, generated synthetic examples (tiny).
    Outputs: ``student`` (``student.safetensors`` + ``vocab.json``, what serving loads), ``teacher`` (only with
    ``save_teacher``; its size is measured either way), ``metrics`` (JSON: accuracy with 95% intervals, bytes,
    p50/p99 single-message latency, training time).
    """
    routing = ctx.config.routing
    if routing is None:
        raise StepFailed(f"config {ctx.config.name} has no routing section")
    cfg = routing.escalation
    if cfg.examples:
        examples = read_examples(ctx.fetch(cfg.examples), cfg.split, cfg.seed)
        data = f"judged examples from {cfg.examples}"
    else:
        examples = generate(cfg.generated, cfg.split, cfg.seed)
        data = "generated: synthetic template messages (tiny world), test split with unseen templates or fillers"
    teacher_dir = ctx.out("teacher") if cfg.save_teacher else ctx.tmp_dir / "teacher"
    metrics = {"data": data, **fit(examples, cfg, ctx.out("student"), teacher_dir)}
    ctx.out("metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    files = {"student": "student/", "metrics": "metrics.json"}
    if cfg.save_teacher:
        files["teacher"] = "teacher/"
    t, s = metrics["teacher"], metrics["student"]
    log.info("escalation: teacher %.3f %s, student %.3f %s on %d test messages; %d vs %d bytes (x%.1f); student "
             "p50 %.3f ms p99 %.3f ms", t["accuracy"], t["ci"], s["accuracy"], s["ci"], s["n"], t["bytes"],
             s["bytes"], metrics["size_ratio"], s["latency"]["p50_ms"], s["latency"]["p99_ms"])
    return StepOutput(files=files, metrics=metrics)
