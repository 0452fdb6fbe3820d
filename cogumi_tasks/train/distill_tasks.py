"""New practice tasks for targeted distillation: per failure pattern, written by a teacher and judged.

A failure cluster's examples that are tiny-world tasks (their prompt parses back to an instance of a family of
:mod:`cogumi_tasks.world`) go to the teacher that answers that family (the strong tier in the tiny config) as one
``tasks_request(family, examples, n)``; its reply (``parse_tasks_reply``) gives prompts with answers, each prompt
is read back to its instance, and a task of the held-out part is dropped and counted, so distillation never
trains on a task the suites evaluate. The other examples keep the LLM path: the teacher that answers general
prompts writes one task per request and answers it. Every answer is judged through the one judge interface
(:func:`cogumi_tasks.world.judge.judge_rows`: the checker where a row carries its task, else the LLM judge).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from cogumi_tasks.core.config import DistillConfig, PipelineConfig, TeacherConfig
from cogumi_tasks.core.records import Quarantine
from cogumi_tasks.core.steps import StepContext, StepFailed

log = logging.getLogger("cogumi")

TASK_SYSTEM = (
    "You write practice tasks for a student model. Given tasks the student got wrong, write ONE new task of "
    "the same kind and difficulty, different from the examples. Reply with the task text only."
)
EXAMPLE_CHARS = 300
WORLD_TOKENS_PER_TASK = 250  # tasks_request's advice: a task with its answer fits in about 210 of its tokens
MAX_WORLD_TASKS = 50  # per request (the strong tier refuses more)


def distill_teacher(config: PipelineConfig, cfg: DistillConfig, family: str | None) -> TeacherConfig:
    """The teacher that writes tasks like ``family``'s (None: general prompts): ``train.distill.teacher`` when it
    answers them, else the last configured teacher that does (teachers are listed cheapest first)."""

    def answers(t: TeacherConfig) -> bool:
        return t.families is None or (family is not None and family in t.families)

    if cfg.teacher and answers(config.teacher(cfg.teacher)):
        return config.teacher(cfg.teacher)
    eligible = [t for t in config.teachers if answers(t)]
    if not eligible:
        what = f"family {family!r}" if family else "general prompts"
        raise StepFailed(f"train.distill: no teacher answers {what} (see teachers.*.families)")
    return eligible[-1]


def world_family(example: dict) -> str | None:
    """The task family a failed item's prompt belongs to, or None (not a tiny-world task)."""
    from cogumi_tasks.world import instance_from_prompt

    inst = instance_from_prompt(str(example.get("prompt") or ""))
    return inst.family if inst else None


def split_examples(cluster: dict) -> tuple[dict[str, list[str]], list[dict]]:
    """(family -> the prompts of the cluster's world examples of that family, the other examples)."""
    world: dict[str, list[str]] = {}
    other = []
    for ex in cluster.get("examples") or []:
        fam = world_family(ex)
        if fam:
            world.setdefault(fam, []).append(str(ex["prompt"]))
        else:
            other.append(ex)
    return world, other


def task_request(cluster: dict, index: int, cfg: DistillConfig) -> Any:
    """Ask the teacher for one new task like the cluster's examples (``index`` seeds the variation)."""
    from cogumi_tasks.llm.client import ChatRequest

    examples = "\n".join(f"{i}. {' '.join(str(ex.get('prompt', '')).split())[:EXAMPLE_CHARS]}"
                         for i, ex in enumerate(cluster["examples"], 1))
    user = (f"Failure pattern: {cluster.get('label') or 'unlabelled'}\nTasks the student got wrong:\n{examples}\n\n"
            f"Write new task number {index + 1}.")
    return ChatRequest(messages=[{"role": "system", "content": TASK_SYSTEM}, {"role": "user", "content": user}],
                       max_tokens=cfg.task_max_tokens, temperature=cfg.temperature, seed=index)


def parse_task(text: str) -> str:
    """A usable task text; raises ValueError (the client resamples) on an empty or trivial one."""
    task = text.strip()
    if len(task.split()) < 3:
        raise ValueError(f"task too short: {task[:60]!r}")
    return task


