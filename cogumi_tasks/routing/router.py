"""The router: an MLP from a query's features (:mod:`cogumi_tasks.routing.features`) to one of the models.

The plan's network, 128 -> 64 -> 32 -> 4 (ReLU, dropout 0.2 after each hidden layer), trained with Adam (lr
1e-3), minibatches shuffled by a seeded generator, early stopping on the validation loss (the best epoch's weights
are kept). Same seed, same data and same thread count give the same weights. The loss follows ``target``:

- ``label``: softmax cross-entropy against the label (the cheapest model that answered correctly; with
  ``class_weight: balanced`` each label weighted by the inverse of its training count); the outputs are a
  distribution over the models;
- ``verdicts``: binary cross-entropy of one sigmoid per model against that model's verdict; the outputs are each
  model's probability of answering correctly. A query labelled base because no model answered it teaches nothing
  under ``label`` but "all four fail" here, and a domain where the modifier answers 70% and the base 35% is learnt
  as such even when most of its labels are base;
- ``gain``: mean squared error of each output against that model's verdict minus the base's (the base's target is
  always 0, a modifier's -1, 0 or +1); the outputs are each model's expected quality gain over the base. A query
  every model answers teaches "no gain" (under ``verdicts``: four probabilities near 1 whose noise decides).

Whatever the target, the route (:meth:`Router.choose`) is the argmax of the outputs less ``cost_weight`` x (the model's
cost - the base's), ties to label-map order (the base first).

A bundle is a directory: ``router.safetensors`` (the MLP's weights and the PCA's ``pca.mean``, ``pca.components``,
``pca.explained``) and ``manifest.json`` (format, label map, costs, layer sizes, feature names, session window,
embedder, chosen confidence threshold, training figures). :meth:`Router.load` reads it back; :meth:`Router.route`
gives the MLP's choice, :meth:`Router.decide` the thresholded decision (the base when its confidence >= the
threshold, else the MLP's choice).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cogumi_tasks.core.config import RouterConfig
from cogumi_tasks.routing.features import Pca, build_features, feature_dim, feature_names

if TYPE_CHECKING:
    import torch

FORMAT = "cogumi-router/1"
WEIGHTS = "router.safetensors"
MANIFEST = "manifest.json"


def split_key(key: str) -> float:
    """A uniform number in [0, 1) from a hash of ``key``: the same for the same key on every machine."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def split_of(row_id: str, holdout: float, validation: float, seed: int) -> str:
    """``test``, ``val`` or ``train`` for a row, from a hash of (seed, id): stable when rows are added or reordered.
    ``holdout`` of all rows are test; ``validation`` of the rest are val."""
    u = split_key(f"{seed}:{row_id}")
    if u < holdout:
        return "test"
    return "val" if u < holdout + validation * (1 - holdout) else "train"


def build_mlp(in_dim: int, hidden: Sequence[int], n_out: int, dropout: float) -> torch.nn.Sequential:
    import torch

    layers: list[torch.nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        width = h
    layers.append(torch.nn.Linear(width, n_out))
    return torch.nn.Sequential(*layers)


@dataclass
class Training:
    """What training did: epochs run, the kept epoch and its validation loss and accuracy."""

    epochs: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    train_accuracy: float
    history: list[dict] = field(default_factory=list)
    class_weights: list[float] | None = None


def balanced_weights(y: np.ndarray, n_out: int) -> np.ndarray:
    """n / (n_out x count) per label; a label absent from ``y`` gets 1 (it is never a target, so it is unused)."""
    counts = np.bincount(y, minlength=n_out).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_out * np.maximum(counts, 1)), 1.0)


def train_mlp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_out: int,
              cfg: RouterConfig, v_train: np.ndarray | None = None,
              v_val: np.ndarray | None = None) -> tuple[torch.nn.Sequential, Training]:
    """Train the MLP (see the module docstring) on labels ``y_*`` or, with ``target: verdicts`` or ``gain``, on the
    (n, models) verdicts ``v_*``; accuracies are against the labels either way. Returns it in eval mode with the best
    validation epoch's weights."""
    import torch

    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"router training needs train and validation rows, got {len(x_train)} and {len(x_val)}")
    by_verdicts = cfg.target in ("verdicts", "gain")
    if by_verdicts and (v_train is None or v_val is None):
        raise ValueError(f"router target `{cfg.target}` needs the training and validation verdicts")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = build_mlp(x_train.shape[1], cfg.hidden, n_out, cfg.dropout)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    weights = balanced_weights(y_train, n_out) if cfg.class_weight == "balanced" else None
    if cfg.target == "gain":  # each model's verdict minus the base's: 0 for the base, -1 / 0 / +1 for a modifier
        loss_fn: torch.nn.Module = torch.nn.MSELoss()
        tt, tv = (torch.from_numpy(np.asarray(v, dtype=np.float32) - np.asarray(v, dtype=np.float32)[:, :1])
                  for v in (v_train, v_val))
    elif by_verdicts:
        loss_fn = torch.nn.BCEWithLogitsLoss()
        tt, tv = (torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in (v_train, v_val))
    else:
        loss_fn = torch.nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights,
                                                                                           dtype=torch.float32))
        tt, tv = torch.from_numpy(y_train).long(), torch.from_numpy(y_val).long()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val).long()
    best = (math.inf, 0, {k: v.clone() for k, v in net.state_dict().items()})
    history: list[dict] = []
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(0, len(xt), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(xt[idx]), tt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(xv), tv))
        history.append({"epoch": epoch, "train_loss": round(total / len(xt), 5), "val_loss": round(val_loss, 5)})
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.clone() for k, v in net.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            break
    net.load_state_dict(best[2])
    net.eval()
    with torch.no_grad():
        val_acc = float((net(xv).argmax(1) == yv).float().mean())
        train_acc = float((net(xt).argmax(1) == yt).float().mean())
    return net, Training(epoch, best[1], best[0], val_acc, train_acc, history,
                         None if weights is None else [round(float(w), 4) for w in weights])


