"""The router's input: the verdict table it learns from and the 128 features of a query.

Verdict table (JSONL, one query per line; Phase 4's labelling step writes it)::

    {"id": "list_fn-0a1b2c", "query": "Write a Python function ...", "domain": "code",
     "verdicts": {"base": false, "code": true, "reasoning": false, "automation": false},
     "confidence": 0.42, "session": [{"route": "base", "outcome": "ok"}]}

- ``domain``: the query's domain (``code``, ``reasoning``, ``automation``) or null for a general prompt; only
  reports use it, never the router.
- ``verdicts``: per model (the keys of ``routing.router.costs``, all of them), whether its answer was correct.
- ``confidence``: the base model's calibrated confidence in its own answer (Phase 2's calibrator), in [0, 1].
- ``raw_confidence``: optional, the same before calibration (what scheduled re-calibration refits on).
- ``session``: optional, the previous turns of the query's session, oldest first: ``route`` (a model) and
  ``outcome`` (one of :data:`OUTCOMES`, session memory's values).

Label: the cheapest model whose verdict is true, ties in label-map order (base first); base when none is.

Features, in this order (:func:`feature_names`): ``pca_dims`` components of the query's MiniLM embedding (L2
normalised, centred and projected by a PCA fitted on the training queries), the confidence, the last turn's route
one-hot (models), each model's share of the last ``session_window`` routes (models), the last outcome good (ok,
thumbs_up) and bad (escalated, thumbs_down). 117 + 1 + 4 + 4 + 2 = 128 with the plan's four models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogumi_tasks.core.records import read_jsonl

GOOD_OUTCOMES = ("ok", "thumbs_up")
BAD_OUTCOMES = ("escalated", "thumbs_down")
OUTCOMES = ("pending", *GOOD_OUTCOMES, *BAD_OUTCOMES)


class SessionTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    route: str
    outcome: str = "pending"


class VerdictRow(BaseModel):
    """One line of the verdict table (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    query: str = Field(min_length=1)
    domain: str | None = None
    verdicts: dict[str, bool]
    confidence: float = Field(ge=0, le=1)
    raw_confidence: float | None = Field(None, ge=0, le=1)
    session: list[SessionTurn] = Field(default_factory=list)


def label_of(verdicts: Mapping[str, bool], models: Sequence[str], costs: Mapping[str, float]) -> int:
    """Index in ``models`` of the cheapest model that answered correctly (ties: label-map order); 0 (base) if none."""
    right = [i for i, m in enumerate(models) if verdicts[m]]
    return min(right, key=lambda i: (costs[models[i]], i)) if right else 0


def load_verdicts(path: Path, models: Sequence[str]) -> list[VerdictRow]:
    """Every row of a verdict table; a bad row raises naming the file, line and field."""
    rows: list[VerdictRow] = []
    seen: set[str] = set()
    for n, raw in read_jsonl(path):
        try:
            row = VerdictRow.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "<record>"
            raise ValueError(f"{path}:{n}: field {field!r}: {err['msg']}") from None
        if set(row.verdicts) != set(models):
            raise ValueError(f"{path}:{n}: field 'verdicts': keys {sorted(row.verdicts)}, expected {sorted(models)}")
        for t, turn in enumerate(row.session):
            if turn.route not in models:
                raise ValueError(f"{path}:{n}: field 'session.{t}.route': {turn.route!r} is not one of {list(models)}")
            if turn.outcome not in OUTCOMES:
                raise ValueError(f"{path}:{n}: field 'session.{t}.outcome': {turn.outcome!r} is not one of "
                                 f"{list(OUTCOMES)}")
        if row.id in seen:
            raise ValueError(f"{path}:{n}: field 'id': duplicate {row.id!r}")
        seen.add(row.id)
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------- PCA
@dataclass(frozen=True)
class Pca:
    """Centring and projection onto ``dims`` components; components past the training data's rank are zero rows
    (their features are constant 0), so the feature count never depends on how many queries were seen."""

    mean: np.ndarray  # (embedding dim,)
    components: np.ndarray  # (dims, embedding dim)
    explained: np.ndarray  # (dims,) share of the training variance per component

    @property
    def rank(self) -> int:
        return int(np.count_nonzero(np.abs(self.components).sum(axis=1)))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mean) @ self.components.T).astype(np.float32)


