"""A verdict table with planted verdicts, for tests and ``bench/router.py`` (not a measurement of any model).

Queries: held-out instances of the tiny-world families (one per domain) and the general prompts of
``resources/tiny_prompts.jsonl``. Verdicts, drawn from a seeded generator: on a domain query the domain's modifier
is right, the base right with ``base_domain``, the other modifiers with ``other``; on a general prompt the base is
right with ``base_general`` and each modifier with ``other``. The base's confidence is drawn higher where it is
right (U(0.55, 1)) than where it is wrong (U(0.1, 0.8)); a third of the queries carry one to three previous turns.
"""

from __future__ import annotations

import json
import random
from importlib.resources import files

from cogumi_tasks.world import BY_DOMAIN, generate

MODELS = ("base", "code", "reasoning", "automation")


def general_prompts() -> list[str]:
    text = (files("cogumi_tasks") / "resources" / "tiny_prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r.get("domain") == "general"]


def planted_verdicts(per_domain: int = 40, general: int = 60, seed: int = 0, base_domain: float = 0.25,
                     base_general: float = 0.8, other: float = 0.1) -> list[dict]:
    """Rows in the verdict-table format (:mod:`cogumi_tasks.routing.features`), domain rows first."""
    rng = random.Random(seed)
    queries: list[tuple[str, str, str | None]] = []
    for domain in MODELS[1:]:
        for inst in generate(BY_DOMAIN[domain], per_domain, seed, part="heldout"):
            queries.append((inst.id, inst.prompt, domain))
    prompts = general_prompts()
    for i in range(general):
        queries.append((f"general-{i:04d}", prompts[i % len(prompts)], None))
    rows = []
    for qid, query, domain in queries:
        verdicts = {m: rng.random() < other for m in MODELS[1:]}
        if domain is None:
            verdicts["base"] = rng.random() < base_general
        else:
            verdicts["base"] = rng.random() < base_domain
            verdicts[domain] = True
        conf = rng.uniform(0.55, 1.0) if verdicts["base"] else rng.uniform(0.1, 0.8)
        session = []
        if rng.random() < 1 / 3:
            session = [{"route": rng.choice(MODELS), "outcome": rng.choice(("ok", "escalated", "pending"))}
                       for _ in range(rng.randint(1, 3))]
        rows.append({"id": qid, "query": query, "domain": domain, "verdicts": {m: verdicts[m] for m in MODELS},
                     "confidence": round(conf, 4), "session": session})
    return rows
