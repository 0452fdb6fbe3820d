"""One self-contained HTML report (plus JSON with the same numbers) for a pipeline run.

A run's report holds every step result it used: the manifests it published and, through their
inputs, the cached results of earlier runs it reused. Steps are grouped by phase (the step name's
prefix); each shows its metrics, timings and cost, and plots are drawn where the data exists. The
plan's promised figures (``configs/plan_targets.yaml``) stand beside what was measured, or say
"not measured yet": no figure is ever filled in. Each is judged by ``core.verdict``: met only when its
interval clears the target, inconclusive when the interval straddles it, not met, or undefined. The
page is the Jinja2 template ``resources/report.html.j2``, rendered with autoescaping.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import io
import json
import time
from pathlib import Path
from typing import Any

import jinja2
import yaml

from cogumi_tasks.core.artifacts import MANIFEST, ArtifactStore, join_uri, parent_uri
from cogumi_tasks.core.steps import safe_name, used_manifests
from cogumi_tasks.core.verdict import OPS, UNDEFINED, VERDICTS, judge
from cogumi_tasks.eval.phase_tables import phase3_tables, phase4_tables, phase_time_table, phase_times, points_text
from cogumi_tasks.eval.stats import judge_pct_of_reference

PHASES = {"data": "Phase 0: dataset", "train": "Phase 1: training", "compress": "Phase 2: compression",
          "modifiers": "Phase 3: modifiers", "routing": "Phase 4: routing", "serve": "Phase 5: serving",
          "eval": "Evaluation"}
PHASE_TIME_STEP = "report.phase_time"  # targets read the report's own per-phase step time under this step name
NOT_MEASURED = "not measured yet"
NO_CHECK = "no check"


# ---------------------------------------------------------------- collecting a run
def _all_manifests(store: ArtifactStore, pipeline: str) -> list[dict]:
    """Every published manifest ``<pipeline>/<step>/<key>/_manifest.json`` (skips ``_runs``, caches)."""
    bucket = store.storage.bucket
    base = f"{pipeline.strip('/')}/"
    step_dirs: list[str] = []
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
        step_dirs += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    out = []
    for step_dir in step_dirs:
        if step_dir[len(base):].startswith("_"):
            continue
        for uri in store.list(f"s3://{bucket}/{step_dir}"):
            rel = uri[len(f"s3://{bucket}/{step_dir}"):].split("/")
            if len(rel) == 2 and rel[1] == MANIFEST:
                out.append(store.get_json(uri))
    return out


def _ancestors(store: ArtifactStore, roots: list[dict], by_prefix: dict[str, dict]) -> list[dict]:
    """Lineage of ``roots`` resolved against manifests already read (S3 only for other pipelines)."""
    seen = {m["prefix"] for m in roots}
    queue, out = list(roots), []
    while queue:
        current = queue.pop(0)
        for value in current.get("inputs", {}).values():
            for uri in [value] if isinstance(value, str) else value:
                if not isinstance(uri, str) or not uri.startswith("s3://"):
                    continue
                parent, prefix = None, parent_uri(uri)
                while prefix.count("/") > 3 and parent is None:
                    parent, prefix = by_prefix.get(prefix), parent_uri(prefix)
                parent = parent or store.producer_manifest(uri)
                if parent is not None and parent["prefix"] not in seen:
                    seen.add(parent["prefix"])
                    out.append(parent)
                    queue.append(parent)
    return out


def collect_run(store: ArtifactStore, pipeline: str, run_id: str | None = None) -> dict:
    """The manifests run ``run_id`` published or reused (cache hits) plus their lineage, and the
    run's cost ledger.

    ``run_id`` None picks the run of the most recently finished manifest.
    """
    from cogumi_tasks.core.ledger import read_run_ledger, summarize

    manifests = _all_manifests(store, pipeline)
    if run_id is None:
        if not manifests:
            raise LookupError(f"no step results under {store.uri(pipeline)}/: nothing to report")
        run_id = max(manifests, key=lambda m: m["timings"]["finished"])["run_id"]
    by_prefix = {m["prefix"]: m for m in manifests}
    used_prefixes = {u.rsplit("/", 1)[0] for u in used_manifests(store, store.uri(pipeline), run_id)}
    own = [m for m in manifests if m.get("run_id") == run_id or m["prefix"] in used_prefixes]
    used = own + _ancestors(store, own, by_prefix)
    rows = read_run_ledger(store, store.uri(pipeline, "_runs", safe_name(run_id), "ledger"))
    return {"pipeline": pipeline, "run_id": run_id,
            "manifests": sorted(used, key=lambda m: m.get("timings", {}).get("finished", 0)),
            "ledger": summarize(rows)}


# ---------------------------------------------------------------- targets
def load_targets(path: str | Path) -> dict:
    """Read and check ``plan_targets.yaml``; returns ``{"targets": [...]}``."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    targets = data.get("targets")
    if not isinstance(targets, list):
        raise ValueError(f"{path}: expected a top-level 'targets:' list")
    for i, t in enumerate(targets):
        where = f"{path}: target #{i + 1} ({t.get('id', '?') if isinstance(t, dict) else t!r})"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: expected a mapping")
        missing = [k for k in ("id", "phase", "promised", "step", "path") if k not in t]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        check = t.get("check")
        if check is not None:
            if check.get("op") not in OPS:
                raise ValueError(f"{where}: check.op must be one of {list(OPS)}, got {check.get('op')!r}")
            want_pair = check["op"] == "between"
            value = check.get("value")
            if want_pair != (isinstance(value, list) and len(value) == 2):
                raise ValueError(f"{where}: check.value must be {'[lo, hi]' if want_pair else 'a number'}")
        if t.get("interval", "beside") not in ("beside", "none"):
            raise ValueError(f"{where}: interval must be 'beside' or 'none', got {t['interval']!r}")
    return {"targets": targets}


