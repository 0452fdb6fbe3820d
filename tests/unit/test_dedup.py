"""Phase 0 dedup: datasketch-equal signatures, exact and near-duplicate removal, edge cases."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from cogumi_tasks.data import dedup as dd
from cogumi_tasks.data.dedup import DedupResult, dedup, jaccard, minhash_signatures, normalize, shingles

WORDS = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in ("", "n", "st", "r", "m", "ck")]


def doc(seed: int, n: int = 60) -> list[str]:
    return random.Random(seed).choices(WORDS, k=n)


def edit(words: list[str], seed: int, n_edits: int) -> list[str]:
    rng, out = random.Random(seed), list(words)
    for _ in range(n_edits):
        out[rng.randrange(len(out))] = rng.choice(WORDS) + "x"
    return out


def exact_j(a: str, b: str, k: int = 5) -> float:
    return jaccard(shingles(a, k), shingles(b, k))


def datasketch_row(text: str, num_perm: int, seed: int, k: int, scheme: str = "affine32") -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    for s in shingles(text, k):
        m.update(s.encode("utf8"))
    return m.hashvalues


TEXTS = ["", "ab", "Hello", "Héllo wörld, ünïcode — text!", "日本語のテキストです。日本語です", "  A  b c d e f g  ",
         " ".join(doc(1)), " ".join(doc(2, 200))]


def test_normalize_and_shingles() -> None:
    assert normalize("  Hello,\n\tWORLD!!  ") == "hello, world"
    assert normalize("...") == ""
    assert shingles("Hello World", 5) == {"hello", "ello ", "llo w", "lo wo", "o wor", " worl", "world"}
    assert shingles("ab!", 5) == {"ab"}
    assert shingles("  ", 5) == set()


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("k", [5, 12])  # k=12 takes the raw-window fallback for large key spaces
def test_signatures_equal_datasketch(scheme: str, k: int) -> None:
    sig = minhash_signatures(TEXTS, num_perm=64, shingle_size=k, seed=7, scheme=scheme)
    assert sig.shape == (len(TEXTS), 64) and sig.dtype == np.uint64
    for i, text in enumerate(TEXTS):
        np.testing.assert_array_equal(sig[i], datasketch_row(text, 64, 7, k, scheme))
    assert (sig[0] == (1 << 32) - 1).all()  # empty text: datasketch's empty MinHash


def test_signatures_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [" ".join(doc(s, 30 + s)) for s in range(40)]
    whole = minhash_signatures(texts, 128, 5)
    monkeypatch.setattr(dd, "CHUNK_CHARS", 500)
    monkeypatch.setattr(dd, "_SUB_OCC", 300)
    np.testing.assert_array_equal(minhash_signatures(texts, 128, 5), whole)
    np.testing.assert_array_equal(whole[3], datasketch_row(texts[3], 128, 1, 5))


def test_exact_jaccards_match_python_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dd, "CHUNK_CHARS", 2000)  # several blocks
    norm = [normalize(t) for t in TEXTS + [" ".join(edit(doc(1), 3, n)) for n in range(6)]]
    pairs = np.array([(i, j) for i in range(len(norm)) for j in range(i + 1, len(norm))], dtype=np.int64)
    got = dd._exact_jaccards(norm, pairs, 5)
    want = [exact_j(norm[i], norm[j]) for i, j in pairs.tolist()]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_lsh_params() -> None:
    assert dd.lsh_params(0.8, 128) == (25, 5)
    assert dd.lsh_params(0.8, 128, max_miss=0.002) == (21, 6)
    b, r = dd.lsh_params(0.8, 128)
    assert (1 - 0.8**r) ** b <= dd.LSH_MISS


def test_exact_duplicates_keep_best_score() -> None:
    other = " ".join(doc(3))
    res = dedup(["Same text.", "same   TEXT", other, "SAME text!", "same text"], [0.1, 0.9, 0.5, 0.9, 0.2])
    assert res.keep == [1, 2]
    assert res.exact_dropped == [(0, 1), (3, 1), (4, 1)]
    assert res.near_dropped == []


def test_near_duplicate_dropped_with_estimate() -> None:
    base = doc(10)
    a, b, c = " ".join(base), " ".join(edit(base, 11, 1)), " ".join(doc(12))
    j = exact_j(a, b)
    assert 0.85 < j < 0.95
    res = dedup([a, b, c], [0.2, 0.7, 0.1])
    assert res.keep == [1, 2]
    assert res.exact_dropped == []
    assert [(d, k) for d, k, _ in res.near_dropped] == [(0, 1)]
    est = res.near_dropped[0][2]
    ma, mb = (MinHash(num_perm=128) for _ in range(2))
    for m, t in ((ma, a), (mb, b)):
        m.update_batch([s.encode("utf8") for s in shingles(t, 5)])
    assert est == pytest.approx(ma.jaccard(mb))  # the MinHash estimate, as datasketch computes it
    assert abs(est - j) < 0.1


def test_half_similar_pair_kept() -> None:
    base = doc(20)
    a, b = " ".join(base), " ".join(base[:30] + doc(21, 30))
    assert 0.3 < exact_j(a, b) < 0.6
    res = dedup([a, b])
    assert res == DedupResult(keep=[0, 1], exact_dropped=[], near_dropped=[])


def test_threshold_decided_by_exact_jaccard() -> None:
    """Pairs just below and just above 0.8 land on the right side (exact check near the threshold)."""
    base = doc(30, 80)
    texts = [" ".join(base)] + [" ".join(edit(base, 100 + n, n)) for n in range(1, 9)]
    js = [exact_j(texts[0], t) for t in texts[1:]]
    assert min(js) < 0.75 and max(js) > 0.85
    pairs = {tuple(p) for p in dd.near_duplicate_pairs(texts).tolist()}
    want = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
            if exact_j(texts[i], texts[j]) >= 0.8}
    assert pairs == want
    assert any(0.77 < exact_j(texts[i], texts[j]) < 0.8 for i in range(9) for j in range(i + 1, 9))


def test_cluster_keeps_best_score() -> None:
    base = doc(40)
    a = " ".join(base)
    b = " ".join(edit(base, 41, 1))
    c = " ".join(edit(base, 42, 1))
    d = " ".join(doc(43))
    res = dedup([a, b, d, c], [0.3, 0.5, 0.1, 0.9])
    assert res.keep == [2, 3]
    assert [(x, k) for x, k, _ in res.near_dropped] == [(0, 3), (1, 3)]
    assert all(0.75 < e <= 1.0 for _, _, e in res.near_dropped)
    tie = dedup([a, b, d, c])  # no scores: the lowest index of the cluster stays
    assert tie.keep == [0, 2]
    assert [(x, k) for x, k, _ in tie.near_dropped] == [(1, 0), (3, 0)]


def test_exact_then_near() -> None:
    base = doc(50)
    a, near = " ".join(base), " ".join(edit(base, 51, 1))
    res = dedup([a, a.upper(), near], [0.1, 0.8, 0.5])
    assert res.exact_dropped == [(0, 1)]
    assert [(x, k) for x, k, _ in res.near_dropped] == [(2, 1)]
    assert res.keep == [1]


def test_empty_and_single() -> None:
    assert dedup([]) == DedupResult(keep=[], exact_dropped=[], near_dropped=[])
    assert dedup(["only one document"], [1.0]) == DedupResult(keep=[0], exact_dropped=[], near_dropped=[])
    res = dedup(["", "!!!", "ab", "ab."])
    assert res.keep == [0, 2] and res.exact_dropped == [(1, 0), (3, 2)] and res.near_dropped == []
    with pytest.raises(ValueError):
        dedup(["a", "b"], [1.0])


class Passes:
    """Texts that count how often they are read (a re-iterable like the step's JSONL rows)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.passes = texts, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.texts)


def test_streamed_texts_read_at_most_twice_and_chunking_does_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    base = doc(60, 80)
    texts = [" ".join(base)] + [" ".join(edit(base, 200 + n, n)) for n in range(1, 9)] + [" ".join(doc(61))] * 2
    scores = [float(i % 3) for i in range(len(texts))]
    whole = dedup(texts, scores)
    assert whole.exact_dropped and whole.near_dropped
    monkeypatch.setattr(dd, "CHUNK_CHARS", 700)  # several chunks of streamed texts
    src = Passes(texts)
    assert dedup(src, iter(scores)) == whole
    assert src.passes == 2  # signatures, then the texts of pairs near the threshold
    src = Passes(texts)
    pairs = dd.near_duplicate_pairs(src)
    assert src.passes == 2
    assert {tuple(p) for p in pairs.tolist()} == {
        (i, j) for i in range(len(texts)) for j in range(i + 1, len(texts)) if exact_j(texts[i], texts[j]) >= 0.8}
    np.testing.assert_array_equal(minhash_signatures(iter(texts), 128, 5), minhash_signatures(texts, 128, 5))


def test_one_shot_iterator_and_score_count_refused() -> None:
    with pytest.raises(TypeError, match="re-iterable"):
        dedup(iter(["a", "b"]))
    with pytest.raises(ValueError, match="fewer scores"):
        dedup(["a", "b"], iter([1.0]))
    with pytest.raises(ValueError, match="more scores"):
        dedup(["a", "b"], [1.0, 2.0, 3.0])


def test_dedup_step_streams_rows_in_id_order(s3_server, store_for, tmp_path) -> None:
    """The step reads two shards out of id order, keeps the best-scored record of each group and
    writes the survivors in id order; dropped rows name the kept id."""
    import json

    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.core.steps import run_step

    base = doc(70, 80)
    answers = {"a1": " ".join(base), "a2": " ".join(edit(base, 71, 1)), "a3": " ".join(base).upper(),
               "b1": " ".join(doc(72)), "b2": " ".join(doc(73))}
    scores = {"a1": 5, "a2": 9, "a3": 7, "b1": 3, "b2": 3}
    rows = {i: {"id": i, "prompt": "p", "response": t, "judge_score": scores[i], "domain": "general"}
            for i, t in answers.items()}
    shards = [tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"]
    shards[0].write_text("".join(json.dumps(rows[i]) + "\n" for i in ("b2", "a3", "a1")))
    shards[1].write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(rows[i]) + "\n" for i in ("b1", "a2")).encode())
    cfg = load_config("tiny", {"name": "t-dedup-step", "dataset.dedup.field": "response"})
    res = run_step("data.dedup", cfg, {"scored": [str(p) for p in shards]}, store=store_for(cfg))
    read = lambda name: [json.loads(x) for x in store_for(cfg).get_bytes(res.outputs[name]).decode().splitlines()]  # noqa: E731
    assert read("deduped") == [rows["a2"], rows["b1"], rows["b2"]]
    dropped = {r["id"]: (r["duplicate_kind"], r["duplicate_of"]) for r in read("dropped")}
    assert dropped == {"a1": ("exact", "a3"), "a3": ("near", "a2")}  # a3 (7) beats a1 (5), a2 (9) beats a3
    assert res.metrics == {"records_in": 5, "exact_duplicates": 1, "near_duplicates": 1, "records_out": 3}


