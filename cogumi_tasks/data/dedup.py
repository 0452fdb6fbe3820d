"""Exact and MinHash-LSH near-duplicate removal for Phase 0, vectorised with numpy.

Shingles are *character* k-shingles of the normalised text (:func:`normalize`; a text shorter than
k is one shingle, an empty one has none); the same shingles feed MinHash, LSH and the exact Jaccard.

Signatures follow datasketch's conventions bit for bit: the permutations come from
``datasketch.MinHash(num_perm, seed, scheme)``, each shingle is hashed with datasketch's
``sha1_hash32`` of its UTF-8 bytes, and the permutation arithmetic is the scheme's ("affine32",
datasketch 2.x's default: ``a * fmix32(h) + b mod 2**32``; or "legacy":
``((a * h + b) % (2**61 - 1)) & (2**32 - 1)``). The speed comes from hashing each distinct shingle
of a chunk once (found by one integer sort) and applying the permutations to all documents'
shingles at once, with ``np.minimum.reduceat`` by document offsets. Texts stream through in chunks
of ``CHUNK_CHARS`` characters; between chunks only signatures (and, for exact dedup, a 16-byte
digest per distinct text) are kept. Peak memory at 50,000 documents: ``bench/dedup.py``.

Near duplicates: LSH banding with (bands, rows) chosen so that a pair at the threshold is missed
with probability <= 0.1 % (128 perms, 0.8: 25 bands x 5 rows), then every candidate pair is
verified: a MinHash estimate at least ``VERIFY_MARGIN`` (~4 sigma at 128 perms) above the
threshold accepts, one that far below rejects, and in between the exact Jaccard of the shingle
sets decides. Precision and recall against exact Jaccard >= threshold are measured in
``bench/dedup.py``.
"""

from __future__ import annotations

import hashlib
import string
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from datasketch import MinHash
from tqdm import tqdm

VERIFY_MARGIN = 0.15  # |estimate - threshold| below this -> exact Jaccard decides
LSH_MISS = 1e-3  # highest acceptable probability that LSH misses a pair at the threshold
MAX_BUCKET_WINDOW = 256  # a larger LSH bucket pairs each member with its next 255 only
CHUNK_CHARS = 1 << 23  # characters per chunk of texts (bounds memory)
_SUB_OCC = 1 << 16  # shingle occurrences per permutation block (stays in cache)
_STRIP = string.punctuation + string.whitespace
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding punctuation and space."""
    return " ".join(text.lower().split()).strip(_STRIP)


def shingles(text: str, k: int) -> set[str]:
    """Character k-shingles of ``normalize(text)``; a shorter non-empty text is one shingle."""
    t = normalize(text)
    if len(t) < k:
        return {t} if t else set()
    return {t[i : i + k] for i in range(len(t) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two shingle sets (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _sha1_32(items: list[bytes]) -> np.ndarray:
    """datasketch's sha1_hash32 (first 4 digest bytes, little endian) of many byte strings."""
    sha1 = hashlib.sha1
    return np.frombuffer(b"".join([sha1(x).digest()[:4] for x in items]), dtype="<u4").astype(np.uint32)


