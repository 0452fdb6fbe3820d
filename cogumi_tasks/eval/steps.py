"""Evaluation steps usable from any DAG: score a model against the reference, then gate on it.

``eval.run`` answers every item of the configured suites with the student and with the reference,
scores both the same way (code in the sandbox, multiple choice by letter, tool calls by JSON), and
reports "% of reference" per domain with a paired bootstrap interval. ``eval.gate`` fails its task
when a domain is under its configured threshold, with the measured figure in the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from cogumi_tasks.core.records import iter_jsonl_dicts, write_jsonl
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step

log = logging.getLogger("cogumi")


def _fetch(ctx: StepContext):
    def fetch(uri: str) -> Path:
        if uri.startswith("s3://") and uri.endswith("/"):
            return ctx.fetch_dir(uri)
        return ctx.fetch(uri)

    return fetch


def _endpoints(ctx: StepContext) -> dict:
    cfg = ctx.config
    return {e.name: e for e in [*cfg.teachers, cfg.judge, cfg.eval.reference]}


@step("eval.run", version=2, reads=("eval", "judge", "teachers", "llm"), inputs=("model",),
      outputs=("items", "summary"), code=("cogumi_tasks.eval.backends", "cogumi_tasks.eval.judge",
                                          "cogumi_tasks.eval.stats", "cogumi_tasks.eval.suites",
                                          "cogumi_tasks.eval.tables", "cogumi_tasks.llm.step_calls",
                                          "cogumi_tasks.world", "cogumi_tasks.world.answers",
                                          "cogumi_tasks.world.automation", "cogumi_tasks.world.base",
                                          "cogumi_tasks.world.code", "cogumi_tasks.world.judge",
                                          "cogumi_tasks.world.reasoning", "cogumi_tasks.world.sandbox"))
def run_eval(ctx: StepContext) -> StepOutput:
    """Evaluate the student and the reference model on the configured suites.

    Inputs: ``model`` (optional: a model directory or GGUF URI that replaces ``eval.student.path``,
    e.g. Phase 1's output). Outputs: ``items`` (per item: prompt, both answers, both scores,
    errors; for world items the checker's reasons), ``summary`` (JSON: per suite accuracy, % of reference by
    domain with 95% CI, ``domains``: accuracy of both models per domain with 95% CIs, world suites by domain and
    other suites on rows of their own, judge).
    """
    from cogumi_tasks.core.ledger import ResponseCache
    from cogumi_tasks.eval.backends import EndpointBackend, generate_budgeted, load_backend
    from cogumi_tasks.eval.judge import judge_pairs, order_agreement, win_rate
    from cogumi_tasks.eval.stats import pct_of_reference
    from cogumi_tasks.eval.suites import load_suite, reference_conversations, score_items
    from cogumi_tasks.eval.tables import domain_table
    from cogumi_tasks.llm.step_calls import make_client, make_ledger
    from cogumi_tasks.world.sandbox import Limits, check_available

    cfg = ctx.config.eval
    if cfg is None:
        raise StepFailed(f"config {ctx.config.name} has no eval section")
    check_available()
    fetch = _fetch(ctx)
    items = []
    for suite in cfg.suites:
        loaded = load_suite(suite, fetch)
        items += loaded[: suite.limit] if suite.limit else loaded
    log.info("eval: %d items from %s", len(items), ", ".join(s.kind for s in cfg.suites))

    student_ref = cfg.student
    if "model" in ctx.inputs:  # an HF directory ends in "/", anything else is a GGUF file
        uri = ctx.input("model")
        kind = "hf" if uri.endswith("/") or Path(uri).is_dir() else "gguf"
        student_ref = student_ref.model_copy(update={"path": uri, "kind": kind, "adapter": None})
    ledger = make_ledger(ctx)
    cache = ResponseCache(ctx.store, ctx.llm_cache_prefix)
    conversations = [i.messages for i in items]
    budgets = [i.max_tokens or cfg.max_tokens for i in items]
    student = load_backend(student_ref, endpoints=_endpoints(ctx), llm=ctx.config.llm, ledger=ledger, cache=cache,
                           fetch=fetch, batch_size=cfg.batch_size, step=ctx.spec.name, hf_runtime=cfg.hf_runtime,
                           pre_tokenizer=cfg.hf_pre_tokenizer, work_dir=ctx.tmp_dir)
    try:
        ours = generate_budgeted(student, conversations, budgets)
    finally:
        student.close()
    reference = EndpointBackend(cfg.reference, ctx.config.llm, ledger, cache, step=ctx.spec.name)
    try:
        theirs = generate_budgeted(reference, reference_conversations(items, cfg.reference_shots, cfg.seed), budgets)
    finally:
        reference.close()

    limits = Limits(**cfg.sandbox.model_dump())
    our_scores = score_items(items, [g.text for g in ours], limits)
    ref_scores = score_items(items, [g.text for g in theirs], limits)
    rows = []
    for item, o, r, os_, rs in zip(items, ours, theirs, our_scores, ref_scores, strict=True):
        rows.append({
            "id": item.id, "suite": item.suite, "domain": item.domain,
            "prompt": item.messages[-1]["content"], "messages": item.messages,
            "answer": o.text, "score": os_.score, "correct": os_.correct, "error": os_.error or o.error,
            "reference_answer": r.text, "reference_score": rs.score, "reference_error": rs.error or r.error,
            "ours": os_.score, "reference": rs.score,
            **({"reason": os_.detail.get("reason"), "reference_reason": rs.detail.get("reason")}
               if item.suite.startswith("world/") else {}),
        })

    summary: dict = {"items": len(rows), "student": student_ref.model_dump(), "student_runtime": student.name,
                     "reference": cfg.reference.model, "reference_shots": cfg.reference_shots}
    suites: dict = {}
    for row in rows:
        s = suites.setdefault(row["suite"], {"n": 0, "ours": 0.0, "reference": 0.0, "errors": 0})
        s["n"] += 1
        s["ours"] += row["ours"]
        s["reference"] += row["reference"]
        s["errors"] += int(bool(row["error"]))
    for s in suites.values():
        s["ours"], s["reference"] = s["ours"] / s["n"], s["reference"] / s["n"]
    summary["suites"] = suites
    summary["domains"] = domain_table(rows, n=cfg.bootstrap, seed=cfg.seed)
    try:
        summary["pct_of_reference"] = pct_of_reference(rows, n=cfg.bootstrap, seed=cfg.seed)
    except ValueError as exc:  # the reference scored 0 somewhere: say so rather than divide by 0
        summary["pct_of_reference"] = {}
        summary["pct_error"] = str(exc)

    if cfg.judge_pairwise:
        client = make_client(ctx, ctx.config.judge, ledger)
        pairs = [(r["id"], r["prompt"], r["answer"], r["reference_answer"]) for r in rows]

        async def judged():
            try:
                return await judge_pairs(client, pairs)
            finally:
                await client.aclose()

        verdicts = asyncio.run(judged())
        by_id = {v.item_id: v for v in verdicts}
        for row in rows:
            v = by_id.get(row["id"])
            row["judge"] = None if v is None else {"ab": v.ab, "ba": v.ba, "winner": v.winner,
                                                   "consistent": v.consistent}
        summary["judge"] = {"model": ctx.config.judge.model, "pairs": len(verdicts),
                            "order_agreement": order_agreement(verdicts), "win_rate": win_rate(verdicts)}
    ledger.flush()
    ctx.cost = ledger.totals()
    write_jsonl(ctx.out("items.jsonl"), rows)
    ctx.out("summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return StepOutput(files={"items": "items.jsonl", "summary": "summary.json"}, metrics=summary)


@step("eval.gate", version=1, reads=("eval.gates",), inputs=("summary",), outputs=("gates",),
      code=("cogumi_tasks.eval.stats", "cogumi_tasks.core.verdict"))
def gate(ctx: StepContext) -> StepOutput:
    """Pass or fail on the configured gates (domain -> minimum % of reference).

    Inputs: ``summary`` (eval.run's summary.json). Outputs: ``gates`` (JSON: per gate the figure, its interval,
    the verdict and its reason). A gate passes only when met (the interval's lower bound clears it); the task
    fails with every measured figure, interval and verdict when any gate is not met, inconclusive or undefined.
    """
    from cogumi_tasks.eval.stats import check_gates

    summary = json.loads(ctx.fetch(ctx.input("summary")).read_text())
    gates = ctx.config.eval.gates if ctx.config.eval else {}
    results = check_gates(summary.get("pct_of_reference", {}), gates)
    report = [{"domain": g.domain, "threshold": g.threshold, "pct": g.pct, "ci": list(g.ci), "passed": g.passed,
               "verdict": g.verdict, "reason": g.reason, "message": g.message} for g in results]
    failed = [g for g in results if not g.passed]
    if failed:
        raise StepFailed("quality gates failed: " + "; ".join(g.message for g in failed)
                         + (" | passed: " + "; ".join(g.message for g in results if g.passed)
                            if len(failed) < len(results) else ""))
    ctx.out("gates.json").write_text(json.dumps(report, indent=1))
    return StepOutput(files={"gates": "gates.json"}, metrics={"gates": report})


@step("eval.before_after", version=1, reads=("eval.bootstrap", "eval.seed"), inputs=("untrained", "sft", "distilled"),
      outputs=("table",), code=("cogumi_tasks.eval.stats", "cogumi_tasks.eval.tables"))
def before_after_table(ctx: StepContext) -> StepOutput:
    """Phase 1's before/after table: per domain, held-out accuracy of the untrained student, after SFT and after
    distillation, with bootstrap 95% intervals, the rise over the untrained student in points (paired interval)
    and % of reference per model (undefined, never 0%, when the reference got no item right).

    Inputs: ``untrained``, ``sft``, ``distilled`` (``eval.run`` items of the three models, the same items).
    Outputs: ``table`` (JSON, also the step's metrics). World suites count by domain, other suites (HumanEval)
    on a row of their own.
    """
    from cogumi_tasks.eval.tables import before_after

    cfg = ctx.config.eval
    models = {name: list(iter_jsonl_dicts(ctx.fetch(ctx.input(name)))) for name in ("untrained", "sft", "distilled")}
    try:
        table = before_after(models, n=cfg.bootstrap, seed=cfg.seed)
    except ValueError as exc:
        raise StepFailed(f"eval.before_after: {exc}") from None
    for key, row in table.items():
        log.info("before/after %s (n=%d): untrained %.1f%%, sft %.1f%% (%+.1f points), distilled %.1f%% (%+.1f)",
                 key, row["n"], 100 * row["untrained"]["accuracy"], 100 * row["sft"]["accuracy"],
                 row["rise_sft"]["points"], 100 * row["distilled"]["accuracy"], row["rise_distilled"]["points"])
    ctx.out("table.json").write_text(json.dumps(table, indent=1, sort_keys=True))
    return StepOutput(files={"table": "table.json"}, metrics={"before_after": table})
