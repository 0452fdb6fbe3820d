"""Phase 4 step ``routing.labels``: the verdict table the router learns from, every model's verdict per query.

Queries and verdicts:

- domain queries: the held-out instances Phase 3's ``modifiers.evaluate`` already answered with the base and with
  each modifier (its ``items``); their verdicts are that step's checker scores, so no model runs again for them;
- general queries: ``routing.labels.general`` prompts of the ``domain: general`` rows of ``routing.labels.source``
  (the last ones, which the tiny Phase 0's prompt limit never reads), answered here by the base and each modifier
  (greedy, the same GGUF, recovery LoRA and adapter scales as ``modifiers.evaluate``) and judged by the LLM judge
  (:func:`cogumi_tasks.world.judge.judge_rows`; kept as correct at the dataset's LLM threshold).

Confidence (the router's input and the threshold's): the base's own answer, teacher-forced through the Phase 2
GGUF (:func:`cogumi_tasks.compress.calibration.answer_features`: exp of the mean answer-token log-probability,
one prompt+answer forward pass, no generation), mapped by Phase 2's calibrator. Its cost per query is measured
and published (``confidence_ms``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cogumi_tasks.core.records import iter_jsonl_dicts, write_jsonl
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step

log = logging.getLogger("cogumi")


def domain_rows(items: list[dict], models: list[str]) -> list[dict]:
    """Verdict rows of ``modifiers.evaluate`` items: one per query id with every model's verdict (score >= 0.5) and
    the base's answer; ids missing a model's row raise (the table needs every verdict)."""
    by_id: dict[str, dict] = {}
    for r in items:
        if r.get("model") not in models:
            continue  # "<name>/alone" rows and models the router does not choose between
        row = by_id.setdefault(r["id"], {"id": r["id"], "query": r["prompt"], "domain": r.get("domain"),
                                         "verdicts": {}, "answer": None})
        row["verdicts"][r["model"]] = float(r["score"]) >= 0.5
        if r["model"] == models[0]:
            row["answer"] = r.get("answer") or ""
    for row in by_id.values():
        missing = [m for m in models if m not in row["verdicts"]]
        if missing:
            raise ValueError(f"item {row['id']!r} has no verdict of {missing} in modifiers.evaluate's items")
    return list(by_id.values())


def general_prompts(path: Path, n: int) -> list[dict]:
    """The last ``n`` rows of ``path`` whose domain is general (``{"id", "prompt"}``)."""
    rows = [r for r in iter_jsonl_dicts(path) if r.get("domain") == "general" and r.get("prompt")]
    if n and len(rows) < n:
        raise ValueError(f"{path}: {len(rows)} general prompts, routing.labels.general asks for {n}")
    return [{"id": str(r.get("id") or f"general-{i:04d}"), "prompt": r["prompt"]} for i, r in
            enumerate(rows[len(rows) - n:] if n else [])]


def _answer_general(ctx: StepContext, prompts: list[dict], models: list[str], max_tokens: int,
                    source: str) -> list[dict]:
    """Each model's greedy answer to each general prompt, judged; rows in the verdict-table layout."""
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.modifiers.lora_steps import recovery
    from cogumi_tasks.world.judge import judge_rows, threshold

    mods = {m.name: m for m in ctx.config.modifiers}
    adapters = dict(zip([m.name for m in ctx.config.modifiers], [ctx.fetch(u) for u in ctx.input_list("modifiers")],
                        strict=True))
    rec = recovery(ctx)
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    answers: dict[str, list[str]] = {}
    backend = GGUFBackend(ctx.fetch(ctx.input("gguf")), name="base")
    try:
        for model in models:
            extra = [] if model == models[0] else [(adapters[model], mods[model].adapter_scale)]
            backend.set_adapters([*rec, *extra])
            answers[model] = [g.text for g in backend.generate(convs, max_tokens)]
    finally:
        backend.close()
    to_judge = [{"id": f"{p['id']}@{m}", "prompt": p["prompt"], "response": answers[m][i], "domain": "general"}
                for m in models for i, p in enumerate(prompts)]
    judged, quarantine, _ = judge_rows(ctx, to_judge, source=source)
    if quarantine.rows:
        log.warning("labels: %d general answers had no parseable verdict; counted as wrong", len(quarantine.rows))
    score = {r["id"]: r["judge_score"] >= threshold(r, ctx.config.dataset.score) for r in judged}
    return [{"id": p["id"], "query": p["prompt"], "domain": None, "answer": answers[models[0]][i],
             "verdicts": {m: score.get(f"{p['id']}@{m}", False) for m in models}}
            for i, p in enumerate(prompts)]