def _lookup(obj: Any, path: list[str]) -> tuple[bool, Any]:
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        else:
            return False, None
    return True, obj


def evaluate_targets(manifests: list[dict], targets: dict) -> list[dict]:
    """Each target with what was measured (the latest matching manifest that has its path), its verdict and why.

    The figure's interval is ``<key>_ci`` or ``ci`` beside it, unless the target says ``interval: none`` (a size or a
    latency kept in the same dict as an accuracy and that accuracy's ``ci``). Verdicts are ``core.verdict.judge``'s:
    met only when the interval clears the check, inconclusive when it straddles it, not met when none of it does; a
    figure without an interval is compared directly; a figure recorded as None is undefined, except a % of a reference
    that solved nothing, whose ``>`` check is judged on the score (``eval.stats.judge_pct_of_reference``). A
    figure its step already judged (``verdict`` and ``reason`` beside it, e.g. the plan's sizes in
    ``compress.publish``) is shown as judged there, with the step's check.
    """
    out = []
    for t in targets.get("targets", []):
        path = str(t["path"]).split("/")
        row = {k: t.get(k) for k in ("id", "phase", "promised", "step", "path", "check", "note")}
        row.update(measured=None, ci=None, unit=None, source=None, status=NOT_MEASURED, reason=None)
        for m in sorted(manifests, key=lambda m: m.get("timings", {}).get("finished", 0), reverse=True):
            found, value = _lookup(m, path) if fnmatch.fnmatchcase(m["step"], t["step"]) else (False, None)
            if not found:
                continue
            _, parent = _lookup(m, path[:-1])
            parent = parent if isinstance(parent, dict) else {}
            ci = parent.get(f"{path[-1]}_ci", parent.get("ci")) if t.get("interval", "beside") == "beside" else None
            row.update(measured=value, source=f"{m['step']} ({'configured' if path[0] == 'config' else 'measured'})",
                       ci=ci if isinstance(ci, list) and len(ci) == 2 else None, unit=parent.get("unit"),
                       status=NO_CHECK)
            check, why = t.get("check"), parent.get("error") or parent.get("why")
            if parent.get("verdict") in VERDICTS and parent.get("reason"):
                row.update(status=parent["verdict"], reason=parent["reason"], check=parent.get("check") or check)
            elif check:
                if value is not None and not _is_number(value):
                    value, why = None, f"not a number: {value!r}"
                if value is None and parent.get("score_ci") and check["op"] in (">", ">="):  # reference solved 0
                    v = judge_pct_of_reference(parent, check["op"], check["value"], undefined_reason=why)
                else:
                    v = judge(value, check["op"], check["value"], row["ci"], undefined_reason=why)
                row.update(status=v.verdict, reason=v.reason)
            elif value is None:
                row.update(status=UNDEFINED, reason=why or "the step recorded no value (None)")
            break
        out.append(row)
    return out