class _Permuter:
    """datasketch's permutations for one (num_perm, seed, scheme), applied to 32-bit shingle hashes."""

    def __init__(self, num_perm: int, seed: int, scheme: str) -> None:
        if scheme not in ("affine32", "legacy"):
            raise ValueError(f"scheme must be 'affine32' or 'legacy', got {scheme!r}")
        self.scheme, self.num_perm = scheme, num_perm
        self.a, self.b = MinHash(num_perm=num_perm, seed=seed, scheme=scheme).permutations
        self.dtype = np.uint32 if scheme == "affine32" else np.uint64

    def prepare(self, h: np.ndarray) -> np.ndarray:
        """The per-shingle input of the permutations (fmix-ed for affine32)."""
        return _fmix32(h) if self.scheme == "affine32" else h.astype(np.uint64)

    def apply(self, x: np.ndarray, j: int, out: np.ndarray) -> np.ndarray:
        np.multiply(x, self.a[j], out=out)
        np.add(out, self.b[j], out=out)
        if self.scheme == "legacy":
            np.remainder(out, _MERSENNE, out=out)
            np.bitwise_and(out, _MAX32, out=out)
        return out

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Signatures of documents with a single (prepared) shingle each."""
        out = np.empty((len(x), self.num_perm), dtype=self.dtype)
        for j in range(self.num_perm):
            self.apply(x, j, out[:, j])
        return out


def _chunk_shingle_ids(docs: list[str], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Exact chunk-local ids of every k-window of every doc (all of length >= k), in doc order.

    Returns (ids per window, the position of one window per id in the joined text, windows per doc,
    the joined text).
    """
    lens = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    big = "".join(docs)
    cps = np.frombuffer(big.encode("utf-32-le"), dtype=np.uint32)
    n_win = len(cps) - k + 1
    valid = np.ones(n_win, dtype=bool)  # windows that cross a document boundary are invalid
    ends = np.cumsum(lens)
    for j in range(1, k):
        valid[ends[ends - j < n_win] - j] = False
    pos = np.flatnonzero(valid)
    present = np.zeros(int(cps.max()) + 1, dtype=bool)
    present[cps] = True
    base = int(present.sum())
    idx_bits = max(1, int(len(pos) - 1).bit_length())
    if base**k < 1 << (63 - idx_bits):  # fast path: exact integer key + window index, one plain sort
        dense = (np.cumsum(present, dtype=np.int64) - 1)[cps]
        key = dense[:n_win].copy()
        for j in range(1, k):
            key *= base
            key += dense[j : n_win + j]
        packed = np.sort((key[pos] << idx_bits) | np.arange(len(pos), dtype=np.int64))
        occ = packed & ((1 << idx_bits) - 1)
        first = np.empty(len(packed), dtype=bool)
        first[:1] = True
        np.not_equal(packed[1:] >> idx_bits, packed[:-1] >> idx_bits, out=first[1:])
        ids = np.empty(len(pos), dtype=np.int64)
        ids[occ] = np.cumsum(first) - 1
        reps = pos[occ[first]]
    else:  # huge alphabets: unique over the raw windows
        win = np.lib.stride_tricks.sliding_window_view(cps, k)[pos]
        view = np.ascontiguousarray(win).view(np.dtype((np.void, 4 * k))).ravel()
        _, first_idx, ids = np.unique(view, return_index=True, return_inverse=True)
        reps = pos[first_idx]
    return ids.ravel(), reps, lens - k + 1, big


