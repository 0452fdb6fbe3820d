"""LLM calls made by steps (teachers, judge, recovery teacher), on top of the shared LLM client.

One ledger per step execution (persisted under the run's ledger prefix, checked against the run's
budget) and one response cache per pipeline, so a killed, retried or re-run task never pays twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from cogumi_tasks.core.config import EndpointConfig, config_dir
from cogumi_tasks.core.ledger import BudgetExceeded, CostLedger, ResponseCache, load_prices
from cogumi_tasks.core.records import Quarantine
from cogumi_tasks.core.steps import StepContext, StepFailed, safe_name
from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMClient, resolve_api_key

log = logging.getLogger("cogumi")

JUDGE_SYSTEM = (
    "You are a strict grader of assistant answers. Rate how correct, complete and helpful the answer "
    "is for the user's request, from 1 (wrong or useless) to 10 (correct, complete and clear). "
    'Reply only with JSON: {"score": <integer 1-10>, "reason": "<one sentence>"}.'
)
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}, "reason": {"type": "string"}},
    "required": ["score", "reason"],
}


def make_ledger(ctx: StepContext) -> CostLedger:
    prices = load_prices(config_dir() / ctx.config.llm.prices_file)
    part = safe_name(f"{ctx.spec.name}-{ctx.prefix.rsplit('/', 1)[1]}")
    return CostLedger(prices, ctx.config.llm.budget_usd, store=ctx.store, ledger_prefix=ctx.ledger_prefix, part=part)


def make_client(ctx: StepContext, endpoint: EndpointConfig, ledger: CostLedger) -> LLMClient:
    cache = ResponseCache(ctx.store, ctx.llm_cache_prefix)
    return LLMClient(endpoint, ctx.config.llm, ledger, step=ctx.spec.name, cache=cache,
                     api_key=resolve_api_key(endpoint), progress=True)


async def ask(ctx: StepContext, client: LLMClient, reqs: list[ChatRequest], validate=None, tag: str = "") -> list:
    """Answer ``reqs`` on ``client``: through the batch API when the endpoint has one (its state kept in the
    step's ``_work/``, one file per endpoint and ``tag``), else concurrently."""
    if client.endpoint.batch:
        from cogumi_tasks.llm.batch import run_batch

        state = ctx.work_uri(f"batch-{safe_name(client.endpoint.name)}{'-' + tag if tag else ''}.json")
        return await run_batch(client, reqs, state_uri=state, store=ctx.store, validate=validate)
    return await client.chat_many(reqs, validate=validate)


def finish_calls(ctx: StepContext, ledger: CostLedger, results: list) -> None:
    """Record cost on the context, flush the ledger, and turn a spent budget into a task failure."""
    ledger.flush()
    ctx.cost = ledger.totals()
    spent = [r for r in results if isinstance(r, BudgetExceeded)]
    if spent:
        done = sum(isinstance(r, ChatResult) for r in results)
        raise StepFailed(f"{ctx.spec.name}: {spent[0]} ({done} of {len(results)} answers done and kept in the "
                         "response cache; a re-run resumes from them)")


def teacher_answers(ctx: StepContext, rows: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """Ask each row's teacher; returns (answers, failed rows with reason, fault counts by teacher)."""
    gen = ctx.config.dataset.generate
    ledger = make_ledger(ctx)
    by_teacher: dict[str, list[dict]] = {}
    for r in rows:
        by_teacher.setdefault(r["teacher"], []).append(r)

    async def run() -> tuple[list, list, dict]:
        answers, failed, stats = [], [], {}
        results_all: list[Any] = []
        for name, group in sorted(by_teacher.items()):
            endpoint = ctx.config.teacher(name)
            client = make_client(ctx, endpoint, ledger)
            reqs = [
                ChatRequest(
                    messages=[{"role": "system", "content": gen.system_prompt},
                              {"role": "user", "content": r["prompt"]}],
                    max_tokens=gen.max_tokens, temperature=gen.temperature, seed=gen.seed,
                )
                for r in group
            ]
            log.info("generate: %d prompts for teacher %s (%s)", len(reqs), name, endpoint.model)
            try:
                results = await ask(ctx, client, reqs)
            finally:
                await client.aclose()
            results_all += results
            stats[name] = dict(client.stats)
            for r, res in zip(group, results, strict=True):
                if isinstance(res, ChatResult) and res.text.strip():
                    answers.append({**r, "model": endpoint.model, "response": res.text.strip(),
                                    "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens})
                elif isinstance(res, ChatResult):
                    failed.append({"id": r["id"], "teacher": name, "reason": "empty answer"})
                elif not isinstance(res, BudgetExceeded):
                    failed.append({"id": r["id"], "teacher": name, "reason": f"{type(res).__name__}: {res}"})
        finish_calls(ctx, ledger, results_all)
        return answers, failed, stats

    return asyncio.run(run())


def parse_verdict(text: str) -> dict:
    """A judge verdict as {score: 1-10, reason}; anything else raises ValueError (and is retried)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"verdict is not JSON: {exc.msg}") from None
    if not isinstance(data, dict) or "score" not in data:
        raise ValueError("verdict has no score")
    score = data["score"]
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 10:
        raise ValueError(f"score {data['score']!r} is not an integer from 1 to 10")
    return {"score": score, "reason": str(data.get("reason", ""))[:500]}


def judge_request(prompt: str, response: str, max_tokens: int) -> ChatRequest:
    return ChatRequest(
        messages=[
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"User request:\n{prompt}\n\nAssistant answer:\n{response}"},
        ],
        max_tokens=max_tokens, temperature=0.0, seed=0,
        response_format={"type": "json_object", "schema": JUDGE_SCHEMA},
    )


def judge_answers(ctx: StepContext, rows: list[dict], source: str | None = None) -> tuple[list[dict], Quarantine, dict]:
    """Judge every answer; returns (rows with judge_score/judge_reason, quarantine, fault counts by endpoint).
    ``source``: what quarantined rows name as their source (default: the step's ``answers`` input)."""
    cfg = ctx.config.dataset.score
    ledger = make_ledger(ctx)
    quarantine = Quarantine()
    source = source or ctx.input("answers")

    async def run() -> tuple[list[dict], dict]:
        client = make_client(ctx, ctx.config.judge, ledger)
        reqs = [judge_request(r["prompt"], r["response"], cfg.max_tokens) for r in rows]
        try:
            results = await ask(ctx, client, reqs, validate=parse_verdict)
        finally:
            await client.aclose()
        judged = []
        for r, res in zip(rows, results, strict=True):
            if isinstance(res, ChatResult):
                verdict = res.parsed if res.parsed is not None else parse_verdict(res.text)
                judged.append({**r, "judge_score": verdict["score"], "judge_reason": verdict["reason"]})
            elif not isinstance(res, BudgetExceeded):
                quarantine.add(source, None, "judge_verdict", f"unparseable verdict after retries: {res}", r)
        finish_calls(ctx, ledger, results)
        return judged, {client.endpoint.name: dict(client.stats)}

    judged, stats = asyncio.run(run())
    return judged, quarantine, stats