# ---------------------------------------------------------------- flattening and formatting
def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """How a value is printed in the HTML (tests use it to find the JSON's numbers there)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "-"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, list | dict):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


def flatten(obj: Any, prefix: str = "", max_list: int = 12) -> dict[str, Any]:
    """Nested dicts as dotted keys; short lists inline, lists of dicts indexed, long lists summarized."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k), max_list))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj) and len(obj) <= max_list:
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]", max_list))
    elif isinstance(obj, list) and (len(obj) > max_list or any(isinstance(x, list | dict) for x in obj)):
        nums = [x for x in obj if _is_number(x)]
        span = f", min {fmt(min(nums))}, max {fmt(max(nums))}" if len(nums) == len(obj) else ""
        out[prefix] = f"[{len(obj)} items{span}; first: {fmt(obj[0])[:60]}, last: {fmt(obj[-1])[:60]}]"
    else:
        out[prefix] = obj
    return out


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "-"


def phase_of(step: str) -> str:
    head = step.split(".", 1)[0]
    return PHASES.get(head, f"Other steps ({head})")


# ---------------------------------------------------------------- plots
def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _bar(title: str, counts: dict, xlabel: str, ylabel: str = "count", vline: float | None = None) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    keys = list(counts)
    ax.bar([str(k) for k in keys], [counts[k] for k in keys], color="#4a7bb7")
    if any(len(str(k)) > 8 for k in keys):
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    if vline is not None:  # between the last bar under the threshold and the first at or above it
        below = sum(1 for k in keys if float(k) < float(vline))
        ax.axvline(below - 0.5, color="#c0392b", ls="--", label=f"keep threshold ({fmt(vline)})")
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _png(fig)


def _pct_plot(pct: dict, gates: dict) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot()
    domains = [d for d in pct if pct[d].get("pct") is not None]
    undefined = [d for d in pct if pct[d].get("pct") is None]
    if not domains:
        raise ValueError("no domain has a defined % of reference")
    vals = [pct[d]["pct"] for d in domains]
    cis = [pct[d].get("ci") or [pct[d]["pct"]] * 2 for d in domains]
    lo = [max(0.0, v - ci[0]) for v, ci in zip(vals, cis, strict=True)]
    hi = [max(0.0, ci[1] - v) for v, ci in zip(vals, cis, strict=True)]
    ax.bar(domains, vals, yerr=[lo, hi], capsize=6, color="#4a7bb7", label="% of reference (95% CI)")
    labelled = False
    for i, d in enumerate(domains):
        if d in gates:
            ax.hlines(gates[d], i - 0.4, i + 0.4, colors="#c0392b", linestyles="--", label=None if labelled else "gate")
            labelled = True
    ax.axhline(100, color="grey", lw=0.8)
    note = f"\n(undefined, the reference scored 0: {', '.join(undefined)})" if undefined else ""
    ax.set(title="% of reference by domain" + note, ylabel="% of reference")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    return _png(fig)


def _accuracy_bars(title: str, series: list[tuple[str, dict, str | None]]) -> str:
    """Grouped bars of accuracy by domain, one bar per series ``(label, {domain: {"accuracy", "ci"}}, colour)``, in %
    with their 95% intervals."""
    from matplotlib.figure import Figure

    domains = sorted({d for _, acc, _ in series for d in acc})
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for k, (label, acc, colour) in enumerate(series):
        ds = [d for d in domains if d in acc]
        vals = [100 * acc[d]["accuracy"] for d in ds]
        err = [[max(0.0, v - 100 * acc[d]["ci"][0]) for v, d in zip(vals, ds, strict=True)],
               [max(0.0, 100 * acc[d]["ci"][1] - v) for v, d in zip(vals, ds, strict=True)]]
        ax.bar([domains.index(d) + k * width for d in ds], vals, width=width, yerr=err, capsize=3, label=label,
               color=colour)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set(title=title, ylabel="% correct", ylim=(0, 105))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series), frameon=False, fontsize=8)
    return _png(fig)


