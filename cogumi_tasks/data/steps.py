"""Phase 0 steps: prompts -> generate (sharded) -> score (sharded) -> dedup -> publish.

Each is a registered step (see :mod:`cogumi_tasks.core.steps`): config and input URIs in,
output files and metrics out. Teacher and judge calls go through :mod:`cogumi_tasks.llm.client`,
so every call is cached, retried, priced and counted against the run's budget.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from cogumi_tasks.core.config import ConfigError, TeacherConfig, WorldPromptsConfig
from cogumi_tasks.core.records import (
    Quarantine,
    RecordError,
    check_error_rate,
    iter_jsonl_dicts,
    iter_records,
    read_lines,
    write_jsonl,
)
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.llm.step_calls import teacher_answers
from cogumi_tasks.world.judge import judge_rows, threshold

Domain = Literal["code", "reasoning", "automation", "general"]


class PromptRecord(BaseModel):
    """One line of a prompt file. Extra fields are allowed and carried along."""

    model_config = ConfigDict(extra="allow")
    id: str
    prompt: str
    domain: Domain

    @field_validator("id", "prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def balanced_head(records: list[PromptRecord], n: int) -> list[PromptRecord]:
    """The first ``n`` records taking domains in turn (file order within a domain), so a small
    limit still covers every domain; returned in file order."""
    by_domain: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_domain.setdefault(r.domain, []).append(i)
    picked: list[int] = []
    queues = [list(reversed(ix)) for ix in by_domain.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return [records[i] for i in sorted(picked)]


def split_by_weight(ids: list[str], weights: dict[str, float]) -> dict[str, str]:
    """Assign each id to a teacher so counts follow the weights exactly (largest remainder),
    in a deterministic order that does not depend on the file's order."""
    order = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    total = sum(weights.values())
    quotas = {t: len(ids) * w / total for t, w in weights.items()}
    counts = {t: int(q) for t, q in quotas.items()}
    for t in sorted(quotas, key=lambda t: quotas[t] - counts[t], reverse=True)[: len(ids) - sum(counts.values())]:
        counts[t] += 1
    out, pos = {}, 0
    for t in weights:
        for i in order[pos : pos + counts[t]]:
            out[i] = t
        pos += counts[t]
    return out


def world_rows(cfg: WorldPromptsConfig) -> list[dict]:
    """Prompt rows of the task families' train part: id, prompt and domain of the instance, ``task`` the
    instance itself (what the verifier judge checks the answer against)."""
    from cogumi_tasks.world import generate as generate_tasks

    return [{"id": inst.id, "prompt": inst.prompt, "domain": inst.domain, "task": inst.to_dict()}
            for name, n in cfg.families.items() for inst in generate_tasks(name, n, cfg.seed, part="train")]


