"""Benchmark: what Phase 2's GGUF buys at serving time. The tiny student as the fp32 transformers model
(the baseline: what Phase 1 hands over), the same model in bf16 in transformers, as an f16 GGUF and as
a Q5_K_M GGUF in llama.cpp, on the same prompts in the same run. Prints one JSON object.

    python bench/serving.py [--prompts 4] [--new-tokens 32] [--repeats 5] [--threads 2] [--work DIR] [--out F]

Serving through Phase 5's gateway against the bare engine and bare llama-cpp-python, with a load test, is the
other part of serving's bench: ``python bench/serving.py gateway --release DIR ...`` runs bench/gateway.py (its
docstring says what it measures).

Each model runs in a fresh process (its peak RSS is its own; the GGUF ones import no torch): load
time, prefill tokens/s (prompt tokens over the time to the first new token), decode tokens/s (the
other new tokens over the rest), peak resident memory, weights (file size; for transformers the
bytes of the loaded parameters). Every prompt generates exactly ``--new-tokens`` tokens (end of
turn is not allowed to stop it) greedily after one warm-up prompt. Each arm runs ``--repeats``
times, the arms taking turns within a repeat, and every figure is the median with min and max over
the repeats; ratios to the baseline are of the medians.
The artifacts are built once under ``--work`` (default ~/.cache/cogumi/bench-serving) from the
packaged SmolLM2-135M-Instruct GGUF with the project's own converters, so the numbers are the
pipeline's, not a hand-made file's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Explain what a hash table is in two sentences.",
    "Write a Python function that reverses a string.",
    "What is the capital of Japan, and what is it known for?",
    "List three ways to reduce the memory use of a program.",
    "Why is the sky blue? Answer briefly.",
    "Give a short recipe for pancakes.",
    "What does HTTP status 404 mean?",
    "Describe the water cycle for a ten-year-old.",
]


def build(work: Path) -> dict[str, Path]:
    """Each arm's model: the HF fp32 directory (loaded as fp32 and as bf16), the f16 GGUF and the Q5_K_M
    GGUF, made once by the pipeline's helpers."""
    from cogumi_tasks.compress.gguf import quantize_gguf
    from cogumi_tasks.models.convert import convert_hf_to_gguf, hf_dir_from_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf

    hf, f16, q5 = work / "hf", work / "model-f16.gguf", work / "model-Q5_K_M.gguf"
    if not (hf / "config.json").exists():
        hf_dir_from_gguf(smollm2_gguf(), hf)
    if not f16.exists():
        convert_hf_to_gguf(hf, f16, "f16")
    if not q5.exists():
        quantize_gguf(f16, q5, "Q5_K_M")
    return {"hf_fp32": hf, "hf_bf16": hf, "gguf_f16": f16, "gguf_q5_k_m": q5}


def prompt_ids(hf_dir: Path, n: int) -> list[list[int]]:
    """The chat-formatted prompts as token ids (the HF tokenizer, in the parent: a GGUF child then
    imports neither transformers nor torch, and its peak memory is llama.cpp's own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
    return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]) for t in texts]


def _time_gguf(path: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    runs = []
    for ids in [prompts[0], *prompts]:  # the first is the warm-up
        llm.reset()
        t_start = time.perf_counter()
        llm.eval(ids)
        t_first, n = None, 0
        while True:  # greedy, never stopping at end of turn
            nxt = llm.sample(top_k=1, temp=0.0)
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n == new_tokens:
                break
            llm.eval([nxt])
        runs.append((len(ids), t_first - t_start, time.perf_counter() - t_first, n))
    return {"load_s": load_s, "runs": runs[1:], "weights": path.stat().st_size}


def _time_hf(path: Path, prompts: list[list[int]], new_tokens: int, threads: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    runs = []
    with torch.inference_mode():
        for prompt in [prompts[0], *prompts]:
            ids = torch.tensor([prompt])
            t_start = time.perf_counter()
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t_first, n = time.perf_counter(), 1
            while n < new_tokens:
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                n += 1
            runs.append((len(prompt), t_first - t_start, time.perf_counter() - t_first, n))
    return {"load_s": load_s, "runs": runs[1:], "weights": weights}


def peak_rss_kb() -> int:
    """This process's resident high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    over from the parent across exec, and the parent has torch loaded."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(kind: str, path: Path, prompts_file: Path, args: argparse.Namespace) -> None:
    prompts = json.loads(prompts_file.read_text())
    if kind.startswith("hf_"):
        r = _time_hf(path, prompts, args.new_tokens, args.threads, {"hf_fp32": "float32", "hf_bf16": "bfloat16"}[kind])
    else:
        r = _time_gguf(path, prompts, args.new_tokens, args.threads)
    prompt_tokens = sum(x[0] for x in r["runs"])
    prefill_s = sum(x[1] for x in r["runs"])
    decode_s = sum(x[2] for x in r["runs"])
    decoded = sum(x[3] - 1 for x in r["runs"])  # the first new token is timed with the prefill
    print(json.dumps({
        "load_s": round(r["load_s"], 2), "prompt_tokens": prompt_tokens, "new_tokens": decoded + len(r["runs"]),
        "prefill_tok_s": round(prompt_tokens / prefill_s, 1), "decode_tok_s": round(decoded / decode_s, 1),
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
        "weights_mb": round(r["weights"] / 1e6, 1),
    }))


def _spread(values: list[float]) -> dict:
    """Median, min and max of one figure over the repeats."""
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def main() -> None:
    if sys.argv[1:2] == ["gateway"]:  # Phase 5's serving bench: bench/gateway.py, whose arguments follow
        from gateway import main as gateway_main  # this script's folder is on sys.path

        sys.argv = [f"{sys.argv[0]} gateway", *sys.argv[2:]]
        sys.exit(gateway_main())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cogumi" / "bench-serving")
    p.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "PROMPTS_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    paths = build(args.work)
    prompts_file = args.work / "prompts.json"
    prompts_file.write_text(json.dumps(prompt_ids(paths["hf_fp32"], args.prompts)))
    samples: dict[str, list[dict]] = {kind: [] for kind in paths}
    for _ in range(args.repeats):
        for kind, path in paths.items():  # the arms take turns, so load drifts hit all of them
            cmd = [sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                   "--child", kind, str(path), str(prompts_file)]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            if out.returncode != 0:
                sys.exit(f"{kind} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            samples[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {kind: {key: _spread([r[key] for r in rs]) for key in rs[0]} for kind, rs in samples.items()}
    med = {kind: {key: v["median"] for key, v in r.items()} for kind, r in results.items()}
    base = med["hf_fp32"]
    report = {
        "benchmark": "serving", "baseline": "hf_fp32", "model": "SmolLM2-135M-Instruct",
        "prompts": args.prompts, "new_tokens_per_prompt": args.new_tokens, "threads": args.threads,
        "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "results": results,
        "vs_baseline": {k: {"decode_speedup": round(v["decode_tok_s"] / base["decode_tok_s"], 2),
                            "prefill_speedup": round(v["prefill_tok_s"] / base["prefill_tok_s"], 2),
                            "peak_rss_ratio": round(v["peak_rss_mb"] / base["peak_rss_mb"], 3),
                            "weights_ratio": round(v["weights_mb"] / base["weights_mb"], 3)}
                        for k, v in med.items() if k != "hf_fp32"},
    }
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report) + "\n")



if __name__ == "__main__":
    main()
