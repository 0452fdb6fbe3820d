"""Phase 3's LoRA side: train a modifier on what the cascade solved, shrink it by rank, and measure it on the domains.

A modifier is served beside Phase 2's recovery LoRA: llama.cpp applies both to the Q5_K_M base in one context
(``GGUFBackend(adapters=[(recovery, 1.0), (modifier, adapter_scale)])``; per request in a server, see
``docs/phase3.md``). Every score here is of that combination, greedy, on the modifier's ``heldout`` suite, against
the reference endpoint (``eval.reference``, through the response cache: the items of ``eval.run`` are not paid
twice) with 95% bootstrap intervals (:mod:`cogumi_tasks.eval.tables`), judged by
:func:`cogumi_tasks.core.verdict.judge`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

from cogumi_tasks.core.records import iter_jsonl_dicts, write_jsonl
from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step
from cogumi_tasks.modifiers import step_modifier

log = logging.getLogger("cogumi")

EVAL_CODE = ("cogumi_tasks.eval.backends", "cogumi_tasks.eval.suites", "cogumi_tasks.eval.tables",
             "cogumi_tasks.eval.stats", "cogumi_tasks.llm.step_calls", "cogumi_tasks.world",
             "cogumi_tasks.world.answers", "cogumi_tasks.world.automation", "cogumi_tasks.world.base",
             "cogumi_tasks.world.code", "cogumi_tasks.world.judge", "cogumi_tasks.world.reasoning",
             "cogumi_tasks.world.sandbox")
EVAL_READS = ("eval.reference", "eval.reference_shots", "eval.max_tokens", "eval.sandbox", "eval.bootstrap",
              "eval.seed", "llm")


def _eval_cfg(ctx: StepContext) -> Any:
    if ctx.config.eval is None:
        raise StepFailed(f"{ctx.spec.name}: config {ctx.config.name} has no eval section (eval.reference scores the "
                         "held-out items)")
    return ctx.config.eval


# ---------------------------------------------------------------- train
@step("modifiers.train", version=1, reads=("modifiers", "train.sft"), inputs=("model", "solved", "dataset"),
      outputs=("adapter", "lora_gguf", "mix", "metrics"),
      code=("cogumi_tasks.modifiers", "cogumi_tasks.train.lora", "cogumi_tasks.train.sft",
            "cogumi_tasks.models.convert",
            "cogumi_tasks.models.step_io"))
def train(ctx: StepContext) -> StepOutput:
    """A modifier's LoRA (params ``modifier``) on what its cascade solved, with a replay share of Phase 0 rows.

    The training set is every solved row plus a seeded draw of Phase 0 rows making ``replay_fraction`` of the
    whole; LoRA rank, alpha, lr and epochs are the modifier's, target modules the modifier's or ``train.sft``'s,
    the loss on the answers only (:func:`cogumi_tasks.train.sft.build_examples`, as in Phase 1).

    Inputs: ``model`` (Phase 2's pruned HF directory, the weights its GGUF was made from), ``solved`` (each tier's
    solved.jsonl), ``dataset`` (Phase 0's JSONL). Outputs: ``adapter`` (peft), ``lora_gguf`` (for llama.cpp),
    ``mix`` (the training rows), ``metrics``. Fails when no tier solved anything.
    """
    from cogumi_tasks.core.config import SFTConfig
    from cogumi_tasks.models.convert import convert_lora_to_gguf
    from cogumi_tasks.models.step_io import dataset_rows
    from cogumi_tasks.train.lora import train_lora

    mod = step_modifier(ctx)
    solved, by_tier = [], {}
    for uri in ctx.input_list("solved"):
        for i, r in enumerate(iter_jsonl_dicts(ctx.fetch(uri)), 1):
            if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
                raise StepFailed(f"{uri} line {i}: a solved row needs string fields prompt and response")
            solved.append({"prompt": r["prompt"], "response": r["response"], "source": f"tier{r.get('tier', '?')}"})
            by_tier[str(r.get("tier", "?"))] = by_tier.get(str(r.get("tier", "?")), 0) + 1
    if not solved:
        raise StepFailed(f"modifiers.train {mod.name}: the cascade solved no task ({len(ctx.input_list('solved'))} "
                         "tier outputs, all empty): nothing to train on")
    pool = dataset_rows(ctx)
    random.Random(0).shuffle(pool)
    n_replay = min(len(pool), round(len(solved) * mod.replay_fraction / (1 - mod.replay_fraction)))
    mix = solved + [{**r, "source": "replay"} for r in pool[:n_replay]]
    random.Random(1).shuffle(mix)
    write_jsonl(ctx.out("mix.jsonl"), mix)

    base = ctx.config.train.sft if ctx.config.train else SFTConfig()
    cfg = base.model_copy(update={"rank": mod.rank, "alpha": mod.alpha, "lr": mod.lr, "epochs": mod.epochs,
                                  "max_steps": None, "target_modules": mod.target_modules or base.target_modules})
    model_dir = ctx.fetch_dir(ctx.input("model"))
    log.info("modifiers.train %s: %d solved rows (by tier %s) + %d replayed, rank %d on %s", mod.name, len(solved),
             by_tier, n_replay, cfg.rank, ",".join(cfg.target_modules))
    training = train_lora(ctx, model_dir, [{"prompt": r["prompt"], "response": r["response"]} for r in mix], cfg,
                          merge=False)  # served as base GGUF + adapters, never merged
    convert_lora_to_gguf(ctx.out_dir / "adapter", model_dir, ctx.out("adapter.gguf"))
    metrics = {"modifier": mod.name, "domain": mod.domain, "solved_rows": len(solved), "solved_by_tier": by_tier,
               "replay_rows": n_replay, "rows": len(mix), "rank": cfg.rank, "alpha": cfg.alpha,
               "target_modules": list(cfg.target_modules), "training": training,
               "safetensors_bytes": (ctx.out_dir / "adapter" / "adapter_model.safetensors").stat().st_size,
               "gguf_bytes": ctx.out("adapter.gguf").stat().st_size}
    return StepOutput(files={"adapter": "adapter/", "lora_gguf": "adapter.gguf", "mix": "mix.jsonl",
                             "metrics": "metrics.json"}, metrics=metrics)


# ---------------------------------------------------------------- scoring on held-out items
def heldout(ctx: StepContext, suite: Any) -> list:
    from cogumi_tasks.eval.suites import load_suite

    return load_suite(suite, ctx.fetch)


def scored(ctx: StepContext, items: list, texts: list[str]) -> list[Any]:
    from cogumi_tasks.eval.suites import score_items
    from cogumi_tasks.world.sandbox import Limits

    return score_items(items, texts, Limits(**_eval_cfg(ctx).sandbox.model_dump()))


def reference_answers(ctx: StepContext, items: list) -> tuple[list[str], list[Any]]:
    """The reference endpoint's answers to ``items`` (response cache first) and their scores; sets ``ctx.cost``."""
    from cogumi_tasks.core.ledger import ResponseCache
    from cogumi_tasks.eval.backends import EndpointBackend, generate_budgeted
    from cogumi_tasks.eval.suites import reference_conversations
    from cogumi_tasks.llm.step_calls import make_ledger

    cfg = _eval_cfg(ctx)
    ledger = make_ledger(ctx)
    backend = EndpointBackend(cfg.reference, ctx.config.llm, ledger, ResponseCache(ctx.store, ctx.llm_cache_prefix),
                              step=ctx.spec.name)
    try:
        gens = generate_budgeted(backend, reference_conversations(items, cfg.reference_shots, cfg.seed),
                                 [i.max_tokens or cfg.max_tokens for i in items])
    finally:
        backend.close()
        ledger.flush()
        ctx.cost = ledger.totals()
    texts = [g.text for g in gens]
    return texts, scored(ctx, items, texts)


def answer_rows(ctx: StepContext, backend: Any, adapters: list[tuple[Path, float]], items: list,
                ref: tuple[list[str], list[Any]], **extra: Any) -> list[dict]:
    """Greedy answers of the base with ``adapters`` to ``items``, scored, beside the reference's."""
    from cogumi_tasks.eval.backends import generate_budgeted

    backend.set_adapters(adapters)
    gens = generate_budgeted(backend, [i.messages for i in items],
                             [i.max_tokens or _eval_cfg(ctx).max_tokens for i in items])
    scores = scored(ctx, items, [g.text for g in gens])
    return [{**extra, "id": it.id, "suite": it.suite, "domain": it.domain, "prompt": it.messages[-1]["content"],
             "answer": g.text, "score": s.score, "error": s.error or g.error, "reason": s.detail.get("reason"),
             "reference_answer": rt, "reference_score": rs.score}
            for it, g, s, rt, rs in zip(items, gens, scores, ref[0], ref[1], strict=True)]


def score_entry(ctx: StepContext, rows: list[dict]) -> dict:
    """Accuracy and the reference's with intervals, % of reference (undefined when the reference got 0)."""
    from cogumi_tasks.eval.tables import accuracy, pct_entry

    cfg = _eval_cfg(ctx)
    ours, ref = [float(r["score"]) for r in rows], [float(r["reference_score"]) for r in rows]
    return {"n": len(rows), "accuracy": accuracy(ours, cfg.bootstrap, cfg.seed),
            "reference": accuracy(ref, cfg.bootstrap, cfg.seed),
            "pct_of_reference": pct_entry(ours, ref, cfg.bootstrap, cfg.seed)}


def recovery(ctx: StepContext) -> list[tuple[Path, float]]:
    lora = ctx.inputs.get("lora")
    return [(ctx.fetch(ctx.input("lora")), 1.0)] if lora else []


# ---------------------------------------------------------------- compress
def variant_gate(pct: dict, vs_base: dict, gate_pct: float) -> dict:
    """A variant's gate: its domain score ``>= gate_pct`` % of the reference
    (:func:`cogumi_tasks.eval.stats.judge_pct_of_reference`) **and** above the base's on the same items (the paired
    difference's interval above 0 points). The second part keeps the gate meaningful where the reference solved
    nothing (there any score above 0 clears the first part, a modifier that adds nothing included). Met only when
    both are met; otherwise the worse of the two verdicts (undefined, then not met, then inconclusive)."""
    from cogumi_tasks.core.verdict import VERDICTS, judge
    from cogumi_tasks.eval.stats import judge_pct_of_reference

    parts = {"pct_of_reference": judge_pct_of_reference(pct, ">=", gate_pct),
             "over_base": judge(vs_base["points"], ">", 0, vs_base["ci"])}
    verdict = max((v.verdict for v in parts.values()), key=VERDICTS.index)  # VERDICTS runs from best to worst
    reason = "; ".join(f"{name}: {v.verdict} ({v.reason})" for name, v in parts.items())
    return {"pct": gate_pct, "verdict": verdict, "reason": reason, "parts": {k: v.as_dict() for k, v in parts.items()}}


def choose(variants: list[dict]) -> tuple[dict, bool]:
    """The smallest variant (GGUF bytes) whose gate verdict is met, else the best by % of reference (then
    accuracy, then size), reported as failing. Returns (variant, passed)."""
    passing = [v for v in variants if v["gate"]["verdict"] == "met"]
    if passing:
        return min(passing, key=lambda v: v["gguf_bytes"]), True

    def merit(v: dict) -> tuple:
        pct = v["pct_of_reference"].get("pct")
        return (pct if pct is not None else float("-inf"), v["accuracy"]["accuracy"], -v["gguf_bytes"])

    return max(variants, key=merit), False


@step("modifiers.compress", version=2, reads=("modifiers", *EVAL_READS),
      inputs=("adapter", "adapter_gguf", "gguf", "lora"), outputs=("variants", "lora_gguf", "items"),
      code=("cogumi_tasks.modifiers", "cogumi_tasks.modifiers.shrink", "cogumi_tasks.core.verdict", *EVAL_CODE))
def compress(ctx: StepContext) -> StepOutput:
    """Each sparsity level of a modifier (params ``modifier``) as a reduced rank, measured and gated.

    Sparsity ``s`` keeps rank ``r' = max(1, round(r * (1 - s)))`` of the adapter's rank ``r``, so ``r' / r`` of its
    LoRA parameters (``r * (in + out)`` per module) are stored: a truncated SVD of each module's delta, written as a
    real lower-rank peft adapter and GGUF LoRA (:mod:`cogumi_tasks.modifiers.shrink`; zeros in a dense file would
    save nothing). For the full-rank adapter and each variant: stored bytes (stat of the safetensors and the GGUF),
    the held-out domain score of base + recovery + variant with its interval, the reference's on the same items, %
    of reference with its interval, the paired difference to the base (+ recovery, no modifier) on the same items
    and the gate verdict (:func:`variant_gate`: ``gate_pct`` % of the reference and above the base, each met only
    when its interval clears it). The smallest variant that meets the gate is chosen, else the best, reported as
    failing.

    Inputs: ``adapter`` (modifiers.train's peft adapter), ``adapter_gguf`` (its GGUF LoRA), ``gguf`` (Phase 2's
    base), ``lora`` (optional: Phase 2's recovery GGUF LoRA). Outputs: ``variants`` (JSON table), ``lora_gguf``
    (the chosen variant), ``items`` (per variant and item: answer, score, the reference's; rank 0 is the base without
    the modifier); every variant's files
    stay under ``variants/`` of the step's prefix.
    """
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.eval.tables import paired_difference
    from cogumi_tasks.modifiers.shrink import PEFT_CONFIG, PEFT_WEIGHTS, reduce_gguf_lora, reduce_peft, reduced_rank

    mod = step_modifier(ctx)
    adapter_dir = ctx.fetch_dir(ctx.input("adapter"))
    rank = int(json.loads((adapter_dir / PEFT_CONFIG).read_text())["r"])
    levels = [(0.0, rank)] + [(s, reduced_rank(rank, s)) for s in mod.sparsity]
    files: dict[int, dict] = {}
    for _, k in levels:
        if k in files:
            continue
        peft_dir, gguf_path = ctx.out_dir / "variants" / f"rank{k}", ctx.out(f"variants/rank{k}.gguf")
        if k == rank:
            shutil.copytree(adapter_dir, peft_dir)
            shutil.copy2(ctx.fetch(ctx.input("adapter_gguf")), gguf_path)
        else:
            reduce_peft(adapter_dir, peft_dir, k)
            reduce_gguf_lora(ctx.fetch(ctx.input("adapter_gguf")), gguf_path, k)
        files[k] = {"gguf": gguf_path, "gguf_bytes": gguf_path.stat().st_size,
                    "safetensors_bytes": (peft_dir / PEFT_WEIGHTS).stat().st_size}

    items = heldout(ctx, mod.heldout)
    ref = reference_answers(ctx, items)
    rows_by_rank: dict[int, list[dict]] = {}
    backend = GGUFBackend(ctx.fetch(ctx.input("gguf")), name=f"base+{mod.name}")
    try:
        rows_by_rank[0] = answer_rows(ctx, backend, recovery(ctx), items, ref, modifier=mod.name, rank=0)
        for k, f in sorted(files.items()):
            rows_by_rank[k] = answer_rows(ctx, backend, [*recovery(ctx), (f["gguf"], mod.adapter_scale)], items,
                                          ref, modifier=mod.name, rank=k)
    finally:
        backend.close()
    cfg, base_scores = _eval_cfg(ctx), [r["score"] for r in rows_by_rank[0]]
    variants = []
    for s, k in levels:
        entry = score_entry(ctx, rows_by_rank[k])
        vs_base = paired_difference([r["score"] for r in rows_by_rank[k]], base_scores, cfg.bootstrap, cfg.seed)
        gate = variant_gate(entry["pct_of_reference"], vs_base, mod.gate_pct)
        variants.append({"sparsity": s, "rank": k, "params_kept_share": round(k / rank, 4),
                         "gguf_bytes": files[k]["gguf_bytes"], "safetensors_bytes": files[k]["safetensors_bytes"],
                         **entry, "vs_base": vs_base, "gate": gate, "passed_gate": gate["verdict"] == "met",
                         "lora_gguf": f"variants/rank{k}.gguf"})
        log.info("modifiers.compress %s: sparsity %.2f rank %d: %d bytes, accuracy %.3f (%+.0f points over the base), "
                 "gate %s", mod.name, s, k, files[k]["gguf_bytes"], entry["accuracy"]["accuracy"], vs_base["points"],
                 gate["verdict"])
    chosen, passed = choose(variants)
    table = {"modifier": mod.name, "domain": mod.domain, "rank": rank, "gate_pct": mod.gate_pct,
             "base": score_entry(ctx, rows_by_rank[0]), "variants": variants,
             "chosen": {"sparsity": chosen["sparsity"], "rank": chosen["rank"]},
             "passed_gate": passed, "cost": ctx.cost}
    ctx.out("variants.json").write_text(json.dumps(table, indent=1))
    write_jsonl(ctx.out("items.jsonl"), [r for k in sorted(rows_by_rank) for r in rows_by_rank[k]])
    return StepOutput(files={"variants": "variants.json", "lora_gguf": chosen["lora_gguf"], "items": "items.jsonl"},
                      metrics=table)


# ---------------------------------------------------------------- evaluate
def known_answers(ctx: StepContext, mods: list, adapter_uris: list[str]) -> dict[tuple[str, str], dict]:
    """Rows ``modifiers.compress`` already answered with the models ``evaluate`` runs, by (model, item id).

    Input ``known`` (optional): each modifier's compress ``items``, config order. A modifier's rows count only when
    its compress step ran on this step's ``gguf`` and ``lora`` and chose the adapter given in ``modifiers``
    (checked in its manifest): then its rank-0 rows are ``base`` (recovery only) and its chosen rank's rows are the
    modifier (recovery + adapter at ``adapter_scale``), greedy on the same backend. Both steps read the same eval
    settings, so a compress whose ``eval.max_tokens`` differed would have re-run before this step in the DAG;
    answering them again would repeat the same generations."""
    uris = ctx.input_list("known") if ctx.inputs.get("known") else []
    if uris and len(uris) != len(mods):
        raise StepFailed(f"modifiers.evaluate: {len(uris)} known item files for {len(mods)} modifiers (config order)")
    memo: dict[tuple[str, str], dict] = {}
    for m, uri, adapter in zip(mods, uris, adapter_uris, strict=False):
        man = ctx.store.producer_manifest(uri) if uri.startswith("s3://") else None
        same = (man is not None and man.get("outputs", {}).get("lora_gguf") == adapter
                and man.get("inputs", {}).get("gguf") == ctx.input("gguf")
                and man.get("inputs", {}).get("lora") == ctx.inputs.get("lora"))
        if not same:
            log.info("modifiers.evaluate: %s's compress answers not reused (another base, recovery or adapter)", m.name)
            continue
        chosen = man["metrics"]["chosen"]["rank"]
        for r in iter_jsonl_dicts(ctx.fetch(uri)):
            model = "base" if r["rank"] == 0 else m.name if r["rank"] == chosen else None
            if model:
                memo[(model, r["id"])] = {k: v for k, v in r.items() if k not in ("modifier", "rank")}
    return memo


def answer_or_reuse(ctx: StepContext, backend: Any, adapters: list[tuple[Path, float]], items: list,
                    ref: tuple[list[str], list[Any]], memo: dict[tuple[str, str], dict], model: str) -> list[dict]:
    """:func:`answer_rows` for the items ``memo`` lacks for ``model``; the others taken from it (``reused``)."""
    todo = [i for i, it in enumerate(items) if (model, it.id) not in memo]
    fresh = iter(answer_rows(ctx, backend, adapters, [items[i] for i in todo], ([ref[0][i] for i in todo],
                                                                                 [ref[1][i] for i in todo]),
                             model=model) if todo else [])
    return [{**memo[(model, it.id)], "model": model, "reused": True} if (model, it.id) in memo else next(fresh)
            for it in items]


@step("modifiers.evaluate", version=2, reads=("modifiers", *EVAL_READS),
      inputs=("gguf", "lora", "modifiers", "known"), outputs=("items", "summary"),
      code=("cogumi_tasks.core.verdict", *EVAL_CODE))
def evaluate(ctx: StepContext) -> StepOutput:
    """The base and each modifier on every modifier's held-out domain, against the reference.

    Models: ``base`` (Phase 2's GGUF with its recovery LoRA), ``<name>`` (base + recovery + the modifier at its
    ``adapter_scale``) on every domain (does a modifier hurt the others?), and ``<name>/alone`` (base + the
    modifier without the recovery LoRA; modifiers with ``alone`` set) on its own domain; the reference once per
    item. Per (model, domain): accuracy and the reference's with intervals, % of reference, the difference to the
    base in points with a paired interval (``alone`` also to the modifier with recovery), and per modifier the
    verdict on "raises its domain over the base" (met only when the interval of the difference excludes zero).
    Answers that ``modifiers.compress`` already made with the same model are reused (:func:`known_answers`).

    Inputs: ``gguf``, ``lora`` (optional: recovery), ``modifiers`` (each modifier's chosen GGUF LoRA, in the
    config's modifier order), ``known`` (optional: each modifier's compress ``items``, same order). Outputs:
    ``items`` (per model and item; ``reused`` marks a compress answer), ``summary`` (JSON, also the metrics, with
    the counts of generated and reused answers).
    """
    from cogumi_tasks.core.verdict import judge
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.eval.tables import paired_difference

    mods = ctx.config.modifiers
    uris = ctx.input_list("modifiers")
    if len(uris) != len(mods):
        raise StepFailed(f"modifiers.evaluate: {len(uris)} adapters for {len(mods)} configured modifiers "
                         f"({[m.name for m in mods]}): one per modifier, in config order")
    cfg = _eval_cfg(ctx)
    suites: dict[str, list] = {}
    for m in mods:
        suites.setdefault(m.domain, []).extend(heldout(ctx, m.heldout))
    items = [it for d in suites for it in {i.id: i for i in suites[d]}.values()]
    ref = reference_answers(ctx, items)
    rec = recovery(ctx)
    adapters = [ctx.fetch(u) for u in uris]
    memo = known_answers(ctx, mods, uris)
    rows: list[dict] = []
    backend = GGUFBackend(ctx.fetch(ctx.input("gguf")), name="base")
    try:
        rows += answer_or_reuse(ctx, backend, rec, items, ref, memo, "base")
        for m, path in zip(mods, adapters, strict=True):
            rows += answer_or_reuse(ctx, backend, [*rec, (path, m.adapter_scale)], items, ref, memo, m.name)
            if rec and m.alone:
                own = [i for i, it in enumerate(items) if it.domain == m.domain]
                rows += answer_rows(ctx, backend, [(path, m.adapter_scale)], [items[i] for i in own],
                                    ([ref[0][i] for i in own], [ref[1][i] for i in own]), model=f"{m.name}/alone")
    finally:
        backend.close()

    def group(model: str, domain: str) -> list[dict]:
        return sorted((r for r in rows if r["model"] == model and r["domain"] == domain), key=lambda r: r["id"])

    table: dict[str, dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        table[model] = {}
        for domain in suites:
            got = group(model, domain)
            if not got:
                continue
            entry = score_entry(ctx, got)
            if model != "base":
                base = [r["score"] for r in group("base", domain)]
                entry["vs_base"] = paired_difference([r["score"] for r in got], base, cfg.bootstrap, cfg.seed)
            if model.endswith("/alone"):
                with_rec = [r["score"] for r in group(model.removesuffix("/alone"), domain)]
                entry["vs_with_recovery"] = paired_difference([r["score"] for r in got], with_rec, cfg.bootstrap,
                                                              cfg.seed)
            table[model][domain] = entry
    verdicts = {}
    for m in mods:
        d = table[m.name][m.domain]["vs_base"]
        verdicts[m.name] = {"domain": m.domain, "raises_domain": judge(d["points"], ">", 0, d["ci"]).as_dict(),
                            "others": {dom: {"points": e["vs_base"]["points"], "ci": e["vs_base"]["ci"],
                                             "hurts": e["vs_base"]["ci"][1] < 0}
                                       for dom, e in table[m.name].items() if dom != m.domain}}
    reused = sum(1 for r in rows if r.get("reused"))
    summary = {"models": list(table), "domains": list(suites), "recovery": bool(rec), "table": table,
               "verdicts": verdicts, "answers": {"generated": len(rows) - reused, "reused": reused},
               "cost": ctx.cost}
    write_jsonl(ctx.out("items.jsonl"), rows)
    ctx.out("summary.json").write_text(json.dumps(summary, indent=1))
    return StepOutput(files={"items": "items.jsonl", "summary": "summary.json"}, metrics=summary)
