"""Tables the run report prints per phase from the steps' published metrics (Phase 3 onwards).

Each table is ``{"phase", "id", "title", "note", "headers", "rows"}``; the report renders it under its phase.
Only figures a step measured appear; a missing one prints as "-".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cogumi_tasks.core.verdict import num

PHASE3 = "Phase 3: modifiers"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _usd(x: Any) -> str:
    return "-" if x is None else f"${x:.4f}"


def _acc(a: Any) -> str:
    """An accuracy entry ``{"accuracy", "ci"}`` (or a bare share) in % with its interval."""
    if isinstance(a, dict):
        ci = a.get("ci") or [None, None]
        return f"{_pct(a.get('accuracy'))} (CI {_pct(ci[0])}-{_pct(ci[1])})" if ci[0] is not None else _pct(
            a.get("accuracy"))
    return _pct(a)


def _pct_ref(p: Any) -> str:
    """A % of reference entry ``{"pct", "ci", "why"}``: the figure with its interval, or why it is undefined."""
    if not isinstance(p, dict):
        return "-"
    if p.get("pct") is None:
        return p.get("why") or "undefined"
    ci = p.get("ci") or [None, None]
    return f"{p['pct']:.1f}%" + (f" (CI {ci[0]:.1f}-{ci[1]:.1f})" if ci[0] is not None else "")


def points_text(d: Any) -> str:
    """A difference entry ``{"points", "ci"}`` (``eval.tables.paired_difference``) in points with its interval."""
    if not isinstance(d, dict) or d.get("points") is None:
        return "-"
    ci = d.get("ci") or [None, None]
    return f"{d['points']:+.1f}" + (f" (CI {ci[0]:+.1f} to {ci[1]:+.1f})" if ci[0] is not None else "")


def _mix(models: list[str], shares: Any) -> str:
    """A route mix (shares in label-map order) as "base 50.0% / code 25.0% / ..."."""
    return " / ".join(f"{m} {_pct(x)}" for m, x in zip(models, shares or [], strict=False))


def _mb(nbytes: Any) -> str:
    return "-" if not nbytes else f"{nbytes / 1e6:.2f} MB"


def _latest(manifests: list[dict], step: str) -> dict:
    return next((m for m in reversed(manifests) if m["step"] == step), {})


def phase_times(manifests: list[dict]) -> dict[str, dict]:
    """Per phase (the step name's prefix, e.g. ``modifiers``) of the step results a report holds: how many, the
    runs that made them, their summed step seconds, the span from the first start to the last finish, and the CPU
    counts the steps recorded (``cpus``; manifests older than that field have none).

    The span includes what ran between the steps (Airflow's scheduling, task start-up, another prefix's steps in
    the same DAG, e.g. Phase 1's ``eval.*``) and is the figure a user waits; it is None, with ``why``, when the
    steps come from more than one run (the span would count the time between the runs)."""
    acc: dict[str, dict] = {}
    for m in manifests:
        t = m.get("timings") or {}
        e = acc.setdefault(m["step"].split(".", 1)[0], {"steps": 0, "runs": set(), "seconds": 0.0, "starts": [],
                                                         "ends": [], "cpus": set()})
        e["steps"] += 1
        e["runs"].add(m.get("run_id"))
        e["seconds"] += t.get("seconds") or 0.0
        e["starts"] += [t["started"]] if t.get("started") else []
        e["ends"] += [t["finished"]] if t.get("finished") else []
        e["cpus"] |= {t["cpus"]} if t.get("cpus") else set()
    out = {}
    for prefix, e in acc.items():
        one_run = len(e["runs"]) == 1 and bool(e["starts"]) and bool(e["ends"])
        out[prefix] = {"steps": e["steps"], "runs": sorted(str(r) for r in e["runs"]),
                       "step_seconds": round(e["seconds"], 3),
                       "span_seconds": round(max(e["ends"]) - min(e["starts"]), 3) if one_run else None,
                       "cpus": sorted(e["cpus"])}
        if not one_run:
            out[prefix]["why"] = f"made by {len(e['runs'])} runs: a span across runs would count the time between them"
    return out


def phase_time_table(times: dict[str, dict], title: Callable[[str], str]) -> dict:
    """:func:`phase_times` as the run summary's table; ``title`` maps a step prefix to its phase's name."""
    rows = [[title(prefix), t["steps"], len(t["runs"]), t["step_seconds"],
             t["span_seconds"] if t["span_seconds"] is not None else t["why"],
             ", ".join(map(str, t["cpus"])) or "not recorded"] for prefix, t in times.items()]
    return {"phase": "Run summary", "id": "phase-time", "title": "Step time per phase",
            "note": "Every step result this report holds, whichever run made it, by step-name prefix: the steps' own "
                    "seconds summed, and the span from the first step's start to the last one's finish (only when "
                    "one run made them all), which includes what ran between them: scheduling, task start-up, and "
                    "the evaluation steps that Phases 1 and 2 run; CPUs as each step recorded them.",
            "headers": ["phase", "steps", "runs", "step seconds (summed)", "span seconds", "CPUs"], "rows": rows}


def phase3_tables(manifests: list[dict]) -> list[dict]:
    """The tier table, the sizes per sparsity level and the held-out scores by domain, from ``modifiers.publish``'s
    table."""
    table = _latest(manifests, "modifiers.publish").get("metrics") or {}
    mods = table.get("modifiers") or {}
    scores = _scores_table(table.get("scores") or {})
    scores_out = [scores] if scores["rows"] else []
    if not mods:
        return scores_out
    tier_rows, size_rows = [], []
    for name, m in mods.items():
        c = m.get("cascade") or {}
        tier_rows.append([name, "test (base)", "-", c.get("tested"), "-", c.get("base_passed"), "-", "-"])
        for t in c.get("tiers") or []:
            tier_rows.append([name, f"tier {t['tier']}", t.get("teacher"), t.get("items_in"), t.get("attempted"),
                              t.get("solved"), _pct(t.get("share_of_entered")), _usd(t.get("cost_usd"))])
        saving = c.get("saving_vs_plan") or {}
        tier_rows.append([name, "total", f"all at top tier: {_usd(c.get('cost_all_top_tier_usd'))}",
                          c.get("entered_cascade"), "-", c.get("solved"),
                          f"saving {_pct(c.get('saving'))} ({saving.get('verdict', '-')} vs plan "
                          f"{_pct(saving.get('plan'))})", _usd(c.get("cost_usd"))])
        sizes = m.get("sizes") or {}
        plan = sizes.get("plan") or {}
        chosen = sizes.get("chosen") or {}
        for v in sizes.get("variants") or []:
            size_rows.append([name, v.get("sparsity") or 0, v.get("rank"), _mb(v.get("gguf_bytes")),
                              _mb(v.get("safetensors_bytes")), _acc(v.get("accuracy")),
                              _pct_ref(v.get("pct_of_reference")), points_text(v.get("vs_base")),
                              "yes" if v.get("passed_gate") else "no",
                              "chosen" if chosen.get("rank") == v.get("rank") else ""])
        if plan:
            size_rows.append([name, plan.get("sparsity"), plan.get("rank"), f"plan: {plan.get('mb')} MB",
                              "-", "-", f"plan: {plan.get('pct')}%", "-", "-", plan.get("note", "")])
    total = table.get("cascade") or {}
    out = [{"phase": PHASE3, "id": "tier-table", "title": "Teacher cascade per modifier",
            "note": "modifiers.publish: items the compressed base failed enter tier 1; each tier's teacher answers "
                    "what is left, the verifier keeps what passes. Costs from the ledger at the configured prices; "
                    f"all modifiers: {_usd(total.get('cost_usd'))} spent, {_usd(total.get('cost_all_top_tier_usd'))} "
                    f"had every item gone to the top tier, saving {_pct(total.get('saving'))} (plan 61%).",
            "headers": ["modifier", "stage", "teacher", "items in", "attempted", "solved", "share of entered",
                        "cost"], "rows": tier_rows},
           {"phase": PHASE3, "id": "modifier-sizes", "title": "Modifier size per sparsity level",
            "note": "Sparsity is stored as a lower rank (SVD of each module's LoRA product), since zeros in a dense "
                    "file save nothing; bytes measured on disk. A variant passes its gate when its domain score "
                    "clears the gate's % of the reference and is above the base's (paired interval above 0). The "
                    "plan's rows give its 8B figure and the arithmetic of a LoRA of that rank on Llama-3.1-8B.",
            "headers": ["modifier", "sparsity", "rank", "GGUF", "safetensors", "domain accuracy", "% of reference",
                        "vs base", "passes gate", ""], "rows": size_rows}]
    return out + scores_out


def _scores_table(scores: dict) -> dict:
    """``modifiers.evaluate``'s accuracies per (model, domain), each against the base, with each modifier's verdict
    on its own domain (raised or not, and why) and on the others (does it hurt them?)."""
    models, verdicts = scores.get("table") or {}, scores.get("verdicts") or {}
    order = [m for m in ("base", *(x for name in verdicts for x in (name, f"{name}/alone"))) if m in models]
    rows = []
    for model in order + [m for m in models if m not in order]:
        by_domain = models[model]
        name = model.partition("/")[0]
        own = (verdicts.get(name) or {}).get("domain")
        for domain, e in by_domain.items():
            if model == "base" or model.endswith("/alone"):
                verdict = "-"
            elif domain == own:
                v = verdicts[name].get("raises_domain") or {}
                verdict = f"raises its domain: {v.get('verdict', '-')} ({v.get('reason', '-')})"
            else:
                hurts = ((verdicts.get(name) or {}).get("others") or {}).get(domain, {}).get("hurts")
                verdict = "-" if hurts is None else ("hurts this domain" if hurts else "does not hurt this domain")
            rows.append([model, domain, _acc(e.get("accuracy")), _acc(e.get("reference")),
                         _pct_ref(e.get("pct_of_reference")), points_text(e.get("vs_base")), verdict])
    return {"phase": PHASE3, "id": "modifier-scores", "title": "Held-out scores by domain: base and modifiers",
            "note": "modifiers.evaluate: base = Phase 2's GGUF with its recovery LoRA; <modifier> adds the modifier at "
                    "its scale; <modifier>/alone is the modifier without the recovery LoRA, on its own domain. Greedy "
                    "answers scored as the evaluation harness scores them; 95% bootstrap intervals; vs base is "
                    "paired, in points. A modifier raises its domain only when that interval lies above zero; it "
                    "hurts another domain when the whole interval is below zero.",
            "headers": ["model", "domain", "accuracy", "reference", "% of reference", "vs base (points)", "verdict"],
            "rows": rows}


PHASE4 = "Phase 4: routing"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def _judged(v: Any) -> str:
    return (v or {}).get("verdict", "-") if isinstance(v, dict) else "-"


def _judged_why(v: Any) -> str:
    """The verdict, and its why (``routing.publish.why_not_better``) when its reason carries one."""
    why = str((v or {}).get("reason") or "").partition("; why: ")[2] if isinstance(v, dict) else ""
    return _judged(v) + (f" ({why})" if why else "")


def shipped_text(shipped: dict | None) -> str:
    """Which router the bundle ships: the train split's, or one refitted on every row of the verdict table."""
    if not shipped:
        return ""
    rows = shipped.get("rows") or {}
    how = ("refitted on every row" if shipped.get("refit") else "the train split's")
    return (f"Shipped router: {how} ({rows.get('train')} training + {rows.get('val')} validation rows), threshold "
            f"{shipped.get('threshold')} from {shipped.get('threshold_from')}.")


def phase4_tables(manifests: list[dict]) -> list[dict]:
    """The policies, the threshold sweep, the route mix against the plan and the escalation detector, from
    ``routing.publish``'s table."""
    table = _latest(manifests, "routing.publish").get("metrics") or {}
    if not table:
        return []
    router, labels = table.get("router") or {}, table.get("labels") or {}
    # the label map's order: manifests are stored with sorted keys, so label_mix's own order is alphabetical
    models = table.get("models") or list((router.get("label_mix") or {}).keys())
    policy_rows = [[name, _acc({"accuracy": p.get("quality"), "ci": p.get("quality_ci")}), f"{p.get('cost'):.3f}",
                    points_text((table.get("differences") or {}).get(f"router_minus_{name}"))
                    if name != "router" else "-",
                    _acc({"accuracy": p.get("accuracy"), "ci": p.get("accuracy_ci")}), _pct(p.get("gain_recovered")),
                    _mix(models, p.get("route_mix"))]
                   for name, p in (table.get("policies") or {}).items()]
    th = table.get("thresholds") or {}
    chosen = (th.get("chosen") or {}).get("threshold")
    sweep_rows = [[s["threshold"], _pct(s.get("quality")), f"{s.get('cost'):.3f}", _pct(s.get("gain_recovered")),
                   _mix(models, s.get("route_mix")),
                   "chosen" if s["threshold"] == chosen else ("plan's expected" if s["threshold"] ==
                                                             th.get("plan_expected") else "")]
                  for s in th.get("sweep") or []]
    mix_rows = [[m, _pct(v.get("share")), f"{_pct(v['plan'][0])}-{_pct(v['plan'][1])}" if v.get("plan") else "-",
                 v.get("verdict", "-")] for m, v in (table.get("route_mix") or {}).items()]
    esc = table.get("escalation") or {}
    lat = router.get("latency") or {}
    esc_rows = []
    for who in ("teacher", "student"):
        e = esc.get(who) or {}
        esc_rows.append([who, _acc({"accuracy": e.get("accuracy"), "ci": e.get("ci")}), e.get("n"),
                         _mb(e.get("bytes")), _ms(e.get("p50_ms")), _ms(e.get("p99_ms"))])
    esc_rows.append(["plan (student)", "94%", "-", "3 MB", "-", "< 3 ms"])
    cv = table.get("cross_validation") or {}
    beat = table.get("beats") or {}
    cv_rows = [[name, _acc({"accuracy": p.get("quality"), "ci": p.get("quality_ci")}), f"{p.get('cost'):.3f}",
                points_text((cv.get("differences") or {}).get(f"router_minus_{name}")) if name != "router" else "-",
                _mix(models, p.get("route_mix"))]
               for name, p in (cv.get("policies") or {}).items()]
    verdicts = "; ".join(f"router vs {name}: holdout {_judged_why(v.get('holdout'))}, cross-validated "
                         f"{_judged_why(v.get('cross_validation'))}" for name, v in beat.items())
    cv_note = (f"{cv.get('folds')}-fold: each of the {cv.get('n')} queries routed by a router of the same recipe "
               f"trained on the other folds, never on it; always_best_modifier ({cv.get('best_modifier')}) is "
               f"picked on the whole table. {verdicts}" if cv.get("policies") else
               f"Not run: {cv.get('skipped', 'no cross-validation in this run')}. {verdicts}")
    return [
        {"phase": PHASE4, "id": "routing-policies", "title": "Routing policies on the holdout",
         "note": f"routing.labels: {labels.get('queries')} queries ({labels.get('general_queries')} general, judged by "
                 f"the LLM judge; the rest Phase 3's held-out answers, checked); confidence costs "
                 f"{_ms(labels.get('confidence_ms'))} per query. Router accuracy {_acc(router)} on {router.get('n')} "
                 f"holdout queries vs the plan's 97%: {_judged(router)}. Decision latency p99: MLP "
                 f"{_ms((lat.get('mlp') or {}).get('p99_ms'))}, with the query embedding "
                 f"{_ms((lat.get('with_embedding') or {}).get('p99_ms'))} (plan < 5 ms: "
                 f"{_judged(router.get('latency_verdict'))}). APGR {_pct(table.get('apgr'))}.",
         "headers": ["policy", "quality", "cost/query", "router minus policy (points)", "accuracy", "gain recovered",
                     "route mix"],
         "rows": policy_rows},
        {"phase": PHASE4, "id": "router-confusion", "title": "Router confusion matrix on the holdout",
         "note": f"Rows: the label (the cheapest model that answered correctly, base counted cheapest); columns: the "
                 f"model the router sent the query to; {router.get('n')} holdout queries.",
         "headers": ["label \\ routed to", *models],
         "rows": [[m, *(num(v) for v in row)] for m, row in zip(models, router.get("confusion") or [], strict=False)]},
        {"phase": PHASE4, "id": "routing-cv", "title": "Routing policies, cross-validated over every query",
         "note": cv_note.strip(), "headers": ["policy", "quality", "cost/query", "router minus policy (points)",
                                              "route mix"], "rows": cv_rows},
        {"phase": PHASE4, "id": "threshold-sweep", "title": "Confidence threshold sweep",
         "note": "The base answers when its calibrated confidence >= t, else the router's choice; over "
                 f"{th.get('over', 'the holdout split')}; chosen by {(th.get('chosen') or {}).get('objective', '-')} "
                 f"(plan: 0.75 / 0.80 / 0.85 tried, 0.80 expected). {shipped_text(table.get('shipped'))}",
         "headers": ["threshold", "quality", "cost/query", "gain recovered", "route mix", ""], "rows": sweep_rows},
        {"phase": PHASE4, "id": "route-mix", "title": "Route mix at the chosen threshold vs the plan",
         "note": f"Shares over {th.get('over', 'the holdout split')}; the tiny world's query mix is set by its "
                 "held-out suites, not by traffic.",
         "headers": ["model", "share", "plan", "verdict"], "rows": mix_rows},
        {"phase": PHASE4, "id": "escalation", "title": "Escalation detector: teacher and distilled LSTM",
         "note": f"{esc.get('data', '-')}; student accuracy vs 94%: {_judged(esc.get('accuracy_verdict'))}, size vs "
                 f"3 MB: {_judged(esc.get('bytes_verdict'))}, p99 vs 3 ms: {_judged(esc.get('latency_verdict'))}. "
                 f"Teacher minus student: {points_text({'points': esc.get('gap_points'), 'ci': esc.get('gap_ci')})} "
                 f"points (paired) vs within 5: {_judged(esc.get('gap_verdict'))}; "
                 f"{esc.get('size_ratio', '-')}x smaller than the teacher vs >= 20x: "
                 f"{_judged(esc.get('size_ratio_verdict'))}.",
         "headers": ["model", "accuracy", "test n", "size", "p50", "p99"], "rows": esc_rows},
    ]