def _chunk_shingle_hashes(docs: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """sha1_hash32 of every k-window of every doc (len >= k), in doc order, and windows per doc."""
    ids, reps, counts, big = _chunk_shingle_ids(docs, k)
    if big.isascii():
        raw = big.encode("ascii")
        items = [raw[p : p + k] for p in reps.tolist()]
    else:
        items = [big[p : p + k].encode("utf-8") for p in reps.tolist()]
    return _sha1_32(items)[ids], counts


def _signatures(norm: list[str], k: int, perm: _Permuter, bar: tqdm | None = None) -> np.ndarray:
    """(n, num_perm) signatures of already-normalised texts, in the scheme's dtype."""
    if k < 1:
        raise ValueError(f"shingle_size must be >= 1, got {k}")
    n = len(norm)
    sig = np.full((n, perm.num_perm), _MAX32, dtype=perm.dtype)  # an empty MinHash, both schemes
    lens = np.fromiter(map(len, norm), dtype=np.int64, count=n)
    short = np.flatnonzero((lens > 0) & (lens < k))
    if len(short):
        sig[short] = perm.rows(perm.prepare(_sha1_32([norm[i].encode("utf-8") for i in short.tolist()])))
    long_idx = np.flatnonzero(lens >= k)
    if bar is not None:
        bar.update(n - len(long_idx))
    for chunk in _chunks(long_idx, lens, CHUNK_CHARS):
        hv, counts = _chunk_shingle_hashes([norm[i] for i in chunk.tolist()], k)
        x = perm.prepare(hv)
        off = np.concatenate([[0], np.cumsum(counts)])
        out = np.empty((perm.num_perm, len(chunk)), dtype=perm.dtype)
        bounds = np.unique(np.searchsorted(off, np.arange(0, off[-1], _SUB_OCC), side="right") - 1)
        bounds = np.append(bounds, len(chunk))
        buf = np.empty(int(np.max(off[bounds[1:]] - off[bounds[:-1]])), dtype=perm.dtype)
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            o0, o1 = int(off[s]), int(off[e])
            xs, starts, tmp = x[o0:o1], off[s:e] - o0, buf[: o1 - o0]
            for j in range(perm.num_perm):
                np.minimum.reduceat(perm.apply(xs, j, tmp), starts, out=out[j, s:e])
        sig[chunk] = out.T
        if bar is not None:
            bar.update(len(chunk))
    return sig


def _progress(on: bool) -> tqdm:
    return tqdm(desc="dedup: minhash", unit="doc", disable=not on, file=sys.stderr, mininterval=5.0, ascii=True)


def _stream_signatures(norm: Iterable[str], k: int, perm: _Permuter, bar: tqdm | None = None) -> np.ndarray:
    """Signatures of a stream of normalised texts, holding about ``CHUNK_CHARS`` characters of them at a time."""
    blocks, buf, chars = [], [], 0
    for t in norm:
        buf.append(t)
        chars += len(t)
        if chars >= CHUNK_CHARS:
            blocks.append(_signatures(buf, k, perm, bar))
            buf, chars = [], 0
    blocks.append(_signatures(buf, k, perm, bar))
    return np.concatenate(blocks)


def _reiterable(texts: Iterable[str]) -> Iterable[str]:
    if isinstance(texts, Iterator):  # one pass only
        raise TypeError("texts must be re-iterable (a list, or an object whose __iter__ starts a new pass): "
                        "the texts of pairs near the threshold are read again for their exact Jaccard")
    return texts


def _normalized_at(texts: Iterable[str], docs: np.ndarray) -> list[str]:
    """``normalize(texts[d])`` for each d in ``docs`` (any order), read in one pass that stops at the last."""
    where: dict[int, list[int]] = {}
    for pos, d in enumerate(docs.tolist()):
        where.setdefault(d, []).append(pos)
    out = [""] * len(docs)
    if not where:
        return out
    last = max(where)
    for i, t in enumerate(texts):
        if i in where:
            norm = normalize(t)
            for pos in where[i]:
                out[pos] = norm
        if i >= last:
            break
    return out


def _chunks(idx: np.ndarray, lens: np.ndarray, max_chars: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``idx`` holding about ``max_chars`` characters each (at least one doc)."""
    cum = np.cumsum(lens[idx])
    s = 0
    while s < len(idx):
        e = max(s + 1, int(np.searchsorted(cum, (cum[s - 1] if s else 0) + max_chars, side="right")))
        yield idx[s:e]
        s = e


def minhash_signatures(texts: Iterable[str], num_perm: int, shingle_size: int, seed: int = 1,
                       scheme: str = "affine32") -> np.ndarray:
    """(n, num_perm) uint64 MinHash signatures; row i equals the hashvalues of
    ``datasketch.MinHash(num_perm, seed, scheme=scheme)`` updated with ``shingles(texts[i], k)``.
    The texts are read once, in chunks."""
    perm = _Permuter(num_perm, seed, scheme)
    return _stream_signatures(map(normalize, texts), shingle_size, perm).astype(np.uint64)


def lsh_params(threshold: float, num_perm: int, max_miss: float | None = None) -> tuple[int, int]:
    """(bands, rows): the most rows per band whose miss probability at ``threshold`` is <= max_miss
    (default ``LSH_MISS``)."""
    max_miss = LSH_MISS if max_miss is None else max_miss
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if (1.0 - threshold**r) ** b <= max_miss:
            best = (b, r)
    return best


def _candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Unique (i, j), i < j, of rows sharing at least one band; shape (m, 2) int64."""
    n = len(sig)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    idx_bits = int(n - 1).bit_length()
    ids = np.arange(n, dtype=np.uint64)
    found = []
    for band in range(bands):
        h = np.full(n, 0x9E3779B97F4A7C15, dtype=np.uint64)
        for c in range(band * rows, (band + 1) * rows):
            h = (h ^ sig[:, c].astype(np.uint64)) * np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(29)
        # top bit clear: sort as int64; equal band hashes sort by doc id
        packed = np.sort((((h >> np.uint64(idx_bits + 1)) << np.uint64(idx_bits)) | ids).view(np.int64))
        key, doc = packed >> idx_bits, packed & ((1 << idx_bits) - 1)
        hit, d = np.flatnonzero(key[1:] == key[:-1]), 1
        while len(hit) and d < MAX_BUCKET_WINDOW:
            found.append(np.stack([doc[hit], doc[hit + d]], axis=1))
            d += 1
            hit = hit[hit + d < n]
            hit = hit[key[hit + d] == key[hit]]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)  # docs ascend within a bucket, so pairs[:, 0] < pairs[:, 1]
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def _estimates(sig: np.ndarray, pairs: np.ndarray, block: int = 1 << 15) -> np.ndarray:
    """MinHash Jaccard estimates of row pairs."""
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), block):
        p = pairs[s : s + block]
        out[s : s + block] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def _exact_jaccards(norm: list[str], pairs: np.ndarray, k: int, progress: bool = False) -> np.ndarray:
    """Exact Jaccard of the shingle sets of (normalised) text pairs, from exact shingle ids.

    Per block of pairs: each doc's sorted distinct ids, then for every pair both id lists tagged
    with the pair number are sorted together; equal neighbours are the intersection.
    """
    out = np.empty(len(pairs), dtype=np.float64)
    lens = np.fromiter(map(len, norm), dtype=np.int64, count=len(norm))
    short = (lens[pairs] < k).any(axis=1)
    for p in np.flatnonzero(short).tolist():  # a text shorter than k is its own single shingle
        out[p] = jaccard(shingles(norm[pairs[p, 0]], k), shingles(norm[pairs[p, 1]], k))
    todo = np.flatnonzero(~short)
    cum = np.cumsum(lens[pairs[todo]].sum(axis=1))
    bar = tqdm(total=len(pairs), desc="dedup: verify", unit="pair", disable=not progress, file=sys.stderr,
               mininterval=5.0, ascii=True)
    bar.update(len(pairs) - len(todo))
    s = 0
    while s < len(todo):  # blocks of pairs whose texts total about CHUNK_CHARS
        e = max(s + 1, int(np.searchsorted(cum, (cum[s - 1] if s else 0) + CHUNK_CHARS, side="right")))
        block = pairs[todo[s:e]]
        docs, local = np.unique(block, return_inverse=True)
        local = local.reshape(block.shape)
        ids, _, counts, _ = _chunk_shingle_ids([norm[i] for i in docs.tolist()], k)
        id_bits = int(ids.max()).bit_length()
        tagged = np.sort((np.repeat(np.arange(len(docs), dtype=np.int64), counts) << id_bits) | ids)
        distinct = np.ones(len(tagged), dtype=bool)
        np.not_equal(tagged[1:], tagged[:-1], out=distinct[1:])
        uniq = tagged[distinct] & ((1 << id_bits) - 1)  # each doc's distinct ids, ascending
        size = np.bincount(tagged[distinct] >> id_bits, minlength=len(docs))
        start = np.concatenate([[0], np.cumsum(size)[:-1]])
        seg = local.ravel()  # pair p -> segments of docs local[p, 0], local[p, 1]
        seg_len = size[seg]
        total = int(seg_len.sum())
        shift = start[seg] - (np.cumsum(seg_len) - seg_len)
        gather = np.arange(total, dtype=np.int64) + np.repeat(shift, seg_len)
        pair_no = np.repeat(np.arange(len(block), dtype=np.int64), 2)
        both = np.sort((np.repeat(pair_no, seg_len) << id_bits) | uniq[gather])
        inter = np.bincount(both[1:][both[1:] == both[:-1]] >> id_bits, minlength=len(block))
        union = size[local[:, 0]] + size[local[:, 1]] - inter
        out[todo[s:e]] = inter / union
        bar.update(e - s)
        s = e
    bar.close()
    return out