def test_world_rows_dedup_by_task_not_wording() -> None:
    """Distinct tasks whose prompts read alike are kept; one task in two wordings is an exact duplicate."""
    from cogumi_tasks.data.steps import dedup_text
    from cogumi_tasks.world import generate

    insts = generate("list_fn", 200, seed=0, part="train")
    a = insts[0]
    # the instance whose prompt shares the most 5-shingles with a's, a different task
    twin = max(insts[1:], key=lambda i: jaccard(shingles(normalize(a.prompt), 5), shingles(normalize(i.prompt), 5)))
    assert jaccard(shingles(normalize(a.prompt), 5), shingles(normalize(twin.prompt), 5)) > 0.5
    rows = [{"prompt": a.prompt, "response": "x", "task": a.to_dict()},
            {"prompt": twin.prompt, "response": "x", "task": twin.to_dict()},
            {"prompt": a.prompt.upper() + " Please.", "response": "y", "task": a.to_dict()},
            {"prompt": "a general prompt", "response": "z"}]
    texts = [dedup_text(r, "prompt_response") for r in rows]
    assert texts[0] == texts[2] and texts[0] != texts[1]
    assert texts[3] == "a general prompt\nz"
    result = dedup(texts, [1.0, 1.0, 2.0, 1.0], num_perm=128, shingle_size=5, threshold=0.8)
    assert sorted(result.keep) == [1, 2, 3]  # the better-scored wording of task a, the twin, the general row
    assert result.near_dropped == []
