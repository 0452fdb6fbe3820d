"""Served traffic of one data interval: the query log's lines in it, a budgeted sample, and every model's verdict.

Step ``recalibrate.label`` (DAG ``recalibrate``, params ``start`` and ``end``: the run's data interval, ISO 8601):

- reads the query log objects of the interval's hours (``query-logs/dt=.../hour=.../``, :mod:`.querylog`) and keeps
  the lines whose ``ts`` lies in ``[start, end)``; feedback lines are joined to their request (by ``request_id``);
- the candidates are the ``cogumi-auto`` requests whose base answer and raw confidence are known (the base answered,
  or its answer was logged as ``base_answer`` before another model answered); the sample is the first
  ``recalibrate.sample`` of them ordered by sha256 of (seed, request id), so a re-run takes the same queries;
- the sample's queries come from the release most of them were served by (fetched from the registry): every model
  that did not answer a query when it was served answers it now (greedy, the release's engine, its adapters and
  scales), and every answer is judged through the pipeline's one judge (:func:`cogumi_tasks.world.judge.judge_rows`:
  the verifier where the query is a task of the tiny world, the LLM judge otherwise).

Output ``labels`` (JSONL, one sampled request a line): ``request_id``, ``ts``, ``query``, ``domain``, ``release``,
``route`` (what answered when served), ``raw_confidence`` (the base's, as served), ``verdicts`` (model -> correct),
``judge_kinds``, ``feedback`` and ``escalated`` (the users' signals, reported beside the labels). Re-running an
interval reuses this step's output (its cache key is the interval and the config), so no call is paid twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from cogumi_tasks.core.steps import StepContext, StepFailed, StepOutput, step

log = logging.getLogger("cogumi")


def parse_instant(value: str, name: str) -> datetime:
    """An ISO 8601 instant as an aware UTC datetime (naive values are UTC)."""
    try:
        ts = datetime.fromisoformat(str(value))
    except ValueError:
        raise StepFailed(f"recalibrate: param {name!r}: {value!r} is not an ISO 8601 date-time") from None
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC)


def hour_prefixes(log_prefix: str, start: datetime, end: datetime) -> list[str]:
    """The query log's ``dt=.../hour=.../`` prefixes that can hold lines of ``[start, end)``."""
    from cogumi_tasks.core.artifacts import join_uri

    out, hour = [], start.replace(minute=0, second=0, microsecond=0)
    while hour < end:
        out.append(join_uri(log_prefix, f"dt={hour:%Y-%m-%d}", f"hour={hour:%H}") + "/")
        hour += timedelta(hours=1)
    return out


def interval_lines(store: Any, log_prefix: str, start: datetime, end: datetime) -> tuple[list[dict], dict]:
    """(the requests answered in ``[start, end)`` with their feedback joined, counts). A line that is not JSON is
    counted and skipped (the log is the serving API's own output; nothing else writes there)."""
    requests: dict[str, dict] = {}
    feedback: list[dict] = []
    counts = Counter()
    for prefix in hour_prefixes(log_prefix, start, end):
        for uri in sorted(store.list(prefix)):
            if not uri.endswith(".jsonl"):
                continue
            counts["objects"] += 1
            for n, raw in enumerate(store.get_bytes(uri).decode().splitlines(), 1):
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    ts = parse_instant(line["ts"], "ts")
                except (json.JSONDecodeError, KeyError, TypeError, StepFailed):
                    counts["bad_lines"] += 1
                    log.warning("query log %s line %d: not a log line; skipped", uri, n)
                    continue
                if not start <= ts < end:
                    continue
                counts["lines"] += 1
                if "route" in line:
                    requests[line["request_id"]] = line
                else:
                    feedback.append(line)
    for fb in feedback:
        if fb.get("request_id") in requests:
            requests[fb["request_id"]]["feedback"] = fb.get("feedback")
    rows = sorted(requests.values(), key=lambda r: (r["ts"], r["request_id"]))
    counts.update(requests=len(rows), feedback_up=sum(r.get("feedback") == "up" for r in rows),
                  feedback_down=sum(r.get("feedback") == "down" for r in rows),
                  escalated=sum(bool(r.get("escalated")) for r in rows))
    return rows, dict(counts)


def base_answer(line: dict) -> str | None:
    """The base's answer to a logged request: the answer when the base answered, else what was logged for it."""
    return line.get("answer") if line.get("route") == "base" else line.get("base_answer")


def sample_requests(rows: list[dict], n: int, seed: int) -> list[dict]:
    """The first ``n`` candidates (auto requests with the base's answer and raw confidence) by sha256(seed, id)."""
    candidates = [r for r in rows if r.get("model") == "cogumi-auto" and r.get("raw_confidence") is not None
                  and base_answer(r) is not None and r.get("query")]
    rank = {r["request_id"]: hashlib.sha256(f"{seed}:{r['request_id']}".encode()).hexdigest() for r in candidates}
    return sorted(candidates, key=lambda r: rank[r["request_id"]])[:n]