def confidences(ctx: StepContext, rows: list[dict]) -> tuple[list[float], list[float], float]:
    """(raw, calibrated confidence of the base's answer per row, milliseconds per query)."""
    from cogumi_tasks.compress.calibration import Calibrator, answer_features

    cal = json.loads(ctx.fetch(ctx.input("calibrator")).read_text())
    calibrator = Calibrator(cal["method"], t=cal.get("t", 1.0), a=cal.get("a", 1.0), b=cal.get("b", 0.0))
    items = [{"id": r["id"], "messages": [{"role": "user", "content": r["query"]}], "answer": r["answer"]}
             for r in rows]
    start = time.perf_counter()
    feats = answer_features(ctx.fetch(ctx.input("gguf")), items, ctx.fetch_dir(ctx.input("tokenizer")))
    ms = 1000 * (time.perf_counter() - start) / max(1, len(rows))
    raw = [f["confidence"] for f in feats]
    return raw, [float(x) for x in calibrator(np.asarray(raw, dtype=float))], ms


def summary(rows: list[dict], models: list[str], costs: dict[str, float]) -> dict[str, Any]:
    """Per domain: queries, each model's share correct, the label mix; overall the same."""
    from cogumi_tasks.routing.features import label_of

    out: dict[str, Any] = {}
    for domain in sorted({r["domain"] or "general" for r in rows}) + ["all"]:
        got = [r for r in rows if domain == "all" or (r["domain"] or "general") == domain]
        labels = [models[label_of(r["verdicts"], models, costs)] for r in got]
        out[domain] = {"n": len(got),
                       "correct": {m: round(sum(r["verdicts"][m] for r in got) / len(got), 4) for m in models},
                       "none_correct": sum(not any(r["verdicts"].values()) for r in got),
                       "labels": {m: labels.count(m) for m in models}}
    return out


@step("routing.labels", version=1, reads=("routing.labels", "routing.router.costs", "dataset.score", "judge", "llm",
                                          "modifiers", "eval.max_tokens"),
      inputs=("items", "gguf", "lora", "modifiers", "calibrator", "tokenizer"), outputs=("verdicts", "stats"),
      code=("cogumi_tasks.world.judge", "cogumi_tasks.compress.calibration", "cogumi_tasks.routing.features",
            "cogumi_tasks.eval.backends", "cogumi_tasks.modifiers.lora_steps"))
def labels_step(ctx: StepContext) -> StepOutput:
    """Label every query with every model's verdict and the base's calibrated confidence.

    Inputs: ``items`` (``modifiers.evaluate``'s per-model answers), ``gguf`` and ``lora`` (Phase 2's base and
    recovery LoRA), ``modifiers`` (each modifier's GGUF LoRA, config order), ``calibrator`` (Phase 2's),
    ``tokenizer`` (the HF directory the GGUF came from). Outputs: ``verdicts`` (JSONL, the router's table,
    :mod:`cogumi_tasks.routing.features`), ``stats`` (JSON: per domain each model's share correct and the labels).
    """
    if ctx.config.routing is None:
        raise StepFailed(f"config {ctx.config.name} has no routing section")
    cfg, router_cfg = ctx.config.routing.labels, ctx.config.routing.router
    models = list(router_cfg.models)
    names = [m.name for m in ctx.config.modifiers]
    if set(models[1:]) != set(names) or len(ctx.input_list("modifiers")) != len(names):
        raise StepFailed(f"routing.labels: the router's models {models[1:]} (besides base) must be the configured "
                         f"modifiers {names}, with one adapter each ({len(ctx.input_list('modifiers'))} given)")
    max_tokens = cfg.max_tokens or (ctx.config.eval.max_tokens if ctx.config.eval else 256)
    try:
        rows = domain_rows(list(iter_jsonl_dicts(ctx.fetch(ctx.input("items")))), models)
        prompts = general_prompts(ctx.fetch(cfg.source), cfg.general)
    except ValueError as exc:
        raise StepFailed(f"routing.labels: {exc}") from None
    started = time.perf_counter()
    if prompts:
        rows += _answer_general(ctx, prompts, models, max_tokens, cfg.source)
    general_s = time.perf_counter() - started
    raw, calibrated, ms = confidences(ctx, rows)
    table = [{"id": r["id"], "query": r["query"], "domain": r["domain"], "verdicts": r["verdicts"],
              "confidence": round(min(1.0, max(0.0, c)), 6), "raw_confidence": round(x, 6), "session": []}
             for r, x, c in zip(rows, raw, calibrated, strict=True)]
    write_jsonl(ctx.out("verdicts.jsonl"), table)
    stats = {"queries": len(table), "domain_queries": len(table) - len(prompts), "general_queries": len(prompts),
             "per_domain": summary(rows, models, dict(router_cfg.costs)), "confidence_ms": round(ms, 2),
             "general_answer_s": round(general_s, 1), "generations": len(prompts) * len(models),
             "confidence": "calibrated exp(mean answer-token log-prob) of the base's answer under the Phase 2 GGUF",
             "sessions": "none: the labelled queries carry no history; session features are 0 until served "
                         "traffic (query logs) adds turns", "cost": ctx.cost}
    ctx.out("stats.json").write_text(json.dumps(stats, indent=1))
    log.info("labels: %d queries (%d general), per model correct %s, confidence %.1f ms/query", len(table),
             len(prompts), stats["per_domain"]["all"]["correct"], ms)
    return StepOutput(files={"verdicts": "verdicts.jsonl", "stats": "stats.json"}, metrics=stats)
