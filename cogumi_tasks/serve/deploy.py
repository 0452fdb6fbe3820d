"""Phase 5 steps: build a release, validate it served on loopback, and make it ``current`` only if it passed.

- ``serve.release``: Phase 3's bundle (base GGUF, recovery LoRA, modifier LoRAs) and Phase 4's (router, escalation
  detector, calibrator, threshold) copied into one release directory (:mod:`cogumi_tasks.serve.release`) with a
  model card of measured figures beside the plan's. Its id is a digest of the two bundles, so a retry builds the
  same release.
- ``serve.validate``: the release served by the real engine and gateway on a free 127.0.0.1 port; every held-out
  item of the modifiers' domains asked through ``/v1/chat/completions`` as ``cogumi-auto`` (greedy), scored by the
  evaluation harness's checkers, and compared with the reference's score on the same items (Phase 3's answers):
  % of reference per domain against ``eval.gates`` (:func:`cogumi_tasks.eval.stats.check_gates`: met only when
  the interval's lower bound clears the gate), decode tokens/s, the route mix, and the human-evaluation tally
  (feedback in the query logs so far; "not measured" when there is none).
- ``serve.promote``: copies the release to the registry (``<name>/releases/<id>/``, ``release.json`` last) and
  writes the ``current`` pointer (``releases/current.json``) last, only when validation passed; otherwise the
  pointer stays where it was and the task fails saying which gate failed. With ``serve.hub.repo_id`` set it then
  uploads the release to the Hugging Face Hub (:mod:`cogumi_tasks.serve.hub`; token from env HF_TOKEN).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from typing import Any

from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step

log = logging.getLogger("cogumi")

PLAN_MB = 668  # "668 MB" for the whole released system on Llama-3.1-8B


def _bundle(ctx: StepContext, name: str) -> dict:
    return json.loads(ctx.fetch(ctx.input(name)).read_text())


def release_id(*bundles: dict) -> str:
    digest = hashlib.sha256(json.dumps(bundles, sort_keys=True).encode()).hexdigest()
    return f"r-{digest[:12]}"


def model_card(rid: str, figures: dict) -> str:
    """A model card of measured figures only, the plan's beside them; YAML front matter for the Hub."""
    lines = ["---", "license: apache-2.0", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "tags: [cogumi, gguf,"
             " lora, routing]", "---", f"# Cogumi release {rid}", "",
             "Every figure below was measured by the pipeline run that built this release; the plan's figure is "
             "beside it.", "", "| figure | measured | plan |", "|---|---|---|"]
    for name, (measured, plan) in figures.items():
        lines.append(f"| {name} | {measured} | {plan} |")
    return "\n".join(lines) + "\n"


@step("serve.release", version=1, inputs=("routing", "modifiers"), outputs=("release",),
      code=("cogumi_tasks.serve.release",))