def assign_teachers(rows: list[dict], teachers: list[TeacherConfig]) -> dict[str, str]:
    """id -> teacher: each row among the teachers eligible for it (a positive weight, and its family among the
    teacher's ``families``, or no ``families``: a general prompt only goes to those), by weight within each
    group of rows with the same eligible teachers (:func:`split_by_weight`)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in rows:
        fam = (r.get("task") or {}).get("family")
        names = tuple(t.name for t in teachers
                      if t.weight > 0 and (t.families is None or (fam is not None and fam in t.families)))
        if not names:
            what = f"of family {fam!r}" if fam else "a general prompt (no task)"
            raise ConfigError(f"teachers: no teacher with a positive weight answers prompt {r['id']!r}, {what}; "
                              "a teacher with families answers only prompts of those families")
        groups.setdefault(names, []).append(r["id"])
    weight = {t.name: t.weight for t in teachers}
    out: dict[str, str] = {}
    for names, ids in groups.items():
        out |= split_by_weight(ids, {n: weight[n] for n in names})
    return out


@step("data.prompts", version=3, reads=("dataset.prompts", "teachers"), inputs=("source",),
      outputs=("prompts", "shards", "quarantine"),
      code=("cogumi_tasks.core.records", "cogumi_tasks.world", "cogumi_tasks.world.base", "cogumi_tasks.world.code",
            "cogumi_tasks.world.reasoning", "cogumi_tasks.world.automation"),
      config_inputs={"source": "dataset.prompts.source"})
def prompts(ctx: StepContext) -> StepOutput:
    """Validate the prompt JSONL, add the task families' prompts (``dataset.prompts.world``: train-part
    instances, each row carrying its ``task``), assign teachers by the configured mix among those eligible for
    each prompt (``teachers.*.families``), and shard. A ``limit`` takes the first source prompts of each domain
    in turn; the world's prompts come on top.

    Inputs: ``source`` (s3://, a local path, or builtin:<name>). Outputs: ``prompts`` (all used
    prompts with their teacher), ``shards`` (one JSONL per shard), ``quarantine`` (bad lines).
    """
    cfg = ctx.config.dataset.prompts
    source = ctx.input("source")
    quarantine = Quarantine()
    seen: dict[str, int] = {}
    unique = []
    for line, rec in iter_records(ctx.fetch(source), PromptRecord, source, quarantine, cfg.max_record_bytes):
        if rec.id in seen:
            quarantine.add(source, line, "id", f"duplicate id: {rec.id!r} first at line {seen[rec.id]}",
                           rec.model_dump())
            continue
        seen[rec.id] = line
        unique.append(rec)
    total = len(unique) + len(quarantine)
    quarantine.write(ctx.out("quarantine.jsonl"))
    check_error_rate(f"prompts from {source}", len(quarantine), total, cfg.max_error_rate, quarantine)

    used = balanced_head(unique, cfg.limit) if cfg.limit else unique
    rows = [r.model_dump() for r in used]
    world = world_rows(cfg.world) if cfg.world else []
    clash = sorted({r["id"] for r in world} & set(seen))
    if clash:
        raise StepFailed(f"prompts from {source}: id {clash[0]!r} is also a task family instance's id")
    rows += world
    teacher_of = assign_teachers(rows, ctx.config.teachers)
    rows = [{**r, "teacher": teacher_of[r["id"]]} for r in rows]
    write_jsonl(ctx.out("prompts.jsonl"), rows)
    n_shards = max(1, min(cfg.shards, len(rows)))
    shard_files = []
    for s in range(n_shards):
        name = f"shards/shard-{s:04d}.jsonl"
        write_jsonl(ctx.out(name), rows[s::n_shards])
        shard_files.append(name)
    return StepOutput(
        files={"prompts": "prompts.jsonl", "shards": shard_files, "quarantine": "quarantine.jsonl"},
        metrics={
            "prompts_read": total,
            "prompts_quarantined": len(quarantine),
            "prompts": len(rows),
            "shards": n_shards,
            "source_prompts": len(used),
            "world_prompts": len(world),
            "per_domain": dict(Counter(r["domain"] for r in rows)),
            "per_teacher": dict(Counter(r["teacher"] for r in rows)),
            "per_family": dict(Counter(r["task"]["family"] for r in world)),
            "per_family_teacher": dict(Counter(f"{r['task']['family']}/{r['teacher']}" for r in rows if "task" in r)),
            "quarantine_reasons": quarantine.counts(),
        },
    )


@step("data.generate", version=1, reads=("teachers", "dataset.generate", "llm"), inputs=("shard",),
      outputs=("answers", "failed"), code=("cogumi_tasks.llm.step_calls",))
def generate(ctx: StepContext) -> StepOutput:
    """Teachers answer one shard of prompts. Every answer is cached as it arrives, so a killed
    task resumes without asking again.

    Inputs: ``shard`` (prompt JSONL with a ``teacher`` column). Outputs: ``answers``, ``failed``.
    """
    rows = list(iter_jsonl_dicts(ctx.fetch(ctx.input("shard"))))
    answers, failed, stats = teacher_answers(ctx, rows)
    answers.sort(key=lambda r: r["id"])
    write_jsonl(ctx.out("answers.jsonl"), answers)
    write_jsonl(ctx.out("failed.jsonl"), failed)
    rate = len(failed) / max(1, len(rows))
    if rate > ctx.config.dataset.generate.max_error_rate:
        raise StepFailed(
            f"generate: {len(failed)} of {len(rows)} prompts got no usable answer ({rate:.1%}), above "
            f"{ctx.config.dataset.generate.max_error_rate:.1%}; first: {failed[0]['reason'] if failed else ''}"
        )
    return StepOutput(
        files={"answers": "answers.jsonl", "failed": "failed.jsonl"},
        metrics={"prompts": len(rows), "answers_generated": len(answers), "generation_failed": len(failed),
                 "faults": stats, "cost": ctx.cost},
    )


@step("data.score", version=2, reads=("judge", "dataset.score", "llm"), inputs=("answers",),
      outputs=("kept", "rejected", "quarantine"),
      code=("cogumi_tasks.llm.step_calls", "cogumi_tasks.world.judge", "cogumi_tasks.world", "cogumi_tasks.world.base",
            "cogumi_tasks.world.code", "cogumi_tasks.world.reasoning", "cogumi_tasks.world.automation",
            "cogumi_tasks.world.answers", "cogumi_tasks.world.sandbox"))
def score(ctx: StepContext) -> StepOutput:
    """The judge scores each answer 1-10 (:func:`cogumi_tasks.world.judge.judge_rows`: the task's checker, 10 or 1,
    where a row carries a task and ``judge.kind`` allows it, else the LLM judge's JSON verdict); keep those >=
    the threshold (``llm_threshold`` for LLM verdicts when set).

    Inputs: ``answers``. Outputs: ``kept`` and ``rejected`` (both with judge_score, judge_reason and
    judge_kind), ``quarantine`` (answers whose verdict stayed unparseable after retries).
    """
    cfg = ctx.config.dataset.score
    rows = list(iter_jsonl_dicts(ctx.fetch(ctx.input("answers"))))
    judged, quarantine, stats = judge_rows(ctx, rows)
    kept = [r for r in judged if r["judge_score"] >= threshold(r, cfg)]
    rejected = [r for r in judged if r["judge_score"] < threshold(r, cfg)]
    outcome: dict[str, dict[str, Counter]] = {"per_domain": {}, "per_judge_kind": {}}
    for verdict, part in (("kept", kept), ("rejected", rejected)):
        for r in part:
            outcome["per_domain"].setdefault(r["domain"], Counter())[verdict] += 1
            outcome["per_judge_kind"].setdefault(r["judge_kind"], Counter())[verdict] += 1
    write_jsonl(ctx.out("kept.jsonl"), kept)
    write_jsonl(ctx.out("rejected.jsonl"), rejected)
    quarantine.write(ctx.out("quarantine.jsonl"))
    if rows:
        check_error_rate("judge verdicts", len(quarantine), len(rows), cfg.max_error_rate, quarantine)
    return StepOutput(
        files={"kept": "kept.jsonl", "rejected": "rejected.jsonl", "quarantine": "quarantine.jsonl"},
        metrics={
            "judged": len(judged),
            "passed_judge": len(kept),
            "rejected_by_judge": len(rejected),
            "judge_quarantined": len(quarantine),
            "score_histogram": {str(k): v for k, v in sorted(Counter(r["judge_score"] for r in judged).items())},
            **{k: {name: dict(c) for name, c in sorted(v.items())} for k, v in outcome.items()},
            "faults": stats["faults"],
            "cost": ctx.cost,
        },
    )


@step("data.dedup", version=1, reads=("dataset.dedup",), inputs=("scored",), outputs=("deduped", "dropped"),
      code=("cogumi_tasks.data.dedup", "cogumi_tasks.world.base"))
def dedup_step(ctx: StepContext) -> StepOutput:
    """Exact (normalised hash) then MinHash-LSH near-duplicate removal, keeping the best-scored
    record of each cluster. Every dropped record names the kept one and their Jaccard estimate.

    Inputs: ``scored`` (one or more kept-answer JSONL files). Outputs: ``deduped``, ``dropped``.
    """
    from cogumi_tasks.data.dedup import dedup

    cfg = ctx.config.dataset.dedup
    with RowsById([ctx.fetch(uri) for uri in ctx.input_list("scored")]) as rows:  # rows streamed, not held
        result = dedup(rows.mapped(lambda r: dedup_text(r, cfg.field)), rows.scores, num_perm=cfg.num_perm,
                       shingle_size=cfg.shingle_size, threshold=cfg.threshold, seed=cfg.seed, progress=True)
        dropped = [(d, k, "exact", 1.0) for d, k in result.exact_dropped]
        dropped += [(d, k, "near", round(j, 4)) for d, k, j in result.near_dropped]
        write_jsonl(ctx.out("deduped.jsonl"), map(rows.row, result.keep))
        write_jsonl(ctx.out("dropped.jsonl"), ({**rows.row(d), "duplicate_kind": kind, "duplicate_of": rows.ids[k],
                                                "jaccard": j} for d, k, kind, j in dropped))
    return StepOutput(
        files={"deduped": "deduped.jsonl", "dropped": "dropped.jsonl"},
        metrics={"records_in": len(rows.ids), "exact_duplicates": len(result.exact_dropped),
                 "near_duplicates": len(result.near_dropped), "records_out": len(result.keep)},
    )


class RowsById:
    """The rows of JSONL files this project wrote, in id order, re-readable without being held:
    one pass keeps each row's id, judge score, file and byte offset; a row is read again by offset.
    A context manager (it keeps the files open)."""

    def __init__(self, paths: list[Path]) -> None:
        index = []
        for f, path in enumerate(paths):
            for line in read_lines(path):
                if line.text is None:
                    raise RecordError(f"{path}:{line.number}: {line.problem}")
                try:
                    row = json.loads(line.text)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"{path}:{line.number}: invalid JSON: {exc.msg}") from None
                index.append((row["id"], f, line.offset, float(row["judge_score"])))
        index.sort()
        self.ids = [x[0] for x in index]
        self.scores = [x[3] for x in index]
        self._at = [(x[1], x[2]) for x in index]
        self._files = ExitStack()
        self._open = [self._files.enter_context(open(p, "rb")) for p in paths]

    def __enter__(self) -> RowsById:
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()

    def row(self, i: int) -> dict:
        """The i-th row in id order."""
        f, offset = self._at[i]
        self._open[f].seek(offset)
        return json.loads(self._open[f].readline())

    def mapped(self, fn: Callable[[dict], str]) -> Iterable[str]:
        """``fn`` of every row in id order, re-iterable: each iteration is a new pass over the files."""
        return _Mapped(self, fn)


@dataclass(frozen=True)
class _Mapped:
    rows: RowsById
    fn: Callable[[dict], str]

    def __iter__(self) -> Iterator[str]:
        return (self.fn(self.rows.row(i)) for i in range(len(self.rows.ids)))


def dedup_text(row: dict, field: str) -> str:
    """The text a row is deduplicated on. A row of the tiny world carries its task: two rows of one task are exact
    duplicates whatever their wording, and two distinct tasks never near-duplicates however alike their prompts
    read (``sum of squares of the even numbers`` vs ``... odd numbers``), so its text is a digest of the task key."""
    task = row.get("task")
    if task:
        from cogumi_tasks.world.base import task_key

        return "task " + hashlib.sha256(task_key(task["family"], task["params"]).encode()).hexdigest()
    if field == "prompt":
        return row["prompt"]
    if field == "response":
        return row["response"]
    return row["prompt"] + "\n" + row["response"]


FINAL_FIELDS = ("id", "prompt", "response", "domain", "teacher", "model", "judge_score", "judge_reason", "judge_kind",
                "task")


@step("data.publish", version=3, inputs=("deduped",), outputs=("dataset", "stats", "quarantine"))
def publish(ctx: StepContext) -> StepOutput:
    """The curated dataset with its stats and every quarantined record of the run's lineage.

    Inputs: ``deduped``. Outputs: ``dataset`` (JSONL of {id, prompt, response, domain, teacher,
    model, judge_score, judge_reason, judge_kind, task (the instance of a family prompt, else null)}),
    ``stats`` (JSON), ``quarantine`` (JSONL with a ``stage``).
    """
    from cogumi_tasks.core.artifacts import join_uri, lineage

    deduped = ctx.input("deduped")
    per_domain: Counter = Counter()
    per_teacher: Counter = Counter()

    def final_rows() -> Iterator[dict]:  # streamed: the dataset is never held in memory
        for r in iter_jsonl_dicts(ctx.fetch(deduped)):
            per_domain[r["domain"]] += 1
            per_teacher[r["teacher"]] += 1
            yield {k: r.get(k) for k in FINAL_FIELDS}

    write_jsonl(ctx.out("dataset.jsonl"), final_rows())

    dedup_manifest = ctx.store.producer_manifest(deduped)
    ancestors = [dedup_manifest, *lineage(ctx.store, dedup_manifest)] if dedup_manifest else []
    by_step: dict[str, list[dict]] = {}
    for m in ancestors:
        by_step.setdefault(m["step"], []).append(m)

    def quarantined() -> Iterator[dict]:
        for m in ancestors:
            for name in ("quarantine.jsonl", "failed.jsonl"):
                if name in m["files"] and m["files"][name]["size"]:
                    for row in iter_jsonl_dicts(ctx.fetch(join_uri(m["prefix"], name))):
                        yield {"stage": m["step"], **row}

    write_jsonl(ctx.out("quarantine.jsonl"), quarantined())
    stats = phase0_stats(by_step, per_domain, per_teacher)
    (ctx.out("stats.json")).write_text(json.dumps(stats, indent=1, sort_keys=True))
    return StepOutput(files={"dataset": "dataset.jsonl", "stats": "stats.json", "quarantine": "quarantine.jsonl"},
                      metrics=stats)


def _sum(manifests: list[dict], key: str) -> int:
    return sum(m["metrics"].get(key, 0) for m in manifests)


def _add(into: dict, other: dict) -> dict:
    for k, v in other.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        elif isinstance(v, int | float):
            into[k] = into.get(k, 0) + v
    return into


def _merge(manifests: list[dict], key: str) -> dict:
    out: dict = {}
    for m in manifests:
        _add(out, m["metrics"].get(key, {}))
    return out


def phase0_stats(by_step: dict[str, list[dict]], per_domain: Counter, per_teacher: Counter) -> dict:
    """Counts of every stage, faults retried, and cost, summed over the lineage's manifests; the final
    dataset's counts per domain and per teacher."""
    gen, sco, ded = by_step.get("data.generate", []), by_step.get("data.score", []), by_step.get("data.dedup", [])
    pro = by_step.get("data.prompts", [])
    faults: dict = {}
    cost: dict = {}
    for m in gen + sco:
        _add(faults, {m["step"].split(".")[1]: m["metrics"].get("faults", {})})
        _add(cost, m.get("cost", {}))
    return {
        "prompts": _sum(pro, "prompts"),
        "prompts_quarantined": _sum(pro, "prompts_quarantined"),
        "answers_generated": _sum(gen, "answers_generated"),
        "generation_failed": _sum(gen, "generation_failed"),
        "judged": _sum(sco, "judged"),
        "passed_judge": _sum(sco, "passed_judge"),
        "judge_quarantined": _sum(sco, "judge_quarantined"),
        "exact_duplicates": _sum(ded, "exact_duplicates"),
        "near_duplicates": _sum(ded, "near_duplicates"),
        "final_records": sum(per_domain.values()),
        "judge_score_histogram": _merge(sco, "score_histogram"),
        "scored_per_domain": _merge(sco, "per_domain"),
        "scored_per_judge_kind": _merge(sco, "per_judge_kind"),
        "prompts_per_family": _merge(pro, "per_family"),
        "per_domain": dict(per_domain),
        "per_teacher": dict(per_teacher),
        "faults": faults,
        "cost": cost,
    }