def fit_pca(x: np.ndarray, dims: int) -> Pca:
    """PCA of the rows of ``x`` by SVD (numpy); signs fixed so each component's largest entry is positive."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 rows, got shape {x.shape}")
    if dims > x.shape[1]:
        raise ValueError(f"pca_dims {dims} exceeds the embedding dimension {x.shape[1]}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2
    keep = min(dims, int(np.sum(var > var.sum() * 1e-10)))
    comps = np.zeros((dims, x.shape[1]))
    comps[:keep] = vt[:keep]
    signs = np.sign(comps[np.arange(dims), np.argmax(np.abs(comps), axis=1)])
    comps *= np.where(signs == 0, 1, signs)[:, None]
    explained = np.zeros(dims)
    explained[:keep] = var[:keep] / var.sum()
    return Pca(mean.astype(np.float32), comps.astype(np.float32), explained.astype(np.float32))


# ---------------------------------------------------------------- features
def session_dims(n_models: int) -> int:
    return 2 * n_models + 2


def feature_dim(pca_dims: int, n_models: int) -> int:
    return pca_dims + 1 + session_dims(n_models)


def feature_names(pca_dims: int, models: Sequence[str]) -> list[str]:
    names = [f"pca_{i}" for i in range(pca_dims)] + ["confidence"]
    names += [f"last_route_{m}" for m in models] + [f"share_{m}" for m in models] + ["last_good", "last_bad"]
    assert len(names) == feature_dim(pca_dims, len(models))
    return names


def _get(turn: Any, key: str) -> Any:
    return turn[key] if isinstance(turn, Mapping) else getattr(turn, key)


def session_features(turns: Sequence[Any], models: Sequence[str], window: int) -> np.ndarray:
    """Last route one-hot, route shares over the last ``window`` turns, last outcome good/bad. ``turns``: oldest
    first, each a mapping or an object (session memory's turns) with ``route`` and ``outcome``."""
    out = np.zeros(session_dims(len(models)), dtype=np.float32)
    recent = list(turns)[-window:]
    if not recent:
        return out
    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    out[index[_get(recent[-1], "route")]] = 1.0
    for t in recent:
        out[k + index[_get(t, "route")]] += 1.0 / len(recent)
    outcome = _get(recent[-1], "outcome")
    out[2 * k] = float(outcome in GOOD_OUTCOMES)
    out[2 * k + 1] = float(outcome in BAD_OUTCOMES)
    return out


def build_features(pca: Pca, embeddings: np.ndarray, confidences: Sequence[float], sessions: Sequence[Sequence[Any]],
                   models: Sequence[str], window: int) -> np.ndarray:
    """The (n, feature_dim) float32 matrix of n queries, columns as :func:`feature_names`."""
    n = len(confidences)
    if embeddings.shape[0] != n or len(sessions) != n:
        raise ValueError(f"{embeddings.shape[0]} embeddings, {n} confidences, {len(sessions)} sessions")
    dims = pca.components.shape[0]
    x = np.empty((n, feature_dim(dims, len(models))), dtype=np.float32)
    x[:, :dims] = pca.transform(embeddings)
    x[:, dims] = np.asarray(confidences, dtype=np.float32)
    for i, turns in enumerate(sessions):
        x[i, dims + 1:] = session_features(turns, models, window)
    assert x.shape[1] == len(feature_names(dims, models))
    return x


def embed_queries(embedder: Any, queries: Sequence[str]) -> np.ndarray:
    """L2-normalised MiniLM embeddings (the failure analysis's embedding, one place for both)."""
    from cogumi_tasks.train.failures import embed

    return embed(embedder, list(queries))