def world_request(family: str, prompts: list[str], n: int, seed: int) -> Any:
    """``n`` new tasks like ``prompts`` (of ``family``) in one request, the strong tier's format."""
    from cogumi_tasks.llm.client import ChatRequest
    from cogumi_tasks.world.strong_tier import tasks_request

    return ChatRequest(messages=[{"role": "user", "content": tasks_request(family, prompts, n)}],
                       max_tokens=WORLD_TOKENS_PER_TASK * n, temperature=0.0, seed=seed)


def validate_tasks_reply(text: str) -> list[dict]:
    """The reply's tasks; ValueError (the client resamples) when malformed or empty."""
    from cogumi_tasks.world.strong_tier import parse_tasks_reply

    tasks = parse_tasks_reply(text)
    if not tasks:
        raise ValueError("tasks reply holds no task")
    return tasks


def world_rows(text: str, family: str, base: dict) -> tuple[list[dict], Counter]:
    """Rows to judge from a tasks reply: each task read back to its instance of ``family`` (``task``), its
    answer as ``response``. Counts ``received``, ``unparsed`` (not a prompt of the family) and
    ``dropped_heldout`` (a task of the held-out part: never trained on)."""
    from cogumi_tasks.world import instance_from_prompt, part_of
    from cogumi_tasks.world.base import task_key

    rows, counts = [], Counter()
    for t in validate_tasks_reply(text):
        counts["received"] += 1
        inst = instance_from_prompt(t["prompt"], family)
        if inst is None:
            counts["unparsed"] += 1
        elif part_of(task_key(inst.family, inst.params)) == "heldout":
            counts["dropped_heldout"] += 1
        else:
            rows.append({**base, "id": f"{base['id']}-{len(rows)}", "prompt": t["prompt"], "response": t["answer"],
                         "domain": inst.domain, "task": inst.to_dict()})
    return rows, counts


def _add_costs(a: dict, b: dict) -> dict:
    """Two ledger totals (:func:`cogumi_tasks.core.ledger.summarize`) as one."""
    out = {k: a.get(k, 0) + b.get(k, 0) for k in ("calls", "cached_calls", "prompt_tokens", "completion_tokens", "usd")}
    per: dict[str, dict] = {}
    for side in (a, b):
        for name, row in (side.get("per_endpoint") or {}).items():
            per[name] = {k: per.get(name, {}).get(k, 0) + v for k, v in row.items()}
    return {**out, "per_endpoint": per}


