"""Phase 3's teacher cascade: the compressed base on a domain's tasks, then tiers of teachers on what it failed.

``modifiers.test`` answers a modifier's ``tasks`` suite with the compressed base (Phase 2's GGUF with its recovery
LoRA, greedy, in llama.cpp) and judges every answer through :func:`cogumi_tasks.world.judge.judge_rows` (a world
task's checker, else the LLM judge); what fails is ``remaining``. ``modifiers.tier`` sends the first ``max_items``
of ``remaining`` to tier K's teacher (after ``shots`` worked examples of the task's family, if set) in best-of-k
rounds (round j: sample j, seed j, only the items not solved yet), judges each answer the same way and keeps the
first that passes (``solved``: the modifier's training data); the rest goes on to tier K+1. Rows passed between
the steps: ``{id, domain, prompt, messages, task?, reason}``.

A refusal (HTTP 4xx: the strong tier refuses a prompt outside its families) leaves the item in ``remaining``; an
outage (5xx or timeouts after the client's retries) or a spent budget fails the step naming modifier, tier and
teacher. Every answer that arrived is in the response cache, so clearing the task re-runs it without paying twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cogumi_tasks.core.records import iter_jsonl_dicts, write_jsonl
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.modifiers import step_modifier

log = logging.getLogger("cogumi")

WORLD_CODE = ("cogumi_tasks.world", "cogumi_tasks.world.answers", "cogumi_tasks.world.automation",
              "cogumi_tasks.world.base", "cogumi_tasks.world.code", "cogumi_tasks.world.judge",
              "cogumi_tasks.world.reasoning", "cogumi_tasks.world.sandbox")
CARRIED = ("id", "domain", "prompt", "messages", "task")  # what a remaining row keeps of its task


def task_rows(ctx: StepContext, mod: Any) -> list[dict]:
    """The modifier's tasks as rows: a world suite's ``n`` train-part instances (never the held-out part) with
    their ``task``, any other suite's items as the evaluation harness loads them (no ``task``: the LLM judges)."""
    suite = mod.tasks
    if suite.kind == "world":
        from cogumi_tasks.world import generate

        insts = generate(suite.family, suite.n, suite.seed, part="train")
        rows = [{"id": i.id, "domain": i.domain, "prompt": i.prompt,
                 "messages": [{"role": "user", "content": i.prompt}], "task": i.to_dict()} for i in insts]
    else:
        from cogumi_tasks.eval.suites import load_suite

        rows = [{"id": it.id, "domain": it.domain, "prompt": it.messages[-1]["content"], "messages": it.messages}
                for it in load_suite(suite, ctx.fetch)]
    return rows[: suite.limit] if suite.limit else rows


def judged_by_id(ctx: StepContext, rows: list[dict], source: str) -> tuple[dict[str, dict], dict]:
    """Each row's verdict by id (``passed``: the score reaches the threshold; a verdict quarantined as
    unparseable is a fail), and the judge's cost (its ledger totals, {} when only checkers judged)."""
    from cogumi_tasks.world.judge import judge_rows, threshold

    ctx.cost = {}
    judged, quarantine, _ = judge_rows(ctx, rows, source=source)
    out = {r["id"]: {**r, "passed": r["judge_score"] >= threshold(r, ctx.config.dataset.score)} for r in judged}
    for q in quarantine.rows:
        raw = q["raw"]
        out[raw["id"]] = {**raw, "passed": False, "judge_score": None, "judge_kind": "llm",
                          "judge_reason": q["reason"]}
    return out, ctx.cost or {}


def teacher_messages(rows: list[dict], mod: Any, tier_k: int, shots: int) -> dict[str, list[dict]]:
    """Each row's messages as tier ``tier_k``'s teacher gets them: with ``shots`` > 0, a world task's messages come
    after that many worked examples of its family (user prompt, assistant reference), drawn from the train part
    with seed ``tier_k`` and sharing no task with the modifier's tasks or the rows. Rows without a family, and
    every row when ``shots`` is 0, keep their own messages. The solved rows keep theirs too: the modifier learns
    to answer without examples."""
    families = sorted({r["task"]["family"] for r in rows if r.get("task")})
    if not shots or not families:
        return {r["id"]: r["messages"] for r in rows}
    from cogumi_tasks.eval.suites import worked_examples
    from cogumi_tasks.world import Instance, generate, keys_of

    known = [Instance.from_dict(r["task"]) for r in rows if r.get("task")]
    if mod.tasks.kind == "world":
        known += generate(mod.tasks.family, mod.tasks.n, mod.tasks.seed, part="train")
    turns = {fam: worked_examples(fam, shots, tier_k, exclude=keys_of(known)) for fam in families}
    return {r["id"]: turns[r["task"]["family"]] + r["messages"] if r.get("task") else r["messages"] for r in rows}


@step("modifiers.test", version=1, reads=("modifiers", "judge", "llm", "dataset.score", "eval.max_tokens"),
      inputs=("gguf", "lora"), outputs=("items", "remaining"),
      code=("cogumi_tasks.modifiers", "cogumi_tasks.eval.backends", "cogumi_tasks.eval.suites",
            "cogumi_tasks.llm.step_calls", *WORLD_CODE))