def answer_missing(release: Any, serve_cfg: Any, sample: list[dict], max_tokens: int) -> dict[tuple[str, str], str]:
    """(request id, model) -> answer for every model of ``release`` that did not answer a sampled request."""
    from cogumi_tasks.serve.engine import XllamacppEngine

    todo = [(r, m) for r in sample for m in release.models if m != "base" and m != r["route"]]
    if not todo:
        return {}
    engine = XllamacppEngine.for_release(release, serve_cfg)
    engine.start()

    async def run() -> list[str]:
        out = []
        for r, m in todo:
            scales = {m: float(release.manifest["models"][m]["scale"])}
            c = await engine.chat([{"role": "user", "content": r["query"]}], scales, max_tokens, temperature=0.0)
            out.append(c.text)
        return out

    try:
        texts = asyncio.run(run())
    finally:
        engine.stop()
    return {(r["request_id"], m): t for (r, m), t in zip(todo, texts, strict=True)}


@step("recalibrate.label", version=1, reads=("recalibrate", "serve", "judge", "llm", "dataset.score"),
      outputs=("labels",),
      code=("cogumi_tasks.serve.release", "cogumi_tasks.serve.engine", "cogumi_tasks.world", "cogumi_tasks.world.judge",
            "cogumi_tasks.serve.querylog"))
def label_step(ctx: StepContext) -> StepOutput:
    """Sample the interval's served requests and label every model's answer to each.

    Params: ``start``, ``end`` (the data interval). Inputs: none (the query log and the registry of the config's
    storage). Outputs: ``labels`` (JSONL, the module docstring's rows); metrics: the interval's traffic counts
    (requests, feedback, escalations, releases), the sample, the generations and the judge kinds.
    """
    from cogumi_tasks.core.artifacts import join_uri
    from cogumi_tasks.core.records import write_jsonl
    from cogumi_tasks.serve.release import load_release
    from cogumi_tasks.world import instance_from_prompt
    from cogumi_tasks.world.judge import judge_rows, threshold

    cfg = ctx.config.recalibrate
    if cfg is None:
        raise StepFailed(f"config {ctx.config.name} has no recalibrate section")
    start, end = parse_instant(ctx.params.get("start"), "start"), parse_instant(ctx.params.get("end"), "end")
    if end <= start:
        raise StepFailed(f"recalibrate: the interval [{start}, {end}) is empty")
    rows, counts = interval_lines(ctx.store, ctx.store.uri(ctx.config.name, "query-logs"), start, end)
    releases = Counter(r.get("release") for r in rows)
    sample = sample_requests(rows, cfg.sample, cfg.seed)
    metrics: dict[str, Any] = {"interval": [start.isoformat(), end.isoformat()], **counts,
                               "releases": dict(releases), "candidates": len(sample_requests(rows, len(rows), 0))}
    release_id = Counter(r["release"] for r in sample).most_common(1)[0][0] if sample else None
    sample = [r for r in sample if r["release"] == release_id]
    labelled: list[dict] = []
    if sample:
        root = ctx.store.fetch_prefix(join_uri(ctx.store.uri(ctx.config.name, "releases"), release_id),
                                      ctx.tmp_dir / "release")
        release = load_release(root)
        extra = answer_missing(release, ctx.config.serve, sample, cfg.max_tokens)
        to_judge = []
        for r in sample:
            inst = instance_from_prompt(r["query"])
            for m in release.models:
                answer = base_answer(r) if m == "base" else r["answer"] if m == r["route"] else \
                    extra[(r["request_id"], m)]
                to_judge.append({"id": f"{r['request_id']}@{m}", "prompt": r["query"], "response": answer,
                                 "task": inst.to_dict() if inst else None,
                                 "domain": inst.domain if inst else "general"})
        judged, quarantine, stats = judge_rows(ctx, to_judge, source=ctx.store.uri(ctx.config.name, "query-logs"))
        if quarantine.rows:
            log.warning("recalibrate: %d answers had no parseable verdict; counted as wrong", len(quarantine.rows))
        verdict = {j["id"]: j["judge_score"] >= threshold(j, ctx.config.dataset.score) for j in judged}
        kinds = {j["id"]: j["judge_kind"] for j in judged}
        for r, first in zip(sample, range(0, len(to_judge), len(release.models)), strict=True):
            ids = [f"{r['request_id']}@{m}" for m in release.models]
            labelled.append({"request_id": r["request_id"], "ts": r["ts"], "query": r["query"],
                             "domain": to_judge[first]["domain"], "release": release_id, "route": r["route"],
                             "raw_confidence": float(r["raw_confidence"]),
                             "verdicts": {m: verdict.get(i, False) for m, i in zip(release.models, ids, strict=True)},
                             "judge_kinds": sorted({kinds.get(i, "none") for i in ids}),
                             "feedback": r.get("feedback"), "escalated": bool(r.get("escalated"))})
        metrics.update(generations=len(extra), judge_kinds=stats["judge_kinds"],
                       correct={m: sum(x["verdicts"][m] for x in labelled) for m in release.models})
    metrics.update(release=release_id, sampled=len(labelled))
    write_jsonl(ctx.out("labels.jsonl"), labelled)
    log.info("recalibrate %s..%s: %d requests (%d feedback, %d escalated) served by %s; %d labelled",
             start.isoformat(), end.isoformat(), counts.get("requests", 0),
             counts.get("feedback_up", 0) + counts.get("feedback_down", 0), counts.get("escalated", 0),
             dict(releases), len(labelled))
    return StepOutput(files={"labels": "labels.jsonl"}, metrics=metrics)