def release_step(ctx: StepContext) -> StepOutput:
    """Build the release directory.

    Inputs: ``routing`` (``routing.publish``'s bundle.json), ``modifiers`` (``modifiers.publish``'s bundle.json).
    Outputs: ``release`` (the directory: :mod:`cogumi_tasks.serve.release`'s layout plus ``MODEL_CARD.md``).
    """
    from cogumi_tasks.serve.release import build_release

    routing, mods = _bundle(ctx, "routing"), _bundle(ctx, "modifiers")
    rid = release_id(routing, mods)
    out = ctx.out("release")
    parts = {"base": ctx.fetch(mods["base_gguf"]),
             "modifiers": {m["name"]: ctx.fetch(m["lora_gguf"]) for m in mods["modifiers"]},
             "router": ctx.fetch_dir(routing["router"]), "escalation": ctx.fetch_dir(routing["escalation"]),
             "recovery": ctx.fetch(mods["recovery_lora"]) if mods.get("recovery_lora") else None}
    sizes = {"base": parts["base"].stat().st_size,
             "modifiers": sum(p.stat().st_size for p in parts["modifiers"].values()),
             "recovery": parts["recovery"].stat().st_size if parts["recovery"] else 0,
             "router": sum(p.stat().st_size for p in parts["router"].rglob("*") if p.is_file()),
             "escalation": sum(p.stat().st_size for p in parts["escalation"].rglob("*") if p.is_file())}
    total = sum(sizes.values())
    producer = ctx.store.producer_manifest(ctx.input("routing")) if ctx.input("routing").startswith("s3://") else None
    routing_table = (producer or {}).get("metrics") or {}
    router = routing_table.get("router") or {}
    esc = (routing_table.get("escalation") or {}).get("student") or {}
    figures = {"release size": (f"{total / 1e6:.1f} MB", f"{PLAN_MB} MB (for Llama-3.1-8B)"),
               "router accuracy (holdout)": (f"{router.get('accuracy')} CI {router.get('accuracy_ci')}", "97%"),
               "escalation detector accuracy": (f"{esc.get('accuracy')} CI {esc.get('ci')}", "94%"),
               "escalation detector size": (f"{(esc.get('bytes') or 0) / 1e6:.2f} MB", "3 MB"),
               "confidence threshold": (routing.get("threshold"), "0.80")}
    out.mkdir(parents=True)
    (out / "MODEL_CARD.md").write_text(model_card(rid, figures))
    cal = json.loads(ctx.fetch(routing["calibrator"]).read_text())
    manifest = build_release(
        out, base=parts["base"], modifiers=parts["modifiers"], router=parts["router"],
        escalation=parts["escalation"], calibrator=cal, recovery=parts["recovery"], threshold=routing["threshold"],
        costs=routing.get("costs"), domains={m["name"]: m["domain"] for m in mods["modifiers"]},
        scales={m["name"]: m["scale"] for m in mods["modifiers"]}, release_id=rid,
        lineage={"routing": ctx.input("routing"), "modifiers": ctx.input("modifiers")},
        figures={k: list(v) for k, v in figures.items()})
    metrics = {"id": rid, "bytes": sizes, "total_bytes": total, "files": len(manifest["files"]),
               "plan_mb": PLAN_MB, "models": list(manifest["models"])}
    log.info("release %s: %d files, %.1f MB (plan %d MB for the 8B system)", rid, len(manifest["files"]),
             total / 1e6, PLAN_MB)
    return StepOutput(files={"release": "release/"}, metrics=metrics)


class LocalGateway:
    """The release's engine and gateway on a free 127.0.0.1 port, in this process (``with`` starts and stops)."""

    def __init__(self, release: Any, ctx: StepContext, key: str) -> None:
        self.release, self.ctx, self.key = release, ctx, key
        self.url = ""

    def __enter__(self) -> LocalGateway:
        from cogumi_tasks.serve.engine import XllamacppEngine
        from cogumi_tasks.serve.gateway import create_app
        from cogumi_tasks.serve.threaded import ThreadedServer

        rel, cfg = self.release, self.ctx.config.serve
        self.engine = XllamacppEngine.for_release(rel, cfg)
        self.engine.start()
        memory = self.ctx.config.routing.memory if self.ctx.config.routing else None
        app = create_app(rel, cfg, self.engine, keys=[self.key], memory_config=memory,
                         memory_path=str(self.ctx.tmp_dir / "sessions.sqlite"))
        self.server = ThreadedServer(app, stop_timeout_s=30)
        try:
            self.url = self.server.start().url
        except RuntimeError:
            self.engine.stop()
            raise StepFailed("serve.validate: the gateway did not start on 127.0.0.1") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.engine.stop()


def ask_all(url: str, key: str, items: list, max_tokens: int) -> list[dict]:
    """Each item's answer from ``cogumi-auto`` with the gateway's route and timings; an item's suite
    ``max_tokens`` before ``max_tokens``."""
    import httpx

    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            r = client.post("/v1/chat/completions", json={"model": "cogumi-auto", "messages": item.messages,
                                                          "max_tokens": item.max_tokens or max_tokens,
                                                          "temperature": 0,
                                                          "user": f"validate-{i}"})
            seconds = time.perf_counter() - t0
            if r.status_code != 200:
                raise StepFailed(f"serve.validate: item {item.id}: HTTP {r.status_code}: {r.text[:300]}")
            body = r.json()
            meta = body.get("cogumi") or {}
            out.append({"id": item.id, "domain": item.domain, "answer": body["choices"][0]["message"]["content"] or "",
                        "route": meta.get("route"), "reason": meta.get("reason"),
                        "completion_tokens": (body.get("usage") or {}).get("completion_tokens", 0),
                        "seconds": seconds, "decode_s": meta.get("decode_s")})
    return out


