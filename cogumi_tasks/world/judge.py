"""The one judge interface of the pipeline: a task's checker where the row carries a task, else the LLM judge.

``judge.kind`` (:class:`~cogumi_tasks.core.config.JudgeConfig`) picks it: ``llm`` sends every row to the judge
endpoint (:func:`cogumi_tasks.llm.step_calls.judge_answers`, a 1-10 verdict); ``verifier`` runs every row's
answer through the checker of its task's family (a row without a ``task`` is a config error); ``auto`` verifies
the rows that carry a ``task`` and sends the rest to the LLM. A verifier verdict is ``judge_score`` 10 (the
checker passed) or 1 (it failed), with the checker's reason as ``judge_reason``: code answers are judged by
running their hidden tests in the sandbox, one answer per sandboxed program (model output is untrusted), never
by a model's opinion. Every judged row gets ``judge_kind``: ``"verifier"`` or ``"llm"``. Phase 0 scoring, Phase 1
distillation and the evaluation harness call :func:`judge_rows`.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from cogumi_tasks.core.config import ConfigError, ScoreConfig
from cogumi_tasks.core.records import Quarantine
from cogumi_tasks.core.steps import StepContext, StepFailed

if TYPE_CHECKING:
    from cogumi_tasks.world.sandbox import Limits

PASS_SCORE, FAIL_SCORE = 10, 1
_INDEX = "_judge_index"  # a row's position, carried through the LLM judge so the output keeps the input's order


def judge_rows(ctx: StepContext, rows: list[dict], limits: Limits | None = None,
               source: str | None = None) -> tuple[list[dict], Quarantine, dict]:
    """Judge ``rows`` (each with ``prompt`` and ``response``; ``task`` an instance dict where it has one).

    Returns (judged rows in input order with ``judge_score``, ``judge_reason`` and ``judge_kind``; the quarantine
    of LLM verdicts unparseable after retries; stats ``{"faults": {endpoint: client counts}, "judge_kinds":
    {kind: n}, "per_domain": {domain: {kind: n}}}``). ``limits``: the sandbox's, for code answers (default
    limits when None); ``source``: the input URI quarantined rows name (default: the step's ``answers``).
    """
    kind = ctx.config.judge.kind
    if kind == "verifier":
        missing = [r.get("id", f"#{i}") for i, r in enumerate(rows) if r.get("task") is None]
        if missing:
            raise ConfigError(f"judge.kind is verifier but row {missing[0]!r} carries no task ({len(missing)} of "
                              f"{len(rows)} rows without one): use judge.kind auto (the LLM judges those) or llm")
    to_verify = [i for i, r in enumerate(rows) if kind != "llm" and r.get("task") is not None]
    verified = set(to_verify)
    to_llm = [i for i in range(len(rows)) if i not in verified]

    out: dict[int, dict] = {}
    for i, (ok, reason) in zip(to_verify, verify([rows[i] for i in to_verify], limits), strict=True):
        out[i] = {**rows[i], "judge_score": PASS_SCORE if ok else FAIL_SCORE, "judge_reason": reason,
                  "judge_kind": "verifier"}
    quarantine, faults = Quarantine(), {}
    if to_llm:
        from cogumi_tasks.llm.step_calls import judge_answers

        judged, quarantine, faults = judge_answers(ctx, [{**rows[i], _INDEX: i} for i in to_llm], source=source)
        for r in judged:
            i = r.pop(_INDEX)
            out[i] = {**r, "judge_kind": "llm"}
        for q in quarantine.rows:
            q["raw"].pop(_INDEX, None)
    result = [out[i] for i in sorted(out)]
    per_domain: dict[str, Counter] = {}
    for r in result:
        per_domain.setdefault(str(r.get("domain")), Counter())[r["judge_kind"]] += 1
    stats = {"faults": faults, "judge_kinds": dict(Counter(r["judge_kind"] for r in result)),
             "per_domain": {d: dict(c) for d, c in sorted(per_domain.items())}}
    return result, quarantine, stats


def verify(rows: list[dict], limits: Limits | None = None) -> list[tuple[bool, str]]:
    """(ok, reason) per row from the checker of its ``task``; code answers run one per sandboxed program."""
    from cogumi_tasks.world import FAMILIES, Instance, check_many

    instances = []
    for r in rows:
        try:
            inst = Instance.from_dict(r["task"]) if isinstance(r["task"], dict) else None
        except (TypeError, ValueError) as exc:
            raise StepFailed(f"row {r.get('id')!r}: its task is not an instance: {exc}") from None
        if inst is None or inst.family not in FAMILIES:
            what = f"family {inst.family!r}" if inst else f"a {type(r['task']).__name__}"
            raise StepFailed(f"row {r.get('id')!r}: its task has {what}, not one of {', '.join(sorted(FAMILIES))}")
        instances.append(inst)
    if any(inst.domain == "code" for inst in instances):
        from cogumi_tasks.world.sandbox import check_available

        try:
            check_available()
        except RuntimeError as exc:
            raise StepFailed(f"the verifier judge runs code answers in the sandbox: {exc}") from None
    return check_many(instances, [str(r.get("response", "")) for r in rows], limits, code_batch=1)


def threshold(row: dict, cfg: ScoreConfig) -> int:
    """The score a judged row needs to be kept: ``threshold``, or ``llm_threshold`` (when set) for LLM verdicts."""
    if row.get("judge_kind") == "llm" and cfg.llm_threshold is not None:
        return cfg.llm_threshold
    return cfg.threshold
