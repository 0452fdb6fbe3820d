"""Benchmark: Phase 0 near-duplicate finding, ours (vectorised MinHash + LSH + verification) against the
best plain datasketch use, on real text with planted near duplicates. Prints one JSON object.

    python bench/dedup.py [--truth-docs 5000] [--speed-docs 20000 50000] [--repeats 5] [--out FILE]

Corpus: triple-quoted string literals (docstrings, mostly; 200-3,000 characters) of every .py file of
this interpreter's standard library and of the installed packages in ``site-packages``, distinct after
normalisation, in path order; cached under ``--cache``. A corpus of n documents draws its base
documents at random (``--seed``); one in six gets 1-3 copies with 1-8 word edits (substitute a word
taken from another docstring, insert one, delete one), so planted pairs fall on both sides of Jaccard
0.8. The docstrings carry their own natural near duplicates too (copied docstrings).

Both methods use the same shingles (``cogumi_tasks.data.dedup.shingles``: character 5-shingles of the
normalised text), 128 permutations, threshold 0.8, and report pairs i < j. Ours:
``near_duplicate_pairs`` (LSH 25 bands x 5 rows; candidates verified, by exact Jaccard near the
threshold). Baseline (datasketch): one MinHash per document from its shingles' UTF-8 bytes, by
``MinHash.bulk`` or by ``update_batch`` on MinHashes sharing one set of permutations (both timed at
the ground-truth size; the faster one is used at every size); ``MinHashLSH`` filled through an
insertion session and queried with every document; a candidate kept when ``MinHash.jaccard`` >= 0.8.
Two baseline rows: ``params=(25, 5)``, our bands x rows, and datasketch's default for threshold 0.8.

Ground truth: exact Jaccard of every pair of the ``--truth-docs`` corpus (all n(n-1)/2 pairs, by a
sparse product of the document x shingle matrix). Recall and precision of each method are against
it. At the speed sizes only speed is measured, plus each method's pair count and the exact Jaccard
precision of the pairs it reports.

Every time is the median, min and max of ``--repeats`` runs (docs/s from the median seconds). Peak
memory: our ``dedup`` (exact + near) on the largest corpus in a child process that streams the texts
from a JSONL file, so the corpus is not held by it: its VmHWM (``ru_maxrss`` is carried over from the
parent across exec on Linux), and the same child's VmHWM after its imports, before reading any text.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasketch import MinHash, MinHashLSH  # noqa: E402

from bench.figures import summary  # noqa: E402
from cogumi_tasks.data.dedup import jaccard, lsh_params, near_duplicate_pairs, normalize, shingles  # noqa: E402

THRESHOLD, NUM_PERM, K = 0.8, 128, 5
MIN_CHARS, MAX_CHARS = 200, 3000


def _roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths["stdlib"]), Path(paths["purelib"])]


def docstrings(cache: Path) -> list[str]:
    """Every distinct (normalised) triple-quoted string literal of MIN_CHARS..MAX_CHARS characters in
    the .py files of the stdlib and site-packages (docstrings, mostly), in path order; cached per
    interpreter and set of installed distributions."""
    site = Path(sysconfig.get_paths()["purelib"])
    dists = sorted(p.name for p in site.glob("*.dist-info"))
    key = hashlib.sha256(json.dumps([sys.version, dists]).encode()).hexdigest()[:16]
    path = cache / f"docstrings-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    literal = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)
    seen: set[str] = set()
    out: list[str] = []
    for root in _roots():
        for py in sorted(root.rglob("*.py")):
            if root != site and site in py.parents:
                continue
            for m in literal.finditer(py.read_text(encoding="utf-8", errors="replace")):
                doc = inspect.cleandoc(m.group(1) or m.group(2) or "")
                norm = normalize(doc)
                if MIN_CHARS <= len(doc) <= MAX_CHARS and "\ufffd" not in doc and norm not in seen:
                    seen.add(norm)
                    out.append(doc)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def make_corpus(pool: list[str], n: int, seed: int) -> list[str]:
    """n documents: random base docstrings, one in six followed by 1-3 edited copies."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    words = [w for i in rng.choice(len(pool), 2000, replace=False) for w in pool[i].split()]
    texts: list[str] = []
    b = 0
    while len(texts) < n:
        if b >= len(pool):
            sys.exit(f"only {len(pool)} docstrings: too few for a corpus of {n} documents")
        base = pool[order[b]].split()
        b += 1
        texts.append(" ".join(base))
        if b % 6 == 0:
            for _ in range(int(rng.integers(1, 4))):
                if len(texts) >= n:
                    break
                copy = list(base)
                for _ in range(int(rng.integers(1, 9))):
                    op, at = int(rng.integers(3)), int(rng.integers(len(copy)))
                    if op == 0:
                        copy[at] = words[int(rng.integers(len(words)))]
                    elif op == 1:
                        copy.insert(at, words[int(rng.integers(len(words)))])
                    elif len(copy) > 5:
                        del copy[at]
                texts.append(" ".join(copy))
    return texts


