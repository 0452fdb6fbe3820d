"""How the gateway picks the model of a ``cogumi-auto`` request (pure decisions; the gateway does the I/O).

- Confidence: the base answers first; its raw confidence is ``exp(mean log p)`` of the tokens it generated (the
  same quantity Phase 2's calibrator was fitted on, there teacher-forced), passed through the release's calibrator.
  At or above the release's threshold the base answer stands (reason ``confident``).
- Otherwise the router (Phase 4's MLP) reads the query's MiniLM embedding, the calibrated confidence and the
  session's last turns, and its most probable model answers (reason ``router``; when that is the base, the answer
  already generated is reused).
- On a follow-up turn (the session has a previous turn) the escalation detector reads the user's message first;
  when it detects dissatisfaction the base pass is skipped and the router's most probable non-base model answers,
  or the next one by probability when that model gave the previous answer (reason ``escalation``). The router
  then sees confidence 0: the previous answer was just rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cogumi_tasks.serve.release import Release

REASONS = ("confident", "router", "override", "escalation")


@dataclass
class Decision:
    route: str
    reason: str
    confidence: float | None = None  # calibrated
    raw_confidence: float | None = None
    escalated_from: str | None = None
    probabilities: dict[str, float] | None = None
    base_answer: str | None = None  # the base's answer when it was generated but another model answers


def raw_confidence(logprobs: Sequence[float]) -> float | None:
    """exp(mean log p) of the generated tokens; None for an empty answer."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else None


class Brain:
    """The release's router, escalation detector and calibrator, and the query embedder."""

    def __init__(self, release: Release, embedder: Any = None, threshold: float | None = None) -> None:
        from cogumi_tasks.routing.escalation import EscalationDetector
        from cogumi_tasks.routing.router import Router

        self.router = Router.load(release.router_dir)
        self.detector = EscalationDetector(release.escalation_dir)
        self.calibrator = release.calibrator()
        self.threshold = release.threshold if threshold is None else threshold
        unknown = sorted(set(self.router.models) - set(release.models))
        if unknown:
            raise ValueError(f"release {release.id}: the router routes to {unknown}, which the release lacks")
        self._embedder = embedder

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from cogumi_tasks.train.failures import load_embedder

            self._embedder = load_embedder(self.router.embedder)
        return self._embedder

    def calibrate(self, raw: float | None) -> float | None:
        return None if raw is None else float(self.calibrator(np.array([raw]))[0])

    def confident(self, calibrated: float | None) -> bool:
        return calibrated is not None and self.threshold is not None and calibrated >= self.threshold

    def probabilities(self, query: str, confidence: float | None, turns: Sequence[Any]) -> dict[str, float]:
        """The router's probability per model for this query, confidence (None: 0) and session turns."""
        from cogumi_tasks.routing.features import embed_queries

        emb = embed_queries(self.embedder, [query])
        known = [t for t in turns if t.route in self.router.models][-self.router.window:]
        x = self.router.features(emb, [confidence or 0.0], [known])
        p = self.router.probabilities(x)[0]
        return {m: float(v) for m, v in zip(self.router.models, p, strict=True)}

    def escalates(self, text: str) -> bool:
        return self.detector.escalate(text)

    def after_base(self, query: str, raw: float | None, turns: Sequence[Any]) -> Decision:
        """The decision once the base has answered (confidence from its tokens)."""
        cal = self.calibrate(raw)
        if self.confident(cal):
            return Decision("base", "confident", cal, raw)
        probs = self.probabilities(query, cal, turns)
        choice = self.router.models[int(self.router.choose(np.array([list(probs.values())]))[0])]
        return Decision(choice, "router", cal, raw, probabilities=probs)

    def escalation(self, query: str, turns: Sequence[Any]) -> Decision:
        """The stronger choice after a detected dissatisfaction with the previous turn (``turns[-1]``)."""
        probs = self.probabilities(query, 0.0, turns)
        ranked = sorted((m for m in self.router.models if m != "base"), key=lambda m: (-probs[m],
                                                                                     self.router.models.index(m)))
        last = turns[-1].route
        target = ranked[1] if ranked[0] == last and len(ranked) > 1 else ranked[0]
        return Decision(target, "escalation", None, None, escalated_from=last, probabilities=probs)
