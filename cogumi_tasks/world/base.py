"""The shared shape of a task family: instances as plain JSON data, deterministic generation, disjoint splits.

A family is a seeded generator of :class:`Instance` objects (an English prompt drawn from a few paraphrased
templates), a reference answer in one canonical format, a parser that recovers an instance from its prompt
text (the strong tier and the ``write N new tasks`` path use it) and a checker. Everything an instance
carries is JSON-serialisable, so suites, Phase 0 prompts, distillation and the cascade can store it as rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

Part = Literal["train", "heldout"]
HELDOUT_SHARE = 5  # one task key in five belongs to the held-out part


@dataclass(frozen=True)
class Instance:
    """One task. ``payload`` is what the checker needs (hidden tests, expected value, expected call)."""

    id: str
    domain: str
    family: str
    prompt: str
    reference: str
    payload: dict
    params: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> Instance:
        missing = [k for k in ("id", "domain", "family", "prompt", "reference", "payload", "params") if k not in row]
        if missing:
            raise ValueError(f"instance {row.get('id', '?')}: missing field(s) {', '.join(missing)}")
        return cls(**{k: row[k] for k in ("id", "domain", "family", "prompt", "reference", "payload", "params")})


def normalise_text(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: two prompts equal after this are the same prompt."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


_KEY_IGNORES: dict[str, tuple[str, ...]] = {}  # family -> parameters that do not make another task


def part_of(key: str) -> Part:
    """The part a task key belongs to, fixed by its hash: training data drawn from ``train`` never shares a task
    with suites drawn from ``heldout``, whatever seeds and sizes either uses."""
    return "heldout" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % HELDOUT_SHARE == 0 else "train"


def task_key(family: str, params: dict) -> str:
    """The identity of a task regardless of its wording: two paraphrases of one task share it (and so do two
    tool calls that differ only in the distractor tools listed with them)."""
    ignored = _KEY_IGNORES.get(family, ())
    return f"{family}:{canonical_json({k: v for k, v in params.items() if k not in ignored})}"


class Family:
    """Base class of a task family; subclasses fill in the five methods below."""

    name: ClassVar[str]
    domain: ClassVar[str]
    key_ignores: ClassVar[tuple[str, ...]] = ()  # parameters left out of the task key

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _KEY_IGNORES[cls.name] = cls.key_ignores

    def sample_params(self, rng: random.Random) -> dict:
        """Parameters of one task (JSON data)."""
        raise NotImplementedError

    def render(self, params: dict, rng: random.Random) -> str:
        """The English prompt for ``params``, in one of the family's paraphrased templates."""
        raise NotImplementedError

    def solve(self, params: dict) -> str:
        """The reference answer, in the family's canonical format."""
        raise NotImplementedError

    def payload(self, params: dict, rng: random.Random) -> dict:
        """What the checker needs (hidden tests, expected value or call); ``rng`` is seeded by the task key."""
        raise NotImplementedError

    def parse(self, prompt: str) -> dict | None:
        """The parameters of a prompt this family rendered (any template), or None."""
        raise NotImplementedError

    def check(self, instance: Instance, answer: str) -> tuple[bool, str]:
        """(ok, reason) for one answer; code families check in the sandbox through :func:`check_many`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def make(self, params: dict, prompt: str) -> Instance:
        """The instance for ``params`` worded as ``prompt``: id, reference and payload depend on ``params`` only."""
        key = task_key(self.name, params)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        payload = self.payload(params, random.Random(key))
        return Instance(id=f"{self.name}-{digest}", domain=self.domain, family=self.name, prompt=prompt,
                        reference=self.solve(params), payload=payload, params=params)

    def from_prompt(self, prompt: str) -> Instance | None:
        """The instance behind a prompt of this family (same id, reference and payload as generated), or None."""
        params = self.parse(prompt)
        return None if params is None else self.make(params, prompt)

    def generate(self, n: int, seed: int, exclude: Iterable[str] = (), part: Part | None = None) -> list[Instance]:
        """``n`` distinct instances, the same for the same seed. Tasks whose key or normalised prompt is in
        ``exclude`` (see :func:`keys_of`) are skipped, so a training set can be drawn around a held-out one;
        ``part`` keeps only tasks of that part (:func:`part_of`): the usual way to keep suites and data apart."""
        rng = random.Random(f"{self.name}:{seed}")
        seen = set(exclude)
        out: list[Instance] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"family {self.name}: only {len(out)} distinct instances of {n} asked (seed {seed})")
            params = self.sample_params(rng)
            prompt = self.render(params, rng)
            key = task_key(self.name, params)
            keys = {key, "text:" + normalise_text(prompt)}
            if keys & seen or (part is not None and part_of(key) != part):
                continue
            seen |= keys
            out.append(self.make(params, prompt))
        return out


def keys_of(instances: Iterable[Instance]) -> set[str]:
    """Every instance's task key and normalised prompt: what a disjoint set must not share."""
    out: set[str] = set()
    for inst in instances:
        out.add(task_key(inst.family, inst.params))
        out.add("text:" + normalise_text(inst.prompt))
    return out


def assert_disjoint(train: Iterable[Instance], held_out: Iterable[Instance]) -> None:
    """Raise ValueError naming the first overlapping instances (same task or same normalised prompt)."""
    held = list(held_out)
    index = {}
    for inst in held:
        for k in keys_of([inst]):
            index[k] = inst.id
    clashes = [(t.id, index[k]) for t in train for k in keys_of([t]) if k in index]
    if clashes:
        shown = ", ".join(f"{a} ~ {b}" for a, b in clashes[:5])
        raise ValueError(f"{len(clashes)} training instance(s) overlap the held-out set: {shown}")


def split(instances: list[Instance], held_out: int, seed: int = 0) -> tuple[list[Instance], list[Instance]]:
    """(train, held_out): ``held_out`` instances picked by seed; every training instance that shares a task key
    or a normalised prompt with a held-out one is dropped, so the two never overlap."""
    if not 0 <= held_out <= len(instances):
        raise ValueError(f"cannot hold out {held_out} of {len(instances)} instances")
    order = list(range(len(instances)))
    random.Random(f"split:{seed}").shuffle(order)
    held = [instances[i] for i in sorted(order[:held_out])]
    banned = keys_of(held)
    train = [instances[i] for i in sorted(order[held_out:]) if not (keys_of([instances[i]]) & banned)]
    assert_disjoint(train, held)
    return train, held