def _verified_pairs(sig: np.ndarray, threshold: float, k: int, texts: Iterable[str], doc_of_row: np.ndarray,
                    progress: bool = False) -> np.ndarray:
    """Candidate pairs of signature rows from LSH that pass verification, (m, 2) int64 with i < j.

    Only the pairs whose estimate is near the threshold need texts: those of their documents
    (``texts[doc_of_row[row]]``) are read again, in one pass.
    """
    bands, rows = lsh_params(threshold, sig.shape[1])
    pairs = _candidate_pairs(sig, bands, rows)
    est = _estimates(sig, pairs)
    ok = est >= threshold + VERIFY_MARGIN
    unsure = np.flatnonzero(np.abs(est - threshold) < VERIFY_MARGIN)
    if len(unsure):
        needed, local = np.unique(pairs[unsure], return_inverse=True)
        norm = _normalized_at(texts, doc_of_row[needed])
        ok[unsure] = _exact_jaccards(norm, local.reshape(-1, 2), k, progress) >= threshold
    return pairs[ok]


def near_duplicate_pairs(texts: Iterable[str], *, num_perm: int = 128, shingle_size: int = 5,
                         threshold: float = 0.8, seed: int = 1, progress: bool = False) -> np.ndarray:
    """Verified near-duplicate pairs (i < j) as an (m, 2) int64 array, without exact dedup.

    ``texts`` is re-iterable and read at most twice (signatures; then the texts of pairs near the
    threshold); only signatures are held between the passes.
    """
    texts = _reiterable(texts)
    with _progress(progress) as bar:
        sig = _stream_signatures(map(normalize, texts), shingle_size, _Permuter(num_perm, seed, "affine32"), bar)
    return _verified_pairs(sig, threshold, shingle_size, texts, np.arange(len(sig)), progress)