def test_base(ctx: StepContext) -> StepOutput:
    """The compressed base on the modifier's tasks (params ``modifier``): answered greedily in llama.cpp, judged
    through the one judge interface; the failures are the cascade's input.

    Inputs: ``gguf`` (Phase 2's Q5_K_M GGUF), ``lora`` (optional: its recovery GGUF LoRA). Outputs: ``items``
    (every task with the base's ``response``, ``passed``, ``judge_score``, ``judge_reason``), ``remaining`` (the
    failed tasks: id, domain, prompt, messages, task where it has one, ``reason``).
    """
    from cogumi_tasks.eval.backends import GGUFBackend

    mod = step_modifier(ctx)
    if ctx.config.eval is None:
        raise StepFailed(f"{ctx.spec.name}: config {ctx.config.name} has no eval section (eval.max_tokens: the "
                         "length of the base's answers)")
    rows = task_rows(ctx, mod)
    lora = ctx.inputs.get("lora") or None
    log.info("modifiers.test %s: %d %s tasks for the base %s%s", mod.name, len(rows), mod.domain,
             ctx.input("gguf"), f" with {lora}" if lora else "")
    backend = GGUFBackend(ctx.fetch(ctx.input("gguf")), ctx.fetch(str(lora)) if lora else None,
                          name=f"base/{mod.name}")
    try:
        answers = backend.generate([r["messages"] for r in rows], mod.tasks.max_tokens or ctx.config.eval.max_tokens)
    finally:
        backend.close()
    verdicts, judge_cost = judged_by_id(ctx, [{**r, "response": g.text} for r, g in zip(rows, answers, strict=True)],
                                        ctx.input("gguf"))
    items = []
    for r, g in zip(rows, answers, strict=True):
        v = verdicts[r["id"]]
        items.append({**r, "response": g.text, "error": g.error, "passed": v["passed"],
                      "judge_score": v["judge_score"], "judge_kind": v["judge_kind"], "reason": v["judge_reason"]})
    remaining = [{**{k: r[k] for k in CARRIED if k in r}, "reason": r["reason"]} for r in items if not r["passed"]]
    write_jsonl(ctx.out("items.jsonl"), items)
    write_jsonl(ctx.out("remaining.jsonl"), remaining)
    passed = len(items) - len(remaining)
    log.info("modifiers.test %s: the base passed %d of %d", mod.name, passed, len(items))
    ctx.cost = judge_cost
    return StepOutput(files={"items": "items.jsonl", "remaining": "remaining.jsonl"},
                      metrics={"modifier": mod.name, "domain": mod.domain, "tested": len(items), "passed": passed,
                               "failed": len(remaining), "accuracy": passed / len(items) if items else None,
                               "base": ctx.input("gguf"), "lora": lora, "cost": judge_cost})


@step("modifiers.tier", version=1, reads=("modifiers", "teachers", "judge", "llm", "dataset.score"),
      inputs=("remaining",), outputs=("solved", "remaining"),
      code=("cogumi_tasks.modifiers", "cogumi_tasks.llm.client", "cogumi_tasks.llm.step_calls",
            "cogumi_tasks.train.distill_tasks", "cogumi_tasks.eval.suites",
            *WORLD_CODE))