def all_pairs_truth(texts: list[str], block: int = 512) -> set[tuple[int, int]]:
    """Every pair i < j with exact Jaccard >= THRESHOLD: intersections from the sparse product of the
    binary document x shingle matrix, row block by row block."""
    from scipy.sparse import csr_matrix

    vocab: dict[str, int] = {}
    cols, ptr = [], [0]
    for t in texts:
        cols.extend(vocab.setdefault(s, len(vocab)) for s in shingles(t, K))
        ptr.append(len(cols))
    x = csr_matrix((np.ones(len(cols), dtype=np.float32), cols, ptr), shape=(len(texts), len(vocab)))
    size = np.diff(ptr).astype(np.float64)
    xt = x.T.tocsr()
    truth = set()
    for s in range(0, len(texts), block):
        inter = (x[s : s + block] @ xt).toarray().astype(np.float64)
        union = size[s : s + block, None] + size[None, :] - inter
        jac = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
        i, j = np.nonzero(jac >= THRESHOLD)
        truth.update((int(a) + s, int(b)) for a, b in zip(i, j, strict=True) if a + s < b)
    return truth


def ours(texts: list[str]) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in near_duplicate_pairs(texts, num_perm=NUM_PERM, shingle_size=K,
                                                               threshold=THRESHOLD)}


def sketches_bulk(texts: list[str]) -> list[MinHash]:
    return MinHash.bulk(([s.encode("utf8") for s in shingles(t, K)] for t in texts), num_perm=NUM_PERM)


def sketches_update_batch(texts: list[str]) -> list[MinHash]:
    first = MinHash(num_perm=NUM_PERM)
    out = []
    for t in texts:
        m = MinHash(num_perm=NUM_PERM, permutations=first.permutations, scheme=first.scheme)
        m.update_batch([s.encode("utf8") for s in shingles(t, K)])
        out.append(m)
    return out


def lsh_pairs(sketches: list[MinHash], params: tuple[int, int] | None) -> tuple[set[tuple[int, int]], list[int]]:
    """datasketch's LSH over every sketch, queried with each; candidates kept at MinHash.jaccard >= THRESHOLD."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=params)
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m, check_duplication=False)
    found = set()
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if j > i and m.jaccard(sketches[j]) >= THRESHOLD:
                found.add((i, j))
    return found, [lsh.b, lsh.r]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def score(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict:
    hit = len(found & truth)
    return {"pairs": len(found), "recall": round(hit / max(len(truth), 1), 5),
            "precision": round(hit / max(len(found), 1), 5)}


def exact_precision(texts: list[str], found: set[tuple[int, int]]) -> float:
    ok = sum(jaccard(shingles(texts[i], K), shingles(texts[j], K)) >= THRESHOLD for i, j in found)
    return round(ok / max(len(found), 1), 5)


def run_size(texts: list[str], repeats: int, sketcher: Callable, truth: set | None) -> dict:
    """Median/min/max seconds of ours and of both baseline rows on one corpus, and their pairs' quality."""
    t_ours, t_sk, t_same, t_default = [], [], [], []
    for _ in range(repeats):
        s, found = timed(lambda: ours(texts))
        t_ours.append(s)
        s, sketches = timed(lambda: sketcher(texts))
        t_sk.append(s)
        s, (same, same_br) = timed(lambda sk=sketches: lsh_pairs(sk, lsh_params(THRESHOLD, NUM_PERM)))
        t_same.append(t_sk[-1] + s)  # a baseline row's time: its sketches plus its LSH
        s, (default, default_br) = timed(lambda sk=sketches: lsh_pairs(sk, None))
        t_default.append(t_sk[-1] + s)
    n = len(texts)
    rows = {}
    for name, secs, pairs, br in (("ours", t_ours, found, list(lsh_params(THRESHOLD, NUM_PERM))),
                                  ("datasketch_same_lsh", t_same, same, same_br),
                                  ("datasketch_default_lsh", t_default, default, default_br)):
        row = {"lsh_bands_rows": br, "seconds": summary(secs, 3), "docs_per_s": round(n / statistics.median(secs), 1)}
        row.update(score(pairs, truth) if truth is not None else
                   {"pairs": len(pairs), "precision": exact_precision(texts, pairs)})
        if name != "ours":  # our speed over this row's, from the medians
            row["our_speedup"] = round(statistics.median(secs) / statistics.median(t_ours), 2)
        rows[name] = row
    return {"docs": n, **({"true_pairs": len(truth)} if truth is not None else {}), "methods": rows}


