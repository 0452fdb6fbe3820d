"""Benchmark: does the tiny student learn the tiny world? Held-out accuracy per domain before and after Phase 1 SFT.

    python bench/tiny_world_learning.py [--train-counts list_fn=30,word_arith=100,tool_call=80]
        [--heldout-per-family 30] [--set lr=2e-3 ...] [--config configs/tiny.yaml] [--work DIR] [--out F]

Draws ``--train-per-family`` training instances of each world family (``part="train"``, the reference answer as
the response: what the strong tier gives Phase 0) and ``--heldout-per-family`` held-out ones (``part="heldout"``,
never the same task or normalised prompt), evaluates the untrained student, trains it with the project's SFT
(:func:`cogumi_tasks.train.sft.train_sft`, the function the ``train.sft`` step runs, with the config's
``train.sft`` section and ``--set`` overrides), and evaluates the merged model. Both models are evaluated as
Phase 1's are in the tiny config (``eval.hf_runtime: llama_cpp``): the HF directory converted to an f16 GGUF,
greedy in llama.cpp. Answers are checked with ``world.check_many`` (code in the sandbox). Prints progress and one
JSON object: per-domain accuracy before/after with bootstrap 95% intervals, SFT seconds, total seconds, and
``uptime``'s load averages when each timing was taken (other work on the machine slows the figures).

The base model is the packaged SmolLM2-135M-Instruct GGUF converted to an fp32 HF directory (nothing is
downloaded), built once under ``--work``; the untrained evaluation is cached there per held-out draw.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def sft_config(config: Path, overrides: list[str]):
    """The config's ``train.sft`` section with ``KEY=VALUE`` overrides (read as YAML scalars)."""
    import yaml

    from cogumi_tasks.core.config import SFTConfig, _parse_value, parse_set_flags

    section = dict((yaml.safe_load(config.read_text()).get("train") or {}).get("sft") or {})
    section.update({k: _parse_value(v) for k, v in parse_set_flags(overrides).items()})
    return SFTConfig.model_validate(section)


def conversations(instances: list, system: str | None) -> list[list[dict]]:
    """The chat each instance is asked in: the prompt as the user turn (after ``system`` if given)."""
    head = [{"role": "system", "content": system}] if system else []
    return [[*head, {"role": "user", "content": inst.prompt}] for inst in instances]


def evaluate(model_dir: Path, gguf: Path, instances: list, system: str | None, max_tokens: int,
             threads: int) -> tuple[list[dict], float]:
    """Greedy answers of ``model_dir`` (as an f16 GGUF in llama.cpp) checked by the world's checkers."""
    from cogumi_tasks import world
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.models.convert import convert_hf_to_gguf

    t0 = time.monotonic()
    if not gguf.exists():
        convert_hf_to_gguf(model_dir, gguf, "f16")
    backend = GGUFBackend(gguf, n_ctx=1024, n_threads=threads, name=gguf.stem)
    try:
        gens = backend.generate(conversations(instances, system), max_tokens)
    finally:
        backend.close()
    verdicts = world.check_many(instances, [g.text for g in gens])
    rows = [{"id": inst.id, "domain": inst.domain, "family": inst.family, "answer": g.text, "ok": ok,
             "reason": reason, "error": g.error}
            for inst, g, (ok, reason) in zip(instances, gens, verdicts, strict=True)]
    return rows, time.monotonic() - t0