class Router:
    """A trained router: PCA, MLP, label map, costs and the chosen confidence threshold."""

    def __init__(self, net: torch.nn.Sequential, pca: Pca, models: Sequence[str], costs: dict[str, float],
                 window: int, embedder: str, threshold: float | None = None, info: dict | None = None,
                 target: str = "label", cost_weight: float = 0.0):
        self.net, self.pca, self.models, self.target = net.eval(), pca, list(models), target
        self.cost_weight = cost_weight
        self.costs, self.window, self.embedder, self.threshold = dict(costs), window, embedder, threshold
        self.info = dict(info or {})
        self.dim = feature_dim(pca.components.shape[0], len(self.models))

    # ------------------------------------------------------------ inference
    def features(self, embeddings: np.ndarray, confidences: Sequence[float],
                 sessions: Sequence[Sequence[Any]]) -> np.ndarray:
        return build_features(self.pca, np.atleast_2d(embeddings), confidences, sessions, self.models, self.window)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, models) outputs of the MLP for an (n, dim) or (dim,) feature array: a softmax over the models
        (target ``label``), each model's sigmoid, its probability of answering correctly (``verdicts``), or each
        model's expected quality gain over the base (``gain``: the raw outputs, the base's near 0)."""
        import torch

        x = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} columns, the router takes {self.dim}")
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(x))
            if self.target == "gain":
                return logits.numpy()
            return (torch.sigmoid(logits) if self.target == "verdicts" else torch.softmax(logits, dim=1)).numpy()

    def choose(self, probabilities: np.ndarray) -> np.ndarray:
        """The route index per row of (n, models) outputs: argmax of outputs - cost_weight x (cost - base cost)."""
        extra = np.array([self.costs[m] - self.costs[self.models[0]] for m in self.models])
        return (np.atleast_2d(probabilities) - self.cost_weight * extra).argmax(axis=1)

    def route(self, features: np.ndarray) -> tuple[str, np.ndarray]:
        """(the MLP's model, its outputs in label-map order) for one query's features."""
        p = self.probabilities(features)[0]
        return self.models[int(self.choose(p)[0])], p

    def decide(self, features: np.ndarray, threshold: float | None = None) -> tuple[str, np.ndarray]:
        """The thresholded decision: the base when its confidence (the feature after the PCA's) >= the threshold
        (the bundle's unless given), else the MLP's choice."""
        t = self.threshold if threshold is None else threshold
        model, p = self.route(features)
        conf = float(np.asarray(features, dtype=np.float32).reshape(-1)[self.pca.components.shape[0]])
        return (self.models[0], p) if t is not None and conf >= t else (model, p)

    # ------------------------------------------------------------ bundle
    def save(self, path: Path) -> Path:
        import torch
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tensors |= {f"pca.{k}": torch.from_numpy(getattr(self.pca, k)) for k in ("mean", "components", "explained")}
        save_file(tensors, str(path / WEIGHTS))
        dims = self.pca.components.shape[0]
        hidden = [m.out_features for m in self.net if isinstance(m, torch.nn.Linear)][:-1]
        dropout = next((m.p for m in self.net if isinstance(m, torch.nn.Dropout)), 0.0)
        manifest = {"format": FORMAT, "models": self.models, "costs": self.costs, "input_dim": self.dim,
                    "hidden": hidden, "dropout": dropout, "pca_dims": dims, "pca_rank": self.pca.rank,
                    "session_window": self.window, "embedder": self.embedder, "threshold": self.threshold,
                    "target": self.target, "cost_weight": self.cost_weight,
                    "feature_names": feature_names(dims, self.models), **self.info}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> Router:
        from safetensors.torch import load_file

        manifest_path = path / MANIFEST
        if not manifest_path.is_file() or not (path / WEIGHTS).is_file():
            raise ValueError(f"{path}: not a router bundle (needs {MANIFEST} and {WEIGHTS})")
        m = json.loads(manifest_path.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: field 'format': {m.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(str(path / WEIGHTS))
        pca = Pca(tensors["pca.mean"].numpy(), tensors["pca.components"].numpy(), tensors["pca.explained"].numpy())
        net = build_mlp(m["input_dim"], m["hidden"], len(m["models"]), m["dropout"])
        net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")})
        known = {"format", "models", "costs", "input_dim", "hidden", "dropout", "pca_dims", "pca_rank",
                 "session_window", "embedder", "threshold", "feature_names", "target", "cost_weight"}
        return cls(net, pca, m["models"], m["costs"], m["session_window"], m["embedder"], m["threshold"],
                   {k: v for k, v in m.items() if k not in known}, m.get("target", "label"), m.get("cost_weight", 0.0))