def write_examples(ctx: StepContext, cfg: DistillConfig, clusters: list[dict],
                   quarantine: Quarantine) -> tuple[list[dict], dict, list[dict]]:
    """New (prompt, response) pairs per pattern, judged; returns (judged rows, counts, per-cluster counts).

    Per cluster and path (a world family, or ``general``): ``asked`` (tasks requested), ``received``,
    ``unparsed``, ``dropped_heldout``, ``judged``, ``verified`` (the checker passed); ``kept`` is filled in
    by the caller after the threshold and the duplicate check."""
    from cogumi_tasks.llm.client import ChatRequest, ChatResult
    from cogumi_tasks.llm.step_calls import ask, finish_calls, make_client, make_ledger
    from cogumi_tasks.world.judge import PASS_SCORE, judge_rows

    source = ctx.input("clusters")
    per: dict[tuple[int, str], Counter] = {}
    slots: list[tuple[dict, int]] = []  # (cluster with its general examples, index): the LLM path
    world_jobs: list[tuple[dict, str, list[str]]] = []
    for c in clusters:
        fams, other = split_examples(c)
        for fam, prompts in sorted(fams.items()):
            world_jobs.append((c, fam, prompts))
            per[(c["id"], fam)] = Counter(asked=min(cfg.examples_per_pattern, MAX_WORLD_TASKS))
        if other:
            slots += [({**c, "examples": other}, i) for i in range(cfg.examples_per_pattern)]
            per[(c["id"], "general")] = Counter(asked=cfg.examples_per_pattern)
    general = distill_teacher(ctx.config, cfg, None) if slots else None
    teachers = {fam: distill_teacher(ctx.config, cfg, fam) for _, fam, _ in world_jobs}
    ledger = make_ledger(ctx)

    async def run() -> list[dict]:
        results: list = []
        clients: dict[str, Any] = {}

        def client_for(t: TeacherConfig):
            if t.name not in clients:
                clients[t.name] = make_client(ctx, t, ledger)
            return clients[t.name]

        rows: list[dict] = []
        try:
            replies = await asyncio.gather(*(
                ask(ctx, client_for(teachers[fam]), [world_request(fam, prompts, per[(c["id"], fam)]["asked"],
                                                                   c["id"])],
                    validate_tasks_reply, tag=f"world-{fam}-{c['id']}") for c, fam, prompts in world_jobs))
            for (c, fam, _), res in zip(world_jobs, replies, strict=True):
                results += res
                base = {"id": f"c{c['id']}-{fam}", "cluster": c["id"], "pattern": c.get("label"), "family": fam,
                        "teacher": teachers[fam].name}
                if isinstance(res[0], ChatResult):
                    got, counts = world_rows(res[0].text, fam, base)
                    rows += got
                    per[(c["id"], fam)].update(counts)
                else:
                    quarantine.add(source, None, "tasks", f"cluster {c['id']} family {fam}: {res[0]}", None)
            if slots:
                client = client_for(general)
                tasks = await ask(ctx, client, [task_request(c, i, cfg) for c, i in slots], parse_task, tag="tasks")
                results += tasks
                written = []
                for (c, i), res in zip(slots, tasks, strict=True):
                    if isinstance(res, ChatResult):
                        per[(c["id"], "general")]["received"] += 1
                        written.append({"id": f"c{c['id']}-general-{i}", "cluster": c["id"], "pattern": c.get("label"),
                                        "family": None, "prompt": parse_task(res.text), "teacher": general.name})
                    else:
                        quarantine.add(source, None, "task", f"cluster {c['id']} task {i}: {res}", None)
                system = ctx.config.dataset.generate.system_prompt
                answers = await ask(ctx, client, [
                    ChatRequest(messages=[{"role": "system", "content": system},
                                          {"role": "user", "content": r["prompt"]}],
                                max_tokens=cfg.answer_max_tokens, temperature=0.0, seed=0) for r in written],
                    tag="answers")
                results += answers
                for r, res in zip(written, answers, strict=True):
                    if isinstance(res, ChatResult) and res.text.strip():
                        rows.append({**r, "response": res.text.strip()})
                    else:
                        quarantine.add(source, None, "response", f"no usable answer: {res}", r)
        finally:
            for client in clients.values():
                await client.aclose()
            ledger.flush()
        finish_calls(ctx, ledger, results)
        return rows

    rows = asyncio.run(run()) if slots or world_jobs else []
    teacher_cost, ctx.cost = ctx.cost or {}, {}
    judged, judge_quarantine, _ = judge_rows(ctx, rows, source=source) if rows else ([], Quarantine(), {})
    ctx.cost = _add_costs(teacher_cost, ctx.cost or {})
    for q in judge_quarantine.rows:
        quarantine.rows.append(q)
    for r in judged:
        key = (r["cluster"], r.get("family") or "general")
        per[key]["judged"] += 1
        per[key]["verified"] += int(r.get("judge_kind") == "verifier" and r["judge_score"] == PASS_SCORE)
    by_cluster = [{"cluster": c, "path": p, **{k: n.get(k, 0) for k in ("asked", "received", "unparsed",
                                                                         "dropped_heldout", "judged", "verified")}}
                  for (c, p), n in sorted(per.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
    counts = {"requested": sum(r["asked"] for r in by_cluster), "judged": len(judged),
              "dropped_heldout": sum(r["dropped_heldout"] for r in by_cluster),
              "teachers": {**({"general": general.name} if general else {}),
                           **{fam: t.name for fam, t in teachers.items()}}}
    log.info("distill: %d tasks asked, %d judged, %d dropped as held-out", counts["requested"], len(judged),
             counts["dropped_heldout"])
    return judged, counts, by_cluster
