"""Benchmark: Phase 0 near-duplicate finding, ours (vectorised MinHash + LSH + verification) vs a
plain datasketch loop, on one synthetic corpus with planted near duplicates. Prints one JSON line.

    python bench/dedup.py [--docs 50000] [--baseline-docs N] [--seed 0]

Corpus: English-like documents of 30-80 words drawn (Zipf) from a 30,000-word vocabulary of
letter-frequency words; one in six base documents gets 1-3 copies with 1-8 random word edits
(substitute / insert / delete), so planted pairs fall on both sides of Jaccard 0.8.

Both methods use the same shingles (``cogumi_tasks.data.dedup.shingles``: character 5-shingles of
the normalised text). Baseline: one ``datasketch.MinHash(num_perm=128)`` per document, updated
shingle by shingle, ``MinHashLSH(threshold=0.8, num_perm=128)`` query then insert for every
document, each candidate kept when ``MinHash.jaccard`` >= 0.8. Ours: ``near_duplicate_pairs``.

Ground truth: exact Jaccard >= 0.8 over every pair inside a planted group plus every pair either
method reported. All n^2 pairs are out of reach; unrelated documents sit near Jaccard 0.05 (the
shared frequent words), so no true pair lies outside that set. Recall and precision are over
unordered pairs, identically for both methods.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasketch import MinHash, MinHashLSH  # noqa: E402

from cogumi_tasks.data.dedup import jaccard, lsh_params, near_duplicate_pairs, shingles  # noqa: E402

THRESHOLD, NUM_PERM, K = 0.8, 128, 5
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
FREQ = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
        1.0, 0.8, 0.15, 0.15, 0.1, 0.07]  # English letter frequencies, in LETTERS order


def make_corpus(n: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """n documents and the planted groups (indices of a base document and its edited copies)."""
    rng = np.random.default_rng(seed)
    freq = np.array(FREQ) / sum(FREQ)
    vocab_set: set[str] = set()
    while len(vocab_set) < 30_000:
        vocab_set.add("".join(rng.choice(list(LETTERS), int(rng.integers(2, 11)), p=freq)))
    vocab = np.array(sorted(vocab_set), dtype=object)
    rng.shuffle(vocab)
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.05)
    cdf /= cdf[-1]

    def words(m: int) -> list[str]:
        return list(vocab[np.minimum(np.searchsorted(cdf, rng.random(m)), len(vocab) - 1)])

    texts: list[str] = []
    groups: list[list[int]] = []
    while len(texts) < n:
        base = words(int(rng.integers(30, 81)))
        group = [len(texts)]
        texts.append(" ".join(base).capitalize() + ".")
        if len(groups) < n // 6:
            for _ in range(int(rng.integers(1, 4))):
                if len(texts) >= n:
                    break
                copy = list(base)
                for _ in range(int(rng.integers(1, 9))):
                    op, at = int(rng.integers(3)), int(rng.integers(len(copy)))
                    if op == 0:
                        copy[at] = words(1)[0]
                    elif op == 1:
                        copy.insert(at, words(1)[0])
                    elif len(copy) > 5:
                        del copy[at]
                group.append(len(texts))
                texts.append(" ".join(copy).capitalize() + ".")
            groups.append(group)
    return texts, groups


def baseline_pairs(texts: list[str]) -> set[tuple[int, int]]:
    """The plain datasketch loop: MinHash per doc, LSH query + insert, MinHash.jaccard check."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sketches: list[MinHash] = []
    found: set[tuple[int, int]] = set()
    for i, text in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM)
        for s in shingles(text, K):
            m.update(s.encode("utf8"))
        for j in lsh.query(m):
            if m.jaccard(sketches[j]) >= THRESHOLD:
                found.add((j, i))
        lsh.insert(i, m)
        sketches.append(m)
    return found


def score(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> tuple[float, float]:
    hit = len(found & truth)
    return hit / max(len(truth), 1), hit / max(len(found), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--baseline-docs", type=int, default=None, help="baseline on the first N docs only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    texts, groups = make_corpus(args.docs, args.seed)
    n_base = min(args.baseline_docs or args.docs, args.docs)

    t0 = time.perf_counter()
    ours = {(int(i), int(j)) for i, j in near_duplicate_pairs(texts, num_perm=NUM_PERM, shingle_size=K,
                                                               threshold=THRESHOLD)}
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = baseline_pairs(texts[:n_base])
    base_s = time.perf_counter() - t0

    candidates = {p for g in groups for p in itertools.combinations(g, 2)} | ours | base
    cache: dict[int, set[str]] = {}

    def sh(i: int) -> set[str]:
        if i not in cache:
            cache[i] = shingles(texts[i], K)
        return cache[i]

    truth = {(i, j) for i, j in candidates if jaccard(sh(i), sh(j)) >= THRESHOLD}
    recall, precision = score(ours, truth)
    b_recall, b_precision = score(base, {(i, j) for i, j in truth if j < n_base})
    bands, rows = lsh_params(THRESHOLD, NUM_PERM)
    base_lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    print(json.dumps({
        "docs": args.docs,
        "baseline_docs": n_base,
        "ours_docs_per_s": round(args.docs / ours_s, 1),
        "baseline_docs_per_s": round(n_base / base_s, 1),
        "speedup": round((args.docs / ours_s) / (n_base / base_s), 2),
        "recall": round(recall, 5),
        "precision": round(precision, 5),
        "baseline_recall": round(b_recall, 5),
        "baseline_precision": round(b_precision, 5),
        "ours_seconds": round(ours_s, 3),
        "baseline_seconds": round(base_s, 3),
        "true_pairs": len(truth),
        "ours_pairs": len(ours),
        "baseline_pairs": len(base),
        "ours_lsh_bands_rows": [bands, rows],
        "baseline_lsh_bands_rows": [base_lsh.b, base_lsh.r],
    }))


if __name__ == "__main__":
    main()
