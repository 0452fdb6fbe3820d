"""The gateway's Prometheus metrics (names and labels: /work/notes' serve contract, mirrored in docs/phase5.md).

Each :class:`Metrics` owns its registry, so several gateways (tests) in one process never share counters.
Routes are ``base`` or a modifier; requests refused before a route was chosen carry route ``none``.
"""

from __future__ import annotations

from typing import Any

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 100.0, 200.0, 500.0)
ERROR_KINDS = ("auth", "limit", "rate", "bad_request", "engine", "internal")
NO_ROUTE = "none"


class Metrics:
    """The series of the contract, registered on a fresh registry."""

    def __init__(self, release: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("cogumi_requests", "Chat requests answered or refused", ["model", "route", "status"],
                                registry=r)
        self.request_seconds = Histogram("cogumi_request_seconds", "Whole request time", ["route"],
                                         buckets=SECONDS_BUCKETS, registry=r)
        self.ttft = Histogram("cogumi_ttft_seconds", "Time to the first content token", ["route"],
                              buckets=SECONDS_BUCKETS, registry=r)
        self.completion_tokens = Counter("cogumi_completion_tokens", "Generated tokens of the answers", ["route"],
                                         registry=r)
        self.decode_tps = Histogram("cogumi_decode_tokens_per_second", "Answer tokens per second after the first",
                                    ["route"], buckets=TPS_BUCKETS, registry=r)
        self.routes = Counter("cogumi_routes", "Routing decisions", ["route", "reason"], registry=r)
        self.escalations = Counter("cogumi_escalations", "Follow-ups re-routed after detected dissatisfaction",
                                   ["from_route", "to_route"], registry=r)
        self.cost = Counter("cogumi_cost_usd", "Estimated generation cost", ["route"], registry=r)
        self.errors = Counter("cogumi_errors", "Refused or failed requests by kind", ["kind"], registry=r)
        self.feedback = Counter("cogumi_feedback", "Thumbs up/down on answers", ["route", "value"], registry=r)
        self.release = Gauge("cogumi_release_info", "The release being served", ["release"], registry=r)
        self.release.labels(release=release).set(1)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)

    def set_release(self, release: str) -> None:
        """The gauge names only ``release`` from now on (a calibration release was swapped in)."""
        self.release.clear()
        self.release.labels(release=release).set(1)

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type) for GET /metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def answered(self, model: str, route: str, status: int, *, seconds: float, ttft: float | None, tokens: int,
                 decode_s: float | None, cost_usd: float) -> None:
        """One answered request."""
        self.requests.labels(model=model, route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)
        if ttft is not None:
            self.ttft.labels(route=route).observe(ttft)
        self.completion_tokens.labels(route=route).inc(tokens)
        if decode_s and tokens > 1:
            self.decode_tps.labels(route=route).observe((tokens - 1) / decode_s)
        self.cost.labels(route=route).inc(cost_usd)

    def refused(self, model: str, status: int, kind: str, route: str = NO_ROUTE) -> None:
        """One refused or failed request."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind {kind!r}: one of {ERROR_KINDS}")
        self.requests.labels(model=model, route=route, status=str(status)).inc()
        self.errors.labels(kind=kind).inc()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> Any:
        """A sample's value, or None (tests)."""
        return self.registry.get_sample_value(name, labels or {})