def rss_child(corpus: Path) -> None:
    """In a fresh process: dedup (exact + near) of the JSONL texts, streamed; VmHWM before and after."""
    from cogumi_tasks.data.dedup import dedup

    def hwm_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        raise RuntimeError("no VmHWM in /proc/self/status")

    class Texts:
        def __iter__(self) -> Iterator[str]:
            with open(corpus, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    before = hwm_mb()
    res = dedup(Texts())
    print(json.dumps({"peak_rss_mb_after_imports": before, "peak_rss_mb": hwm_mb(), "kept": len(res.keep),
                      "exact_dropped": len(res.exact_dropped), "near_dropped": len(res.near_dropped)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--truth-docs", type=int, default=5000)
    ap.add_argument("--speed-docs", type=int, nargs="*", default=[20_000, 50_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cogumi" / "bench-dedup")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    if args.repeats < 5:
        print(f"note: --repeats {args.repeats} (< 5)", file=sys.stderr)
    pool = docstrings(args.cache)
    print(f"{len(pool)} docstrings", file=sys.stderr)

    texts = make_corpus(pool, args.truth_docs, args.seed)
    truth_s, truth = timed(lambda: all_pairs_truth(texts))
    paths = {}
    for name, fn in (("bulk", sketches_bulk), ("update_batch", sketches_update_batch)):
        paths[name] = summary([timed(lambda fn=fn: fn(texts))[0] for _ in range(args.repeats)], 3)
    fastest = min(paths, key=lambda p: paths[p]["median"])
    sketcher = sketches_bulk if fastest == "bulk" else sketches_update_batch
    print(f"ground truth in {truth_s:.1f}s; datasketch path: {fastest}", file=sys.stderr)
    results = {"truth": run_size(texts, args.repeats, sketcher, truth)}
    for n in args.speed_docs:
        print(f"speed at {n} docs", file=sys.stderr)
        results[f"speed_{n}"] = run_size(make_corpus(pool, n, args.seed), args.repeats, sketcher, None)

    largest = max([args.truth_docs, *args.speed_docs])
    corpus = args.cache / f"corpus-{largest}-{args.seed}.jsonl"
    corpus.write_text("".join(json.dumps(t) + "\n" for t in make_corpus(pool, largest, args.seed)))
    child = subprocess.run([sys.executable, __file__, "--rss-child", str(corpus)], capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"memory child failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    memory = {"docs": largest, "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
              **json.loads(child.stdout.strip().splitlines()[-1])}

    report = {
        "benchmark": "dedup", "threshold": THRESHOLD, "num_perm": NUM_PERM, "shingle_size": K,
        "repeats": args.repeats, "seed": args.seed, "cpu_count": os.cpu_count(),
        "corpus": f"{len(pool)} distinct triple-quoted strings ({MIN_CHARS}-{MAX_CHARS} chars, docstrings mostly) "
                  "of the stdlib and site-packages .py files, with planted edited copies",
        "datasketch_sketch_seconds_at_truth_size": {**paths, "used": fastest},
        "ground_truth": "all pairs, exact Jaccard", "ground_truth_seconds": round(truth_s, 1),
        **results,
        "dedup_peak_memory": memory,
    }
    text = json.dumps(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