def accuracy(rows: list[dict], n_boot: int, seed: int) -> dict[str, dict]:
    """Per domain: accuracy % with a bootstrap 95% interval (stats.bootstrap_ratio_ci over a reference of 1s)."""
    from cogumi_tasks.eval.stats import bootstrap_ratio_ci

    out = {}
    for domain in sorted({r["domain"] for r in rows}):
        ok = [float(r["ok"]) for r in rows if r["domain"] == domain]
        point, low, high = bootstrap_ratio_ci(ok, [1.0] * len(ok), n=n_boot, seed=seed)
        out[domain] = {"acc": round(point, 1), "ci": [round(low, 1), round(high, 1)], "n": len(ok)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-per-family", type=int, default=60)
    ap.add_argument("--heldout-per-family", type=int, default=30)
    ap.add_argument("--train-counts", default="list_fn=30,word_arith=100,tool_call=80", metavar="FAMILY=N,...",
                    help="per-family training counts overriding --train-per-family, e.g. list_fn=40")
    ap.add_argument("--families", default="list_fn,word_arith,tool_call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml", help="its train.sft section")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train.sft field, e.g. --set lr=2e-3 --set 'target_modules=[q_proj,v_proj]'")
    ap.add_argument("--system", default=None, help="a system prompt for training rows and evaluation (default none)")
    ap.add_argument("--max-tokens", type=int, default=96, help="answer tokens at evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--skip-before", action="store_true", help="do not evaluate the untrained student")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cogumi" / "bench-tiny-world")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    from cogumi_tasks import world
    from cogumi_tasks.core.config import parse_set_flags
    from cogumi_tasks.models.convert import hf_dir_from_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf
    from cogumi_tasks.train.sft import train_sft

    started = time.monotonic()
    cfg = sft_config(args.config, args.sets)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    counts = {f: args.train_per_family for f in families}
    counts.update({k: int(v) for k, v in parse_set_flags([c for c in args.train_counts.split(",") if c]).items()})
    train = [i for f in families for i in world.generate(f, counts[f], args.seed, part="train")]
    held = [i for f in families for i in world.generate(f, args.heldout_per_family, args.seed + 1, part="heldout")]
    world.assert_disjoint(train, held)
    rows = [{"prompt": i.prompt, "response": i.reference, **({"system": args.system} if args.system else {})}
            for i in train]
    log.info("%d training rows, %d held-out instances (%s); sft %s", len(rows), len(held), ", ".join(families),
             cfg.model_dump())

    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    if not (base / "config.json").exists():
        hf_dir_from_gguf(smollm2_gguf(), base)
    from transformers import AutoTokenizer

    from cogumi_tasks.train.sft import build_examples

    tok = AutoTokenizer.from_pretrained(str(base))
    full = build_examples(tok, rows, 100_000)
    lengths = sorted(len(ex["input_ids"]) for ex in full)
    cut = sum(n > cfg.max_seq_len for n in lengths)
    log.info("training tokens per example: median %d, max %d; %d cut by max_seq_len=%d", lengths[len(lengths) // 2],
             lengths[-1], cut, cfg.max_seq_len)

    result: dict = {"families": families, "train_counts": counts,
                    "heldout_per_family": args.heldout_per_family, "seed": args.seed, "system": args.system,
                    "sft": cfg.model_dump(), "train_tokens": {"median": lengths[len(lengths) // 2],
                                                              "max": lengths[-1], "cut": cut},
                    "cpus": os.cpu_count()}
    key = f"before-{args.heldout_per_family}-{args.seed}-{args.families}-{args.system or ''}-{args.max_tokens}"
    cache = args.work / (key.replace(",", "_").replace(" ", "_")[:150] + ".json")
    if not args.skip_before:
        if cache.exists():
            before = json.loads(cache.read_text())
            log.info("untrained evaluation from %s", cache)
        else:
            load = load_avg()
            b_rows, secs = evaluate(base, args.work / "base-f16.gguf", held, args.system, args.max_tokens,
                                    args.threads)
            before = {"rows": b_rows, "seconds": round(secs, 1), "load": load + load_avg()}
            cache.write_text(json.dumps(before))
        result["before"] = {"accuracy": accuracy(before["rows"], args.bootstrap, args.seed),
                            "eval_seconds": before["seconds"], "load": before["load"]}
        log.info("untrained: %s", result["before"]["accuracy"])

    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    load0 = load_avg()
    t0, cpu0 = time.monotonic(), cpu_seconds()
    metrics = train_sft(base, rows, run_dir / "out", cfg, checkpoint_dir=run_dir / "checkpoints", resume=False)
    sft_s = time.monotonic() - t0
    result["sft_seconds"] = round(sft_s, 1)
    result["sft_cpu_seconds"] = round(cpu_seconds() - cpu0, 1)  # all threads: less load-dependent than wall time
    result["sft_load"] = load0 + load_avg()  # 1/5/15-minute averages at start, then at the end
    result["sft_metrics"] = {k: metrics[k] for k in ("steps", "final_eval_loss", "best_step", "stopped_early")}
    result["sft_train_loss_last"] = metrics["train_loss_curve"][-1][1] if metrics["train_loss_curve"] else None
    log.info("sft: %.1f s, %s", sft_s, result["sft_metrics"])

    load = load_avg()
    a_rows, secs = evaluate(run_dir / "out" / "merged", run_dir / "merged-f16.gguf", held, args.system,
                            args.max_tokens, args.threads)
    result["after"] = {"accuracy": accuracy(a_rows, args.bootstrap, args.seed), "eval_seconds": round(secs, 1),
                       "load": load + load_avg()}
    if "before" in result:
        result["rise_points"] = {d: round(v["acc"] - result["before"]["accuracy"][d]["acc"], 1)
                                 for d, v in result["after"]["accuracy"].items()}
    (args.work / "after-rows.json").write_text(json.dumps(a_rows, indent=1))
    result["failures"] = {f: [{"answer": r["answer"][:200], "reason": r["reason"][:200]}
                              for r in a_rows if r["family"] == f and not r["ok"]][:3] for f in families}
    result["total_seconds"] = round(time.monotonic() - started, 1)
    result["load_end"] = load_avg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