def decode_rate(answers: list[dict], n: int = 1000, seed: int = 0) -> dict:
    """Decode tokens/s over the answers with at least two tokens: the tokens after the first over their decode
    seconds (the gateway's ``decode_s``: the engine's own timing of a whole answer, or the seconds from the first
    streamed token to the last), summed over answers (``eval.stats.bootstrap_ratio_ci``: a 95% bootstrap interval
    over answers). Prefill, routing and a base pass before a routed answer are outside it and inside
    ``median_end_to_end`` (completion tokens over request seconds)."""
    from cogumi_tasks.eval.stats import bootstrap_ratio_ci

    timed = [a for a in answers if a.get("completion_tokens", 0) > 1 and (a.get("decode_s") or 0) > 0]
    tps = [a["completion_tokens"] / a["seconds"] for a in answers if a["completion_tokens"] and a["seconds"] > 0]
    out: dict = {"answers_timed": len(timed), "median_end_to_end": round(statistics.median(tps), 2) if tps else None,
                 "decode": None, "decode_ci": None}
    if timed:
        point, low, high = bootstrap_ratio_ci([a["completion_tokens"] - 1 for a in timed],
                                              [a["decode_s"] for a in timed], n=n, seed=seed)
        out.update(decode=round(point / 100, 2), decode_ci=[round(low / 100, 2), round(high / 100, 2)])
    out["note"] = ("decode: tokens after the first / decode seconds (the engine's timing), summed over answers, "
                   "95% bootstrap interval over answers; median_end_to_end: completion tokens / request seconds "
                   "through the gateway (prefill and routing included; cogumi-auto answers a low-confidence query "
                   "twice, by the base and by the routed model)")
    return out


def feedback_tally(ctx: StepContext) -> dict:
    """Thumbs up/down in the serving API's query logs so far (the human-evaluation tally)."""
    prefix = ctx.store.uri(ctx.config.name, "query-logs") + "/"
    up = down = 0
    for uri in ctx.store.list(prefix):
        if not uri.endswith(".jsonl"):
            continue
        for line in ctx.store.get_bytes(uri).decode().splitlines():
            fb = json.loads(line).get("feedback") if line.strip() else None
            up, down = up + (fb == "up"), down + (fb == "down")
    n = up + down
    return {"n": n, "up": up, "down": down, "mean": round(up / n, 4) if n else None,
            "status": "measured" if n else "not measured (no feedback in the query logs yet)"}


@step("serve.validate", version=1, reads=("serve", "eval", "modifiers", "routing.memory"),
      inputs=("release", "items"), outputs=("validation", "answers"),
      code=("cogumi_tasks.serve.gateway", "cogumi_tasks.serve.decide", "cogumi_tasks.serve.engine",
            "cogumi_tasks.serve.release", "cogumi_tasks.eval.stats", "cogumi_tasks.eval.suites",
            "cogumi_tasks.modifiers.lora_steps"))
def validate_step(ctx: StepContext) -> StepOutput:
    """Serve the release on loopback and check it against the gates.

    Inputs: ``release`` (the directory), ``items`` (Phase 3's ``modifiers.evaluate`` answers: the reference's score
    per held-out item). Outputs: ``validation`` (JSON, also the metrics: per domain accuracy and % of reference with
    intervals, the gate verdicts, ``passed``, decode tokens/s, route mix, feedback tally), ``answers`` (JSONL).
    """
    import secrets

    from cogumi_tasks.core.records import iter_jsonl_dicts, write_jsonl
    from cogumi_tasks.eval.stats import check_gates, pct_of_reference
    from cogumi_tasks.modifiers.lora_steps import _eval_cfg, heldout, scored
    from cogumi_tasks.serve.release import load_release

    cfg = _eval_cfg(ctx)
    release = load_release(ctx.fetch_dir(ctx.input("release")))
    suites: dict[str, list] = {}
    for m in ctx.config.modifiers:
        suites.setdefault(m.domain, []).extend(heldout(ctx, m.heldout))
    items = [it for d in suites for it in {i.id: i for i in suites[d]}.values()]
    ref = {r["id"]: float(r["reference_score"]) for r in iter_jsonl_dicts(ctx.fetch(ctx.input("items")))
           if r.get("model") == "base"}
    missing = [it.id for it in items if it.id not in ref]
    if missing:
        raise StepFailed(f"serve.validate: {len(missing)} held-out items have no reference score in "
                         f"{ctx.input('items')} (first {missing[0]!r}): Phase 3 evaluated other items")
    key = "cv-" + secrets.token_urlsafe(24)
    with LocalGateway(release, ctx, key) as gw:
        answers = ask_all(gw.url, key, items, cfg.max_tokens)
    scores = scored(ctx, items, [a["answer"] for a in answers])
    rows = [{**a, "score": s.score, "reference_score": ref[a["id"]]} for a, s in zip(answers, scores, strict=True)]
    table = pct_of_reference([{"domain": r["domain"], "ours": r["score"], "reference": r["reference_score"]}
                              for r in rows], n=cfg.bootstrap, seed=cfg.seed)
    gates = check_gates(table, dict(cfg.gates))
    routes = [a["route"] for a in answers]
    validation = {
        "release": release.id, "n": len(rows), "pct_of_reference": table,
        "gates": [{"domain": g.domain, "threshold": g.threshold, "verdict": g.verdict, "reason": g.reason,
                   "passed": g.passed} for g in gates],
        "passed": all(g.passed for g in gates),  # no gates configured: nothing to fail
        "gates_configured": dict(cfg.gates),
        "tokens_per_s": decode_rate(answers, cfg.bootstrap, cfg.seed),
        "route_mix": {m: routes.count(m) / len(routes) for m in release.models} if routes else {},
        "feedback": feedback_tally(ctx)}
    write_jsonl(ctx.out("answers.jsonl"), rows)
    ctx.out("validation.json").write_text(json.dumps(validation, indent=1))
    log.info("validate %s: %s; gates %s", release.id, "passed" if validation["passed"] else "FAILED",
             "; ".join(f"{g.domain} {g.verdict}" for g in gates))
    return StepOutput(files={"validation": "validation.json", "answers": "answers.jsonl"}, metrics=validation)