@dataclass
class DedupResult:
    keep: list[int] = field(default_factory=list)  # indices kept, ascending
    exact_dropped: list[tuple[int, int]] = field(default_factory=list)  # (dropped, kept)
    near_dropped: list[tuple[int, int, float]] = field(default_factory=list)  # (dropped, kept, estimate)


def dedup(texts: Iterable[str], scores: Iterable[float] | None = None, *, num_perm: int = 128,
          shingle_size: int = 5, threshold: float = 0.8, seed: int = 1, progress: bool = False) -> DedupResult:
    """Drop exact duplicates of the normalised text, then near duplicates (Jaccard >= threshold).

    Each group (exact) or cluster of verified pairs (near, union-find) keeps its best-scored record,
    ties to the lowest index; a dropped record names its group's kept record, and near duplicates
    the MinHash Jaccard estimate between the two (below ``threshold`` only when the cluster is a
    chain, a~b~c with a and c further apart).

    ``texts`` is re-iterable (a list, or an object whose ``__iter__`` starts a new pass) and read at
    most twice: once for a 128-bit digest and a signature per distinct text, then once for the texts
    of pairs whose estimate is near the threshold. Memory holds signatures and digests, not texts.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    texts = _reiterable(texts)
    perm = _Permuter(num_perm, seed, "affine32")
    first: dict[bytes, int] = {}  # digest of a normalised text -> its number among the distinct texts
    group = array("q")  # text index -> number of its distinct text
    best: list[int] = []  # distinct text -> index of its best-scored text
    score = array("d")
    given = iter(scores) if scores is not None else None

    def better(i: int, j: int) -> bool:
        return (score[i], -i) > (score[j], -j)

    def distinct() -> Iterator[str]:  # each new normalised text, in order; exact groups on the way
        for i, text in enumerate(texts):
            s = next(given, None) if given is not None else 0.0
            if s is None:
                raise ValueError(f"fewer scores than texts: none for text {i}")
            norm = normalize(text)
            score.append(float(s))
            key = hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            g = first.setdefault(key, len(best))
            group.append(g)
            if g == len(best):
                best.append(i)
                yield norm
            elif better(i, best[g]):
                best[g] = i

    with _progress(progress) as bar:
        sig = _stream_signatures(distinct(), shingle_size, perm, bar)
    if given is not None and next(given, None) is not None:
        raise ValueError(f"more scores than the {len(score)} texts")
    exact = [(i, best[g]) for i, g in enumerate(group) if best[g] != i]
    first.clear()
    heads = np.array(best, dtype=np.int64)
    pairs = _verified_pairs(sig, threshold, shingle_size, texts, heads, progress)

    parent = list(range(len(best)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    head: dict[int, int] = {}
    for g, i in enumerate(best):
        r = find(g)
        if r not in head or better(i, best[head[r]]):
            head[r] = g
    near_g = sorted(((g, head[find(g)]) for g in range(len(best)) if head[find(g)] != g), key=lambda p: best[p[0]])
    est = _estimates(sig, np.array(near_g, dtype=np.int64).reshape(-1, 2)).tolist()
    near = [(best[d], best[k], e) for (d, k), e in zip(near_g, est, strict=True)]
    near_set = {d for d, _, _ in near}
    keep = sorted(i for i in best if i not in near_set)
    return DedupResult(keep=keep, exact_dropped=exact, near_dropped=near)
