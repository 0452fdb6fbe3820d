"""Examples for the escalation detector: a user's next message after an assistant answer, labelled dissatisfied
(1: wrong, not what was asked, try again, a complaint) or satisfied/neutral (0: thanks, a follow-on question).

Production reads teacher-written, judged examples from a JSONL file. The tiny world has none: :func:`generate`
makes them from seeded templates and fillers, and its test split is built from templates or fillers that the
train and validation splits never use, so held-out accuracy measures more than recall of the training strings.
These generated examples are synthetic; they say nothing about real users' phrasing.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cogumi_tasks.core.records import RecordError, read_jsonl

SPLITS = ("train", "val", "test")
LABELS = {"satisfied": 0, "neutral": 0, "dissatisfied": 1}


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 dissatisfied, 0 satisfied or neutral
    split: str
    template: str | None = None  # generated examples: the template it was rendered from


# {x}: what the assistant produced; {y}: what the user asks next. Every fourth template and filler is kept for
# the test split only (see generate()).
DISSATISFIED = [
    "that's wrong", "this is wrong", "{x} is wrong", "{x} is incorrect", "no, {x} is not right",
    "that is not what I asked", "not what I asked for", "you didn't answer my question",
    "that doesn't answer the question", "try again", "please try again, {x} is off", "wrong again",
    "you misunderstood me", "that's not what I meant", "you ignored what I said about {x}", "this makes no sense",
    "{x} doesn't work", "{x} fails when I run it", "still broken", "useless answer", "that was unhelpful",
    "you got {x} completely wrong", "are you even reading my question?", "this is nonsense",
    "no no no, redo {x}", "I already told you that's not it", "that's the same wrong answer as before",
    "can you actually answer what I asked?", "let me rephrase: I asked about {x}, not this",
    "I said {y}, you did something else", "why did you change {x}? I never asked for that",
    "this is worse than before", "seriously? {x} is still wrong", "nope", "that's incorrect, check {x} again",
    "I need a real answer, not this", "you keep making the same mistake in {x}", "you made that up",
]
SATISFIED = [
    "thanks", "thank you, that works", "thanks, {x} looks right", "perfect, thank you", "great, that helps",
    "that's exactly what I needed", "ok, got it", "makes sense now", "awesome, {x} works",
    "can you also {y}?", "now could you {y}?", "next, please {y}", "what if I wanted to {y}?",
    "how would I {y}?", "nice. can you {y} as well?", "could you explain {x} a bit more?",
    "why does {x} work that way?", "cool, and how do I {y}?", "good, now {y}", "one more thing: {y}",
    "that's right, thanks", "{x} is correct, thank you", "works for me", "appreciate it",
    "brilliant, that solved it", "ok and what about {x} in the general case?", "great answer",
    "I see, so {x} handles that. can you {y}?", "thanks! how long would {x} take on a big input?",
    "helpful, thank you. please {y}", "yes, that's it", "excellent, {x} is what I wanted",
]
X_FILLERS = [
    "the answer", "the result", "that code", "the function", "your list", "the total", "the date", "step two",
    "the sql query", "the regex", "the loop", "the summary", "the json", "the tool call", "the calculation",
    "the output", "the sorting", "the translation", "the email draft", "the last line",
]
Y_FILLERS = [
    "sort it in reverse", "add error handling", "write a test for it", "make it shorter", "convert it to json",
    "explain the second step", "do the same for march", "handle empty input", "use a dictionary instead",
    "add type hints", "schedule it for monday", "round to two decimals", "translate it to french",
    "make it run faster", "print each item", "count the words",
]
OPENERS = ["", "", "", "hmm, ", "ok, ", "well, ", "ugh. ", "look, ", "so ", "hey, "]
CLOSERS = ["", "", "", ".", "!", " please", "...", "?"]


def _held(items: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """(seen, held out): a seeded quarter of ``items`` is kept for the test split."""
    order = items[:]
    rng.shuffle(order)
    held = set(order[::4])
    return [i for i in items if i not in held], [i for i in items if i in held]


def _render(template: str, xs: list[str], ys: list[str], rng: random.Random) -> str:
    text = template.format(x=rng.choice(xs), y=rng.choice(ys))
    text = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text


def held_out(seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """(seen, held out) templates per label (``"1"``, ``"0"``) and fillers (``"x"``, ``"y"``) for a seed."""
    rng = random.Random(seed)
    return {"1": _held(DISSATISFIED, rng), "0": _held(SATISFIED, rng), "x": _held(X_FILLERS, rng),
            "y": _held(Y_FILLERS, rng)}


def generate(n: int, shares: tuple[float, float, float], seed: int = 0) -> list[Example]:
    """``n`` synthetic examples, about half dissatisfied, split by ``shares`` (train, val, test). Train and
    val use three quarters of the templates and fillers (:func:`held_out`); every test example has an unseen
    template or unseen fillers (or both)."""
    held = held_out(seed)
    rng = random.Random(seed + 1)
    parts = {label: held[str(label)] for label in (0, 1)}
    xs_seen, xs_held = held["x"]
    ys_seen, ys_held = held["y"]
    n_test = max(2, round(n * shares[2]))
    n_val = max(2, round(n * shares[1]))
    out: list[Example] = []
    seen_texts: set[str] = set()
    for split, count in (("train", n - n_val - n_test), ("val", n_val), ("test", n_test)):
        made = tries = 0
        while made < count:
            tries += 1
            if tries > 200 * count:
                raise ValueError(f"generate: cannot make {count} distinct {split} examples (n={n} is too large)")
            label = made % 2 if split != "train" else rng.randrange(2)
            seen_t, held_t = parts[label]
            if split != "test":
                template = rng.choice(seen_t)
                text = _render(template, xs_seen, ys_seen, rng)
            elif rng.random() < 0.5:
                template = rng.choice(held_t)
                text = _render(template, X_FILLERS, Y_FILLERS, rng)
            else:  # a seen template with held-out fillers: only templates with a slot
                template = rng.choice([t for t in seen_t if "{" in t])
                text = _render(template, xs_held, ys_held, rng)
            if text in seen_texts:
                continue
            seen_texts.add(text)
            out.append(Example(text, label, split, template))
            made += 1
    return out


def read_examples(path: Path, shares: tuple[float, float, float], seed: int = 0) -> list[Example]:
    """Judged examples from JSONL: ``{"text": str, "label": 0|1|"satisfied"|"neutral"|"dissatisfied",
    "split"?: "train"|"val"|"test"}``. Either every row names its split or none does (then a seeded shuffle
    splits them by ``shares``). A bad row raises naming the file, line and field."""
    rows: list[tuple[str, int, str | None]] = []
    for n, raw in read_jsonl(path):
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{n}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path}:{n}: a row must be a JSON object")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{path}:{n}: field 'text': a non-empty string is required")
        label = row.get("label")
        if isinstance(label, str) and label in LABELS:
            label = LABELS[label]
        if isinstance(label, bool) or label not in (0, 1):
            raise RecordError(f"{path}:{n}: field 'label': {label!r} is not 0, 1 or one of {sorted(LABELS)}")
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise RecordError(f"{path}:{n}: field 'split': {split!r} is not one of {list(SPLITS)}")
        rows.append((text, int(label), split))
    if not rows:
        raise RecordError(f"{path}: no examples")
    named = {s is not None for _, _, s in rows}
    if len(named) > 1:
        raise RecordError(f"{path}: some rows name a split and some do not: name it on every row or on none")
    if named == {True}:
        out = [Example(t, label, s) for t, label, s in rows]
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_train = round(len(rows) * shares[0])
        n_val = round(len(rows) * shares[1])
        split_of = {i: "train" if k < n_train else "val" if k < n_train + n_val else "test"
                    for k, i in enumerate(order)}
        out = [Example(t, label, split_of[i]) for i, (t, label, _) in enumerate(rows)]
    for split in SPLITS:
        if not any(e.split == split for e in out):
            raise RecordError(f"{path}: the {split} split is empty ({len(out)} examples)")
    return out
