"""Tables the run report prints per phase from the steps' published metrics (Phase 3 onwards).

Each table is ``{"phase", "id", "title", "note", "headers", "rows"}``; the report renders it under its phase.
Only figures a step measured appear; a missing one prints as "-".
"""

from __future__ import annotations

from typing import Any

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


def _mb(nbytes: Any) -> str:
    return "-" if not nbytes else f"{nbytes / 1e6:.2f} MB"


def _latest(manifests: list[dict], step: str) -> dict:
    return next((m for m in reversed(manifests) if m["step"] == step), {})


def phase3_tables(manifests: list[dict]) -> list[dict]:
    """The tier table, the sizes per sparsity level and the scores, from ``modifiers.publish``'s table."""
    table = _latest(manifests, "modifiers.publish").get("metrics") or {}
    mods = table.get("modifiers") or {}
    if not mods:
        return []
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
                              _pct_ref(v.get("pct_of_reference")), "yes" if v.get("passed_gate") else "no",
                              "chosen" if chosen.get("rank") == v.get("rank") else ""])
        if plan:
            size_rows.append([name, plan.get("sparsity"), plan.get("rank"), f"plan: {plan.get('mb')} MB",
                              "-", "-", f"plan: {plan.get('pct')}%", "-", plan.get("note", "")])
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
                    "file save nothing; bytes measured on disk. The plan's rows give its 8B figure and the "
                    "arithmetic of a LoRA of that rank on Llama-3.1-8B.",
            "headers": ["modifier", "sparsity", "rank", "GGUF", "safetensors", "domain accuracy", "% of reference",
                        "passes gate", ""], "rows": size_rows}]
    return out
