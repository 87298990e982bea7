"""Prometheus series of one router, built from the names in `protocol`.

Two routers export them: the router service (`diffcascade-worker route`) and the entry URL of
`diffcascade up` (`local.pre_route`), so every driver reads a cascade's arrivals from the same
`ROUTER_ROUTED` counter.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffcascade_worker import protocol
from diffcascade_worker.protocol import MetricName, RouterConfig
from diffcascade_worker.routing.router import PreGenerationRouter
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
        self._labels_reported = 0

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

    def publish(self, config: RouterConfig | None, *, ready: bool) -> None:
        """The config in force (router share, exploration) and readiness."""
        self.share.set(config.router_share if config else 0.0)
        self.exploration.set(config.exploration_share if config else 0.0)
        self.ready.set(1.0 if ready else 0.0)

    def refresh(self, router: PreGenerationRouter | None) -> None:
        """Routed share and the scorer's prequential record, at scrape time."""
        self.routed_share.set(router.routed_share() if router else 0.0)
        scorer = router.scorer if router else None
        if scorer is None:
            return
        record = scorer.metrics
        self.quality(
            new_labels=record.labels - self._labels_reported, auc=record.auc(), brier=record.brier()
        )
        self._labels_reported = record.labels

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