def tier(ctx: StepContext) -> StepOutput:
    """Tier K of a modifier's cascade (params ``modifier``, ``tier``: K, from 1): its teacher answers the first
    ``max_items`` remaining tasks in best-of-k rounds, each answer judged; the first that passes is kept.

    Inputs: ``remaining`` (of modifiers.test or of tier K-1). Outputs: ``solved`` ({id, domain, prompt, messages,
    response, task?, tier, teacher, model, sample, judge_score, judge_kind, judge_reason}: training data),
    ``remaining`` (the input's format with the last reason: what tier K+1 gets). Metrics: ``cost_usd`` is what
    this run paid; ``list_cost_usd`` prices every call, answers from the response cache included, at the batch
    price when the teacher's endpoint goes through the batch API (the tier's cost on a cold cache: what the
    cascade's saving compares). A refused request (4xx) leaves its task in
    ``remaining``; an outage or a spent budget fails the step (clear it to backfill: the answers already paid come
    from the response cache).
    """
    from cogumi_tasks.core.ledger import BudgetExceeded
    from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMRefused
    from cogumi_tasks.llm.step_calls import ask, make_client, make_ledger
    from cogumi_tasks.train.distill_tasks import _add_costs

    mod = step_modifier(ctx)
    k = ctx.params.get("tier")
    if not isinstance(k, int) or not 1 <= k <= len(mod.tiers):
        raise StepFailed(f"modifiers.tier: params.tier {k!r}: modifier {mod.name} has tiers 1 to {len(mod.tiers)}")
    cfg = mod.tiers[k - 1]
    teacher = ctx.config.teacher(cfg.teacher)
    where = f"modifier {mod.name} tier {k} (teacher {teacher.name}, {teacher.model} at {teacher.base_url})"
    source = ctx.input("remaining")
    rows = list(iter_jsonl_dicts(ctx.fetch(source)))
    take, passed_on = (rows[: cfg.max_items], rows[cfg.max_items:]) if cfg.max_items else (rows, [])
    log.info("modifiers.tier %s: %d tasks in, %d for this tier (best-of-%d at temperature %g, %d-shot), %d passed "
             "on", where, len(rows), len(take), cfg.samples, cfg.temperature, cfg.shots, len(passed_on))
    prompts = teacher_messages(take, mod, k, cfg.shots)
    ledger = make_ledger(ctx)
    reasons = {r["id"]: r.get("reason") for r in take}
    solved: dict[str, dict] = {}
    refused: dict[str, str] = {}
    rounds, judge_cost = [], {}
    for j in range(cfg.samples):
        pending = [r for r in take if r["id"] not in solved and r["id"] not in refused]
        if not pending:
            break
        reqs = [ChatRequest(messages=prompts[r["id"]], max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=j)
                for r in pending]

        async def run(reqs: list[ChatRequest] = reqs, j: int = j) -> list:
            client = make_client(ctx, teacher, ledger)
            try:
                return await ask(ctx, client, reqs, tag=f"{mod.name}-tier{k}-sample{j}")
            finally:
                await client.aclose()

        results = asyncio.run(run())
        ledger.flush()
        answered = sum(isinstance(x, ChatResult) for x in results)
        spent = [x for x in results if isinstance(x, BudgetExceeded)]
        down = [x for x in results if isinstance(x, Exception) and not isinstance(x, BudgetExceeded | LLMRefused)]
        if spent or down:
            why = f"the budget is spent: {spent[0]}" if spent else (
                f"the teacher is down: {len(down)} of {len(reqs)} requests failed after the client's retries; "
                f"first: {type(down[0]).__name__}: {down[0]}")
            ctx.cost = ledger.totals()
            raise StepFailed(f"modifiers.tier: {where}, sample {j}: {why}. {answered} of {len(reqs)} answers of "
                             "this sample arrived and are in the response cache: clear this task once the teacher "
                             "answers (or the budget is raised) and the re-run pays nothing twice")
        for r, x in zip(pending, results, strict=True):
            if isinstance(x, LLMRefused):
                refused[r["id"]] = reasons[r["id"]] = f"refused by {teacher.name}: {x}"
        answers = [{**r, "response": x.text.strip()} for r, x in zip(pending, results, strict=True)
                   if isinstance(x, ChatResult)]
        verdicts, cost = judged_by_id(ctx, answers, source) if answers else ({}, {})
        judge_cost = _add_costs(judge_cost, cost)
        newly = 0
        for a in answers:
            v = verdicts[a["id"]]
            reasons[a["id"]] = v["judge_reason"]
            if v["passed"]:
                newly += 1
                solved[a["id"]] = {**{f: a[f] for f in CARRIED if f in a}, "response": a["response"], "tier": k,
                                   "teacher": teacher.name, "model": teacher.model, "sample": j,
                                   "judge_score": v["judge_score"], "judge_kind": v["judge_kind"],
                                   "judge_reason": v["judge_reason"]}
        rounds.append({"sample": j, "sent": len(reqs), "answered": answered, "solved": newly})
        log.info("modifiers.tier %s: sample %d: %d sent, %d answered, %d solved, %d solved in all", where, j,
                 len(reqs), answered, newly, len(solved))

    solved_rows = [solved[r["id"]] for r in take if r["id"] in solved]
    remaining = [{**{f: r[f] for f in CARRIED if f in r}, "reason": reasons[r["id"]]}
                 for r in take if r["id"] not in solved] + passed_on
    write_jsonl(ctx.out("solved.jsonl"), solved_rows)
    write_jsonl(ctx.out("remaining.jsonl"), remaining)
    teacher_cost = ledger.totals()
    ctx.cost = _add_costs(teacher_cost, judge_cost)
    mine = teacher_cost["per_endpoint"].get(teacher.name, {})
    spent_usd = mine.get("usd", 0.0)
    list_usd = ledger.price(teacher.price).cost(mine.get("prompt_tokens", 0), mine.get("completion_tokens", 0),
                                                batch=teacher.batch)
    return StepOutput(
        files={"solved": "solved.jsonl", "remaining": "remaining.jsonl"},
        metrics={"modifier": mod.name, "domain": mod.domain, "tier": k, "teacher": teacher.name,
                 "model": teacher.model, "price": teacher.price, "samples": cfg.samples, "shots": cfg.shots,
                 "temperature": cfg.temperature, "items_in": len(rows), "attempted": len(take),
                 "passed_on": len(passed_on), "solved": len(solved_rows), "remaining": len(remaining),
                 "refused": len(refused), "calls": sum(r["sent"] for r in rounds),
                 "cached_calls": teacher_cost["cached_calls"], "rounds": rounds,
                 "cost_usd": spent_usd, "cost_per_attempted_usd": spent_usd / len(take) if take else 0.0,
                 "list_cost_usd": list_usd,
                 "cost": ctx.cost},
    )
