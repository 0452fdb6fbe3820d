"""Phase 1 steps after SFT: find what the model fails at, teach it those patterns, publish the result.

``train.failure_analysis`` clusters the failed items of an ``eval.run`` and has the judge name each cluster;
``train.distill`` has a teacher write new tasks and answers per pattern (tiny-world failures: the teacher of their
family, e.g. the strong tier; :mod:`cogumi_tasks.train.distill_tasks`), keeps those the judge passes, mixes them
with replayed Phase 0 rows and continues training at a low learning rate;
``train.publish`` compares the evaluations before and after on the failure set and on the rest (forgetting)
and publishes the enhanced base model for Phase 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from cogumi_tasks.core.records import Quarantine, check_error_rate, iter_jsonl_dicts, write_jsonl
from cogumi_tasks.core.steps import StepContext, StepOutput, step
from cogumi_tasks.models.step_io import dataset_rows, pass_on
from cogumi_tasks.train.lora import train_lora
from cogumi_tasks.train.steps import train_config

log = logging.getLogger("cogumi")

GENERAL_ROWS = 16  # Phase 0 rows held out of the replay to measure forgetting


@step("train.failure_analysis", version=1, reads=("train.failure_analysis", "judge", "llm"), inputs=("items",),
      outputs=("clusters", "failures"),
      code=("cogumi_tasks.train.failures", "cogumi_tasks.llm.step_calls", "cogumi_tasks.train.steps"))
def failure_analysis(ctx: StepContext) -> StepOutput:
    """Embed the failed items (sentence-transformers), cluster them (KMeans, silhouette reported) and have
    the judge name each cluster's pattern from its examples.

    Inputs: ``items`` (``eval.run``'s per-item results). Outputs: ``clusters`` (JSON: sizes, labels,
    examples, silhouette), ``failures`` (the failed items with their cluster id).
    """
    from cogumi_tasks.llm.step_calls import make_client, make_ledger
    from cogumi_tasks.train.failures import (
        cluster_failures,
        cluster_summary,
        embed,
        failure_text,
        failures_of,
        label_clusters,
        load_embedder,
    )

    cfg = train_config(ctx).failure_analysis
    n_items = 0

    def items() -> Iterator[dict]:
        nonlocal n_items
        for r in iter_jsonl_dicts(ctx.fetch(ctx.input("items"))):
            n_items += 1
            yield r

    failures = failures_of(items())  # streamed: only the failed items are held
    log.info("failure_analysis: %d of %d items failed", len(failures), n_items)
    clusters, silhouette = [], math.nan
    if failures:
        vectors = embed(load_embedder(cfg.embedder), [failure_text(r) for r in failures])
        clusters, silhouette = cluster_failures(failures, vectors, cfg.k, cfg.examples_per_cluster, cfg.seed)
        ledger = make_ledger(ctx)
        client = make_client(ctx, ctx.config.judge, ledger)

        async def label():
            try:
                return await label_clusters(client, clusters, cfg.label_max_tokens)
            finally:
                await client.aclose()

        asyncio.run(label())
        ledger.flush()
        ctx.cost = ledger.totals()
    cluster_of = {m: c.id for c in clusters for m in c.member_ids}
    write_jsonl(ctx.out("failures.jsonl"), [{**r, "cluster": cluster_of.get(str(r.get("id")))} for r in failures])
    summary = cluster_summary(clusters, silhouette)
    ctx.out("clusters.json").write_text(json.dumps(summary, indent=1))
    by_domain: dict[str, int] = defaultdict(int)
    for r in failures:
        by_domain[r.get("domain") or "unknown"] += 1
    return StepOutput(
        files={"clusters": "clusters.json", "failures": "failures.jsonl"},
        metrics={"items": n_items, "failures": len(failures),
                 "failure_rate": round(len(failures) / n_items, 4) if n_items else None,
                 "failures_by_domain": dict(by_domain), "k": len(clusters), "silhouette": summary["silhouette"],
                 "clusters": [{"id": c.id, "size": c.size, "label": c.label, "error": c.error} for c in clusters],
                 "cost": ctx.cost},
    )


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


@step("train.distill", version=2,
      reads=("train.distill", "train.sft", "teachers", "judge", "llm", "dataset.generate.system_prompt",
             "dataset.score.max_tokens"),
      inputs=("model", "clusters", "dataset"),
      outputs=("examples", "rejected", "quarantine", "mix", "model", "adapter?", "metrics?"),
      code=("cogumi_tasks.llm.step_calls", "cogumi_tasks.train.lora", "cogumi_tasks.train.sft",
            "cogumi_tasks.models.nll", "cogumi_tasks.models.step_io", "cogumi_tasks.train.steps",
            "cogumi_tasks.llm.client", "cogumi_tasks.train.distill_tasks", "cogumi_tasks.world.judge",
            "cogumi_tasks.world.strong_tier", "cogumi_tasks.world", "cogumi_tasks.world.base",
            "cogumi_tasks.world.code", "cogumi_tasks.world.reasoning", "cogumi_tasks.world.automation",
            "cogumi_tasks.world.answers", "cogumi_tasks.world.sandbox"))
def distill(ctx: StepContext) -> StepOutput:
    """Targeted distillation: per failure pattern a teacher writes new tasks with answers, the judge keeps those
    scoring >= ``judge_min_score``; they are mixed with ``replay_fraction`` of replayed Phase 0 rows and LoRA
    training continues from the SFT model at the low learning rate.

    Failures that are tiny-world tasks go to the teacher of their family (the strong tier in the tiny config) as
    "write N new tasks like these"; tasks of the held-out part are dropped (counted), the answers are judged by
    the tasks' checkers (:mod:`cogumi_tasks.train.distill_tasks`). Other failures: the strongest teacher of
    general prompts writes and answers one task per request, the configured judge scores it.

    Inputs: ``model`` (the SFT model), ``clusters`` (failure analysis), ``dataset`` (Phase 0 JSONL).
    Outputs: ``model`` (merged; the input model when no example survived), ``adapter``, ``examples`` (kept),
    ``rejected``, ``quarantine``, ``mix`` (the training rows). Metrics: ``by_cluster`` counts per cluster and
    path (asked, received, unparsed, dropped_heldout, judged, verified, kept).
    """
    from cogumi_tasks.train.distill_tasks import write_examples

    cfg = train_config(ctx).distill
    clusters = json.loads(ctx.fetch(ctx.input("clusters")).read_text())["clusters"]
    quarantine = Quarantine()
    judged, counts, by_cluster = write_examples(ctx, cfg, clusters, quarantine)
    if counts["requested"]:
        check_error_rate("distill examples", len(quarantine), counts["requested"], cfg.max_error_rate, quarantine)
    pool = dataset_rows(ctx)  # read once: the duplicate check and the replay both use it
    known = {_normal(r["prompt"]) for r in pool}
    kept, rejected, seen = [], [], set()
    for r in judged:
        key = _normal(r["prompt"])
        if r["judge_score"] < cfg.judge_min_score or key in known or key in seen:
            rejected.append({**r, "why": "judge" if r["judge_score"] < cfg.judge_min_score else "duplicate"})
        else:
            kept.append(r)
            seen.add(key)
    random.Random(0).shuffle(pool)
    n_replay = min(len(pool), round(len(kept) * cfg.replay_fraction / (1 - cfg.replay_fraction)))
    replay, general = pool[:n_replay], pool[n_replay:][:GENERAL_ROWS]  # general: never trained on here
    mix = [{"prompt": r["prompt"], "response": r["response"], "source": "new"} for r in kept] + [
        {**r, "source": "replay"} for r in replay]
    random.Random(1).shuffle(mix)
    write_jsonl(ctx.out("examples.jsonl"), kept)
    write_jsonl(ctx.out("rejected.jsonl"), rejected)
    quarantine.write(ctx.out("quarantine.jsonl"))
    write_jsonl(ctx.out("mix.jsonl"), mix)
    for row in by_cluster:
        row["kept"] = sum(r["cluster"] == row["cluster"] and (r.get("family") or "general") == row["path"]
                          for r in kept)
    metrics = {**counts, "patterns": len([c for c in clusters if c.get("examples")]), "kept": len(kept),
               "rejected": len(rejected), "replayed": len(replay), "by_cluster": by_cluster,
               "kept_by_pattern": {str(c["id"]): sum(r["cluster"] == c["id"] for r in kept) for c in clusters},
               "lr": cfg.lr, "cost": ctx.cost}
    files = {"examples": "examples.jsonl", "rejected": "rejected.jsonl", "quarantine": "quarantine.jsonl",
             "mix": "mix.jsonl"}
    model_uri = ctx.input("model")
    if not kept:
        log.warning("distill: no new example survived the judge; the model is passed on untrained")
        return StepOutput(files={**files, "model": pass_on(ctx, model_uri)}, metrics={**metrics, "trained": False})
    model_dir = ctx.fetch_dir(model_uri)
    sft_cfg = train_config(ctx).sft.model_copy(update={"lr": cfg.lr, "epochs": cfg.epochs, "max_steps": None})
    training = train_lora(ctx, model_dir, [{"prompt": r["prompt"], "response": r["response"]} for r in mix], sft_cfg)
    metrics.update(trained=True, training=training, **general_perplexity(model_dir, ctx.out_dir / "merged", general))
    return StepOutput(files={**files, "adapter": "adapter/", "model": "merged/", "metrics": "metrics.json"},
                      metrics=metrics)


def general_perplexity(before_dir: Path, after_dir: Path, rows: list[dict]) -> dict:
    """Per-byte perplexity of Phase 0 rows not trained on here, before and after: the forgetting check."""
    from transformers import AutoTokenizer

    from cogumi_tasks.models.nll import chat_texts, nll_stats

    if not rows:
        return {}
    texts = chat_texts(AutoTokenizer.from_pretrained(str(before_dir)), [(r["prompt"], r["response"]) for r in rows])
    before, after = nll_stats(before_dir, texts), nll_stats(after_dir, texts)
    return {"general_rows": len(rows), "general_byte_ppl_before": round(before.byte_ppl, 5),
            "general_byte_ppl_after": round(after.byte_ppl, 5)}


def compare_evaluations(before: list[dict], after: list[dict]) -> dict:
    """Before/after on the failure set (items wrong before) and the general set (items right before)."""
    after_by_id = {str(r["id"]): r for r in after}
    missing = [str(r["id"]) for r in before if str(r["id"]) not in after_by_id]
    if missing:
        raise ValueError(f"the two evaluations differ: {len(missing)} items missing after, e.g. {missing[:3]}")

    def share(rows: list[dict]) -> float | None:
        return round(sum(bool(r.get("correct")) for r in rows) / len(rows), 4) if rows else None

    def mean_score(rows: list[dict]) -> float | None:
        return round(sum(float(r.get("score") or 0) for r in rows) / len(rows), 4) if rows else None

    failed = [r for r in before if r.get("correct") is False]
    passed = [r for r in before if r.get("correct") is True]
    by_domain: dict[str, dict] = {}
    for domain in sorted({r.get("domain") or "unknown" for r in before}):
        b = [r for r in before if (r.get("domain") or "unknown") == domain]
        by_domain[domain] = {"n": len(b), "before": mean_score(b),
                             "after": mean_score([after_by_id[str(r["id"])] for r in b])}
    return {
        "items": len(before),
        "score_before": mean_score(before), "score_after": mean_score([after_by_id[str(r["id"])] for r in before]),
        "failure_set": {"n": len(failed), "correct_before": 0.0 if failed else None,
                        "correct_after": share([after_by_id[str(r["id"])] for r in failed])},
        "general_set": {"n": len(passed), "correct_before": 1.0 if passed else None,
                        "correct_after": share([after_by_id[str(r["id"])] for r in passed])},
        "by_domain": by_domain,
    }


@step("train.publish", version=2, inputs=("model", "before", "after", "table"), outputs=("model", "release"),
      code=("cogumi_tasks.models.step_io",))
def publish(ctx: StepContext) -> StepOutput:
    """Publish the enhanced base model with the before/after evaluation of targeted distillation and Phase 1's
    before/after table.

    Inputs: ``model`` (the distilled model), ``before`` and ``after`` (``eval.run`` items of the SFT and the
    distilled model), ``table`` (optional: ``eval.before_after``'s held-out accuracy per domain of the untrained,
    SFT and distilled model). Outputs: ``model`` (the same URI: nothing is copied), ``release`` (JSON).
    """
    before = list(iter_jsonl_dicts(ctx.fetch(ctx.input("before"))))
    after = list(iter_jsonl_dicts(ctx.fetch(ctx.input("after"))))
    comparison = compare_evaluations(before, after)
    model_uri = ctx.input("model")
    release = {"model": model_uri, "distillation": comparison}
    if "table" in ctx.inputs:
        comparison = {**comparison, "before_after": json.loads(ctx.fetch(ctx.input("table")).read_text())}
        release["before_after"] = comparison["before_after"]
    ctx.out("release.json").write_text(json.dumps(release, indent=1))
    fs, gs = comparison["failure_set"], comparison["general_set"]
    log.info("publish: failure set %s -> %s correct (n=%d); general set %s -> %s (n=%d)", fs["correct_before"],
             fs["correct_after"], fs["n"], gs["correct_before"], gs["correct_after"], gs["n"])
    return StepOutput(files={"model": pass_on(ctx, model_uri), "release": "release.json"},
                      metrics=comparison)
