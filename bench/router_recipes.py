"""Study: router recipes (``routing.router.target``, ``class_weight``, ``cost_weight``) cross-validated on a verdict
table. Prints JSON.

    python bench/router_recipes.py VERDICTS.jsonl [--seeds 5] [--config tiny] [--out FILE]

``VERDICTS.jsonl`` is a ``routing.labels`` output (a demo's ``verdicts.jsonl``). Per recipe and seed (the fold
assignment and the MLP's seed, ``routing.router.seed``), :func:`cogumi_tasks.routing.router_steps.cross_validate`
routes every query with a router that never trained on it; the JSON holds each run's router quality and route mix
and its paired differences to always-base and to random at the same cost (points, 95% bootstrap interval), plus
the table's per-model correct counts. A quality study, not a timing: one run per seed, no repeats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {
    "label_balanced": {"target": "label", "class_weight": "balanced", "cost_weight": 0.0},
    "verdicts": {"target": "verdicts", "class_weight": "none", "cost_weight": 0.0},
    "verdicts_cost_0.25": {"target": "verdicts", "class_weight": "none", "cost_weight": 0.25},
    "gain_cost_0.25": {"target": "gain", "class_weight": "none", "cost_weight": 0.25},
    "gain_cost_0.5": {"target": "gain", "class_weight": "none", "cost_weight": 0.5},
}


def main() -> None:
    from bench.figures import emit
    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.routing.features import embed_queries, label_of, load_verdicts
    from cogumi_tasks.routing.router_steps import cross_validate
    from cogumi_tasks.train.failures import load_embedder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("verdicts", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    base = load_config(args.config).routing.router
    rows = load_verdicts(args.verdicts, base.models)
    emb = embed_queries(load_embedder(base.embedder), [r.query for r in rows])
    labels = np.array([label_of(r.verdicts, base.models, base.costs) for r in rows], dtype=np.int64)
    verdicts = np.array([[r.verdicts[m] for m in base.models] for r in rows], dtype=np.float32)
    conf = np.array([r.confidence for r in rows], dtype=np.float32)
    out: dict = {"verdicts": str(args.verdicts), "rows": len(rows), "folds": base.cv_folds,
                 "correct": dict(zip(base.models, verdicts.sum(axis=0).astype(int).tolist(), strict=True)),
                 "labels": dict(zip(base.models, np.bincount(labels, minlength=len(base.models)).tolist(),
                                    strict=True)), "recipes": {}}
    for name, recipe in RECIPES.items():
        runs = []
        for seed in range(args.seeds):
            cfg = base.model_copy(update={**recipe, "seed": seed})
            cv = cross_validate(rows, emb, cfg, labels, verdicts, conf)
            pol, diff = cv["policies"], cv["differences"]
            runs.append({"seed": seed, "quality": pol["router"]["quality"], "route_mix": pol["router"]["route_mix"],
                         **{k: diff[f"router_minus_{k}"] for k in ("always_base", "random_same_cost")}})
            r = runs[-1]
            print(f"{name} seed {seed}: router {r['quality']:.3f}, minus always-base "
                  f"{r['always_base']['points']:+.2f}, minus random {r['random_same_cost']['points']:+.2f}",
                  file=sys.stderr)
        out["recipes"][name] = {"config": recipe, "runs": runs}
    out["baselines"] = {k: cv["policies"][k]["quality"] for k in ("always_base", "keyword", "oracle")}
    emit(out, args.out)


if __name__ == "__main__":
    main()