def _modifier_scores_plot(models: dict) -> str:
    """Phase 3: held-out accuracy per domain of the base, the base with each modifier (and the recovery LoRA) and the
    reference, with 95% intervals (``modifiers.evaluate``'s table)."""
    names = sorted((m for m in models if "/" not in m), key=lambda m: (m != "base", m))
    ref = {d: e["reference"] for m in reversed(names) for d, e in models[m].items()}
    series = [("base" if m == "base" else f"base + {m}", {d: e["accuracy"] for d, e in models[m].items()}, None)
              for m in names]
    return _accuracy_bars("Phase 3: held-out accuracy by domain (95% CI)", [*series, ("reference", ref, "#999999")])


def _accuracy_plot(domains: dict) -> str:
    """Student and reference accuracy per domain with 95% intervals (defined even where % of reference is not)."""
    return _accuracy_bars("Accuracy by domain (95% CI)", [
        (label, {d: domains[d][who] for d in domains}, colour)
        for who, label, colour in (("ours", "student", "#4a7bb7"), ("reference", "reference", "#999999"))])


def _curve_plot(title: str, curves: dict[str, list], xlabel: str, ylabel: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


def _reliability_plot(title: str, rel: dict) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", label="perfect calibration")
    ax.plot(rel["confidence"], rel["accuracy"], marker="o", color="#4a7bb7", label="model")
    ax.set(title=title, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _quality_cost_plot(data: dict) -> str:
    """Routing: the threshold sweep as a quality-cost curve (each point a threshold, the chosen one marked) and
    every policy of the same evaluation as a labelled point."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    sweep = data["sweep"]
    ax.plot([p[0] for p in sweep], [100 * p[1] for p in sweep], marker=".", color="#4a7bb7",
            label="router + base-confidence threshold")
    at: dict[tuple[float, float], list[str]] = {}  # thresholds that land on the same point share one label
    for cost, quality, t in sweep:
        at.setdefault((round(cost, 4), round(quality, 4)), []).append(
            f"[{t:g}]" if t == data.get("chosen") else f"{t:g}")
    for i, ((cost, quality), names) in enumerate(at.items()):
        ax.annotate("/".join(names), (cost, 100 * quality), fontsize=7, xytext=(2, 3 + 8 * (i % 2)),
                    textcoords="offset points")
    for name, (cost, quality) in data["policies"].items():
        ax.scatter([cost], [100 * quality], s=18, color="#c0504d" if name == "router" else "#555")
        ax.annotate(name, (cost, 100 * quality), fontsize=7, xytext=(3, -9), textcoords="offset points")
    gain = data.get("gain_recovered")
    ax.set(title=f"Quality against cost per query, {data['over']}; thresholds on the curve, [chosen] recovers "
                 f"{'-' if gain is None else f'{100 * gain:.1f}%'} of the oracle's gain",
           xlabel="cost per query (base = 1)", ylabel="answered correctly (%)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _find_key(obj: Any, key: str, path: str = "") -> list[tuple[str, Any]]:
    if not isinstance(obj, dict):
        return []
    hits = [(f"{path}{key}", obj[key])] if key in obj else []
    for k, v in obj.items():
        if k != key:
            hits += _find_key(v, key, f"{path}{k}.")
    return hits


def make_plots(manifests: list[dict]) -> list[dict]:
    """Plots for the data present: ``{"id", "phase", "title", "data", "png"}`` each."""
    plots: list[dict] = []
    last = {m["step"]: m for m in manifests}  # manifests are sorted: the latest result of each step wins

    def add(pid: str, step: str, title: str, data: Any, draw: Any) -> None:
        try:
            plots.append({"id": pid, "phase": phase_of(step), "title": title, "data": data, "png": draw()})
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # malformed data: say so, keep the report
            plots.append({"id": pid, "phase": phase_of(step), "title": title, "data": data, "png": None,
                          "error": f"{type(exc).__name__}: {exc}"})

    pub = last.get("data.publish", {}).get("metrics", {})
    hist = pub.get("judge_score_histogram")
    if not hist:
        hist = {}
        for m in manifests:
            for k, v in m["metrics"].get("score_histogram", {}).items() if m["step"] == "data.score" else ():
                hist[k] = hist.get(k, 0) + v
    if hist:
        hist = dict(sorted(hist.items(), key=lambda kv: float(kv[0])))
        threshold = last.get("data.score", {}).get("config", {}).get("dataset.score", {}).get("threshold")
        add("judge_score_histogram", "data.score", "Judge scores", hist,
            lambda: _bar("Judge scores (all judged answers)", hist, "score", vline=threshold))
    funnel_keys = ("prompts", "answers_generated", "judged", "passed_judge", "final_records")
    if all(k in pub for k in funnel_keys):
        funnel = {k: pub[k] for k in funnel_keys}
        add("funnel", "data.publish", "Records through Phase 0", funnel,
            lambda: _bar("Records through Phase 0", funnel, "stage", "records"))
    for key in ("per_domain", "per_teacher"):
        src = pub.get(key) or last.get("data.prompts", {}).get("metrics", {}).get(key)
        if src:
            add(key, "data.publish", f"Records {key.replace('_', ' ')}", src,
                lambda src=src, key=key: _bar(f"Records {key.replace('_', ' ')}", src, key.split("_", 1)[1]))

    ev = last.get("eval.run", {})
    domains = ev.get("metrics", {}).get("domains") or {}
    if domains:
        add("accuracy_by_domain", "eval.run", "Accuracy by domain", domains, lambda: _accuracy_plot(domains))
    pct = ev.get("metrics", {}).get("pct_of_reference") or {}
    if pct:
        gates = dict(ev.get("config", {}).get("eval", {}).get("gates", {}))
        for g in last.get("eval.gate", {}).get("metrics", {}).get("gates", []):
            gates[g["domain"]] = g["threshold"]
        add("pct_of_reference", "eval.run", "% of reference by domain", {"pct": pct, "gates": gates},
            lambda: _pct_plot(pct, gates))

    curves = {f"{m['step']}: {p}": v for m in manifests for key in ("loss_curve", "train_loss_curve", "eval_loss_curve")
              for p, v in _find_key(m["metrics"], key) if v}
    if curves:
        step = next(iter(curves)).split(":")[0]
        add("loss_curves", step, "Loss curves", curves, lambda: _curve_plot("Loss", curves, "step", "loss"))
    clusters = last.get("train.failure_analysis", {}).get("metrics", {}).get("clusters")
    if clusters:
        sizes = {f"{c['id']}: {str(c.get('label'))[:28]}": c["size"] for c in clusters}
        add("failure_clusters", "train.failure_analysis", "Failure clusters", sizes,
            lambda: _bar("Failure clusters (size, judge's label)", sizes, "cluster", "failed items"))
    by_domain = last.get("train.publish", {}).get("metrics", {}).get("by_domain")
    if by_domain:
        scores = {f"{d} {when}": row[when] for d, row in by_domain.items() for when in ("before", "after")
                  if row.get(when) is not None}
        add("distill_before_after", "train.publish", "Score by domain before/after distillation", scores,
            lambda: _bar("Mean score by domain, before / after targeted distillation", scores, "domain", "score"))
    cal = last.get("compress.calibrate", {}).get("metrics", {})
    for when in ("before", "after"):
        rel = cal.get(f"reliability_{when}")
        if rel and rel.get("confidence"):
            add(f"reliability_{when}", "compress.calibrate", f"Reliability {when} calibration", rel,
                lambda rel=rel, when=when: _reliability_plot(f"{when} calibration (ECE {fmt(cal.get('ece_' + when))})",
                                                             rel))
    table = last.get("compress.publish", {}).get("metrics", {}).get("rows")
    if table:
        sizes = {r["stage"]: r["gb"] for r in table if r.get("gb") is not None}
        add("compression_sizes", "compress.publish", "Size of each compression stage (GB on disk)", sizes,
            lambda: _bar("Bytes on disk per stage (GB)", sizes, "stage", "GB"))
    models = last.get("modifiers.publish", {}).get("metrics", {}).get("scores", {}).get("table")
    if models:
        add("modifier_scores", "modifiers.publish", "Phase 3: held-out accuracy by domain, base and modifiers", models,
            lambda: _modifier_scores_plot(models))
    routing = last.get("routing.publish", {}).get("metrics", {})
    th = routing.get("thresholds") or {}
    if th.get("sweep"):  # the policies of the evaluation the sweep was made on
        over = str(th.get("over") or "the holdout split")
        pols = ((routing.get("cross_validation") or {}).get("policies") if "cross-validated" in over
                else routing.get("policies")) or {}
        chosen = (th.get("chosen") or {}).get("threshold")
        qc = {"over": over, "chosen": chosen,
              "gain_recovered": next((s.get("gain_recovered") for s in th["sweep"] if s["threshold"] == chosen), None),
              "sweep": [[s["cost"], s["quality"], s["threshold"]] for s in th["sweep"]],
              "policies": {k: [p["cost"], p["quality"]] for k, p in pols.items()}}
        add("routing_quality_cost", "routing.publish", "Routing: quality against cost", qc,
            lambda: _quality_cost_plot(qc))
    for m in manifests:
        for p, rel in _find_key(m["metrics"], "reliability"):
            if isinstance(rel, dict) and rel.get("accuracy") and rel.get("confidence"):
                add(f"reliability:{m['step']}:{p}", m["step"], f"Reliability: {m['step']} {p}", rel,
                    lambda m=m, p=p, rel=rel: _reliability_plot(f"{m['step']}: {p}", rel))
    return plots


# ---------------------------------------------------------------- the report
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _cost_row(cost: dict) -> list[Any]:
    return [cost.get(k, 0) for k in ("calls", "cached_calls", "prompt_tokens", "completion_tokens", "usd")]


def _target_view(t: dict) -> dict:
    """A target row as the template shows it: the check, the measured text and the verdict's CSS class."""
    check = t["check"] or {}
    classes = {"met": "met", "not met": "notmet", "inconclusive": "inconclusive", "undefined": "undefined",
               NOT_MEASURED: "nm"}
    ci, unit = t["ci"], f" {t['unit']}" if t["unit"] else ""
    measured = NOT_MEASURED if t["source"] is None else (
        fmt(t["measured"]) + unit + (f" (CI {fmt(ci[0])}-{fmt(ci[1])})" if ci else ""))
    check_text = f"{check['op']} {fmt(check['value'])}{' x ' + check['of'] if check.get('of') else ''}" if check else ""
    return {**t, "check_text": check_text, "cls": classes.get(t["status"], ""), "measured_text": measured}


@functools.cache
def _template() -> jinja2.Template:
    """``resources/report.html.j2`` with autoescaping: every value reaches the page escaped."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("cogumi_tasks", "resources"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, when=_when, slug=_slug)
    env.tests["num"] = _is_number
    env.globals["cost_row"] = _cost_row
    return env.get_template("report.html.j2")


def _step_entry(m: dict, run_id: str) -> dict:
    t = m.get("timings", {})
    return {"step": m["step"], "version": m.get("version"), "prefix": m["prefix"], "run_id": m.get("run_id"),
            "reused": m.get("run_id") != run_id, "phase": phase_of(m["step"]), "timings": t,
            "cost": m.get("cost") or {}, "metrics": m.get("metrics", {}), "metrics_flat": flatten(m.get("metrics", {})),
            "outputs": m.get("outputs", {}), "code_version": m.get("code_version")}


BEFORE_AFTER_HEADERS = ["domain", "n", "untrained", "after SFT", "after distillation", "rise SFT (points)",
                        "rise distilled (points)", "reference", "% of reference: untrained", "SFT", "distilled"]


def before_after_rows(manifests: list[dict]) -> tuple[dict, list[list[str]]]:
    """Phase 1's before/after table (``eval.before_after``, latest result) and its rows as the report prints
    them: accuracies in % with 95% CIs, rises in points with paired CIs, % of reference or why it is undefined."""
    table = next((m["metrics"]["before_after"] for m in reversed(manifests)
                  if m["step"] == "eval.before_after" and m.get("metrics", {}).get("before_after")), {})

    def acc(a: dict) -> str:
        return f"{100 * a['accuracy']:.1f}% ({a['correct']}/{a['n']}; CI {100 * a['ci'][0]:.1f}-{100 * a['ci'][1]:.1f})"

    def pct(p: dict) -> str:
        return p["why"] if p["pct"] is None else f"{p['pct']:.1f}% (CI {p['ci'][0]:.1f}-{p['ci'][1]:.1f})"

    rows = [[key, row["n"], acc(row["untrained"]), acc(row["sft"]), acc(row["distilled"]), points_text(row["rise_sft"]),
             points_text(row["rise_distilled"]), acc(row["reference"]),
             *(pct(row["pct_of_reference"][m]) for m in ("untrained", "sft", "distilled"))]
            for key, row in table.items()]
    return table, rows


def build_report(run: dict, targets: dict) -> tuple[str, dict]:
    """The HTML report and a JSON-able dict with the same numbers (plots as their data, not images)."""
    run_id = run["run_id"]
    steps = [_step_entry(m, run_id) for m in run["manifests"]]
    plots = make_plots(run["manifests"])
    prefixes = list(PHASES)
    times = dict(sorted(phase_times(run["manifests"]).items(),
                        key=lambda kv: prefixes.index(kv[0]) if kv[0] in prefixes else len(prefixes)))
    target_rows = evaluate_targets([*run["manifests"], {"step": PHASE_TIME_STEP, "metrics": times}], targets)
    started = [s["timings"].get("started") for s in steps if s["timings"].get("started") and not s["reused"]]
    finished = [s["timings"].get("finished") for s in steps if s["timings"].get("finished") and not s["reused"]]
    summary = {"steps": len(steps), "reused_from_earlier_runs": sum(s["reused"] for s in steps),
               "step_seconds": round(sum(s["timings"].get("seconds", 0) for s in steps if not s["reused"]), 3),
               "wall_seconds": round(max(finished) - min(started), 3) if started and finished else None,
               "ledger": run.get("ledger", {})}
    before_after, before_after_table = before_after_rows(run["manifests"])
    tables = [phase_time_table(times, phase_of), *phase3_tables(run["manifests"]), *phase4_tables(run["manifests"])]
    data = {"pipeline": run["pipeline"], "run_id": run_id, "generated_at": time.time(), "summary": summary,
            "targets": target_rows, "steps": steps, "before_after": before_after, "tables": tables,
            "plots": [{k: v for k, v in p.items() if k != "png"} for p in plots]}

    order = list(PHASES.values())
    phases = sorted({s["phase"] for s in steps}, key=lambda p: order.index(p) if p in order else len(order))
    ledger = summary["ledger"] or {}
    summary_rows = [
        ["step results", summary["steps"]], ["reused from earlier runs", summary["reused_from_earlier_runs"]],
        ["step seconds (this run)", summary["step_seconds"]], ["wall seconds (this run)", summary["wall_seconds"]],
        ["LLM calls (ledger)", ledger.get("calls", 0)], ["cached calls", ledger.get("cached_calls", 0)],
        ["prompt tokens", ledger.get("prompt_tokens", 0)], ["completion tokens", ledger.get("completion_tokens", 0)],
        ["USD (ledger)", ledger.get("usd", 0.0)]]
    page = _template().render(
        title=f"Cogumi report: {run['pipeline']} / run {run_id}", generated=data["generated_at"], phases=phases,
        steps=steps, plots=plots, summary_rows=summary_rows, targets=[_target_view(t) for t in target_rows],
        endpoint_rows=[[k, *_cost_row(v)] for k, v in sorted(ledger.get("per_endpoint", {}).items())],
        before_after_headers=BEFORE_AFTER_HEADERS, before_after_rows=before_after_table, tables=tables)
    return page, data


def write_report(store: ArtifactStore, pipeline: str, run_id: str | None, out_dir: Path,
                 targets_path: Path) -> tuple[Path, Path]:
    """Write ``report-<run>.html`` and ``.json`` under ``out_dir`` and upload both to
    ``s3://<bucket>/<pipeline>/_reports/<run>/``; returns the local paths."""
    run = collect_run(store, pipeline, run_id)
    page, data = build_report(run, load_targets(targets_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = safe_name(run["run_id"])
    html_path, json_path = out_dir / f"report-{name}.html", out_dir / f"report-{name}.json"
    html_path.write_text(page, encoding="utf-8")
    json_path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")
    for path in (html_path, json_path):
        store.upload(path, join_uri(store.uri(pipeline, "_reports", name), path.name))
    return html_path, json_path
