"""A tiny world of verifiable tasks: families per domain, each a seeded generator, a reference and a checker.

Families: ``list_fn`` (code: small list functions, checked by hidden tests in the sandbox), ``word_arith``
(reasoning: 2-3 step word problems, exact match on the ``Answer: <n>`` line) and ``tool_call`` (automation: one
JSON tool call, checked by JSON equivalence). Instances are JSON data (:meth:`Instance.to_dict`); a strong-tier
server that answers them stands in for GPT-5/GPT-4o-class teachers (:mod:`cogumi_tasks.world.strong_tier`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogumi_tasks.world.automation import ToolCalls
from cogumi_tasks.world.base import Family, Instance, Part, assert_disjoint, keys_of, normalise_text, part_of, split
from cogumi_tasks.world.code import ListFunctions
from cogumi_tasks.world.code import check_many as _check_code
from cogumi_tasks.world.reasoning import WordArithmetic

if TYPE_CHECKING:
    from cogumi_tasks.world.sandbox import Limits

FAMILIES: dict[str, Family] = {f.name: f for f in (ListFunctions(), WordArithmetic(), ToolCalls())}
BY_DOMAIN: dict[str, str] = {f.domain: f.name for f in FAMILIES.values()}

__all__ = ["BY_DOMAIN", "FAMILIES", "Family", "Instance", "assert_disjoint", "check", "check_many", "family",
           "generate", "instance_from_prompt", "keys_of", "normalise_text", "part_of", "split"]


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown task family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def generate(name: str, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset(),
             part: Part | None = None) -> list[Instance]:
    """``n`` distinct instances of family ``name``; the same list for the same seed. ``part="train"`` for data,
    ``"heldout"`` for suites: the two never share a task (:func:`part_of`)."""
    return family(name).generate(n, seed, exclude, part)


def check(instance: Instance, answer: str) -> tuple[bool, str]:
    """(ok, reason) for one answer to one instance (code answers run in the sandbox)."""
    return family(instance.family).check(instance, answer)


def check_many(instances: list[Instance], answers: list[str], limits: Limits | None = None, workers: int = 2,
               code_batch: int = 1) -> list[tuple[bool, str]]:
    """(ok, reason) per answer; code answers run together in the sandbox, ``code_batch`` per program (keep 1 for
    untrusted answers: a batch shares one process)."""
    if len(instances) != len(answers):
        raise ValueError(f"{len(instances)} instances but {len(answers)} answers")
    out: list[tuple[bool, str] | None] = [None] * len(instances)
    code = [i for i, inst in enumerate(instances) if inst.family == ListFunctions.name]
    for i, inst in enumerate(instances):
        if inst.family != ListFunctions.name:
            out[i] = check(inst, answers[i])
    if code:
        verdicts = _check_code([instances[i] for i in code], [answers[i] for i in code], limits, workers, code_batch)
        for i, v in zip(code, verdicts, strict=True):
            out[i] = v
    return [v for v in out if v is not None]


def instance_from_prompt(prompt: str, family_name: str | None = None) -> Instance | None:
    """The instance a family prompt was rendered from (any family, or only ``family_name``), or None."""
    names = [family_name] if family_name else list(FAMILIES)
    for name in names:
        inst = family(name).from_prompt(prompt)
        if inst is not None:
            return inst
    return None