@step("serve.promote", version=1, reads=("serve.hub",), inputs=("release", "validation"), outputs=("pointer",),
      code=("cogumi_tasks.serve.release", "cogumi_tasks.serve.hub"))
def promote_step(ctx: StepContext) -> StepOutput:
    """Copy the release into the registry and point ``current`` at it, only when its validation passed.

    Inputs: ``release`` (the directory), ``validation`` (``serve.validate``'s). Outputs: ``pointer`` (JSON: the
    ``current.json`` written, plus ``hub``: :func:`~cogumi_tasks.serve.hub.push_release`'s result when
    ``serve.hub.repo_id`` is set). Raises (the task fails, the pointer untouched) when validation did not pass, or
    when the Hub upload is configured but HF_TOKEN is empty; a failed upload fails the task after the pointer moved.
    """
    from cogumi_tasks.core.artifacts import join_uri
    from cogumi_tasks.serve.hub import HubError, hub_token, push_release
    from cogumi_tasks.serve.release import CURRENT, load_release, publish_release

    validation = json.loads(ctx.fetch(ctx.input("validation")).read_text())
    registry = ctx.store.uri(ctx.config.name, "releases")
    pointer_uri = join_uri(registry, CURRENT)
    if not validation.get("passed"):
        was = ctx.store.get_json(pointer_uri) if ctx.store.exists(pointer_uri) else None
        failed = [f"{g['domain']}: {g['reason']}" for g in validation.get("gates", []) if not g.get("passed")]
        raise StepFailed(f"release {validation.get('release')} not promoted; current stays "
                         f"{(was or {}).get('id', 'unset')}. Failed gates: " + ("; ".join(failed) or "none configured"))
    hub = ctx.config.serve.hub
    try:
        token = hub_token() if hub.repo_id else None  # checked before anything moves
    except HubError as exc:
        raise StepFailed(f"release {validation.get('release')} not promoted: {exc}") from None
    root = ctx.fetch_dir(ctx.input("release"))
    release = load_release(root)
    # the release's files, release.json after them, then the pointer last (serving follows it); a retry after
    # the pointer moved finds it naming this release and changes nothing
    pointer = dict(publish_release(ctx.store, root, registry, extra={"validation": ctx.input("validation")}))
    if hub.repo_id:
        try:
            pointer["hub"] = push_release(root, hub.repo_id, token=token, endpoint=hub.endpoint, private=hub.private)
        except HubError as exc:
            raise StepFailed(f"release {release.id} is current but not on the Hub: {exc}") from exc
    ctx.out("pointer.json").write_text(json.dumps(pointer, indent=1))
    log.info("release %s is current (was %s)", release.id, pointer["previous"])
    return StepOutput(files={"pointer": "pointer.json"}, metrics=pointer)
