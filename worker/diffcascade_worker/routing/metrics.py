"""Prometheus series of one router process, built from the names in `protocol`."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffcascade_worker import protocol
from diffcascade_worker.protocol import MetricName
from diffcascade_worker.routing.rule import Target

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip


def _build(metric: MetricName, registry: CollectorRegistry) -> Any:
    if metric.kind == "counter":
        return Counter(metric.name, metric.help, metric.labels, registry=registry)
    if metric.kind == "gauge":
        return Gauge(metric.name, metric.help, metric.labels, registry=registry)
    return Histogram(
        metric.name, metric.help, metric.labels, registry=registry, buckets=_LATENCY_BUCKETS
    )


class RouterMetrics:
    def __init__(self, *, cascade: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        built = {m.name: _build(m, self.registry) for m in protocol.ROUTER_METRICS}
        base = {protocol.LABEL_CASCADE: cascade}
        self._routed = {
            (target, explored): built[protocol.ROUTER_ROUTED.name].labels(
                **base,
                **{
                    protocol.LABEL_TARGET: target.value,
                    protocol.LABEL_EXPLORED: str(explored).lower(),
                },
            )
            for target in Target
            for explored in (False, True)
            if not (target is Target.HEAVY and explored)
        }
        self._refused = built[protocol.ROUTER_REFUSED.name]
        self._latency = {
            target: built[protocol.ROUTER_LATENCY_SECONDS.name].labels(
                **base, **{protocol.LABEL_TARGET: target.value}
            )
            for target in Target
        }
        self._base = base
        self.labels = built[protocol.ROUTER_LABELS.name].labels(**base)
        self.auc = built[protocol.ROUTER_AUC.name].labels(**base)
        self.brier = built[protocol.ROUTER_BRIER.name].labels(**base)
        self.share = built[protocol.ROUTER_SHARE.name].labels(**base)
        self.routed_share = built[protocol.ROUTER_ROUTED_SHARE.name].labels(**base)
        self.exploration = built[protocol.ROUTER_EXPLORATION_SHARE.name].labels(**base)
        self.inflight = built[protocol.ROUTER_INFLIGHT.name].labels(**base)
        self.ready = built[protocol.ROUTER_READY.name].labels(**base)

    def routed(self, target: Target, *, explored: bool, images: int) -> None:
        self._routed[(target, explored)].inc(images)

    def refused(self, outcome: str) -> None:
        self._refused.labels(**self._base, **{protocol.LABEL_OUTCOME: outcome}).inc()

    def latency(self, target: Target, seconds: float) -> None:
        self._latency[target].observe(seconds)

    def quality(self, *, new_labels: int, auc: float, brier: float) -> None:
        """Labels trained on since the last call; AUC and Brier (NaN until defined)."""
        if new_labels > 0:
            self.labels.inc(new_labels)
        self.auc.set(auc)
        self.brier.set(brier)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
