"""Prometheus metrics of one worker, built from the names in `protocol`.

Each app gets its own `CollectorRegistry`, so several workers (or tests) in one process do not
collide. Every series carries the `cascade` and `variant` labels; completions add `outcome`,
and all outcomes are created at zero so `rate()` works before the first event of each kind.

Counting unit: one query is one image. A request for `n` images counts as `n` arrivals and
`n` completions, because the allocator plans capacity in images per second.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from diffcascade_worker import protocol
from diffcascade_worker.protocol import MetricName, Outcome

CONTENT_TYPE_LATEST: str = _CONTENT_TYPE

# `*_created` series double the scrape size and nothing in the control plane reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_CONFIDENCE_BUCKETS = protocol.GATE_CONFIDENCE_BUCKETS

_BUCKETS: dict[str, tuple[float, ...]] = {
    protocol.LATENCY_SECONDS.name: _LATENCY_BUCKETS,
    protocol.QUEUE_SECONDS.name: _LATENCY_BUCKETS,
    protocol.BATCH_SECONDS.name: _LATENCY_BUCKETS,
    protocol.BATCH_SIZE.name: _BATCH_SIZE_BUCKETS,
    protocol.GATE_CONFIDENCE.name: _CONFIDENCE_BUCKETS,
}


def _build(metric: MetricName, registry: CollectorRegistry) -> Any:
    # prometheus_client appends `_total` itself; `MetricName.name` is the base name.
    if metric.kind == "counter":
        return Counter(metric.name, metric.help, metric.labels, registry=registry)
    if metric.kind == "gauge":
        return Gauge(metric.name, metric.help, metric.labels, registry=registry)
    return Histogram(
        metric.name,
        metric.help,
        metric.labels,
        registry=registry,
        buckets=_BUCKETS.get(metric.name, _LATENCY_BUCKETS),
    )


class WorkerMetrics:
    """The worker's series, already bound to its cascade and variant labels."""

    def __init__(self, *, cascade: str, variant: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        built = {m.name: _build(m, self.registry) for m in protocol.ALL_METRICS}
        base = {protocol.LABEL_CASCADE: cascade, protocol.LABEL_VARIANT: variant}

        def bound(metric: MetricName) -> Any:
            return built[metric.name].labels(**base)

        self.arrivals = bound(protocol.ARRIVALS)
        self._completions = {
            outcome: built[protocol.COMPLETIONS.name].labels(
                **base, **{protocol.LABEL_OUTCOME: outcome.value}
            )
            for outcome in Outcome
        }
        self.latency = bound(protocol.LATENCY_SECONDS)
        self.queue_wait = bound(protocol.QUEUE_SECONDS)
        self._batch_latency = built[protocol.BATCH_SECONDS.name]
        self._base = base
        self.queue_depth = bound(protocol.QUEUE_DEPTH)
        self.inflight = bound(protocol.INFLIGHT)
        self.batch_size = bound(protocol.BATCH_SIZE)
        self.gate_confidence = bound(protocol.GATE_CONFIDENCE)
        self.threshold = bound(protocol.THRESHOLD)
        self.configured_batch_size = bound(protocol.CONFIGURED_BATCH_SIZE)
        self.ready = bound(protocol.READY)

    def batch_latency(self, batch_size: int) -> Any:
        """The batch-latency histogram of one executed batch size (live latency by size)."""
        return self._batch_latency.labels(
            **self._base, **{protocol.LABEL_BATCH_SIZE: str(batch_size)}
        )

    def completed(self, outcome: Outcome, count: int = 1) -> None:
        if count > 0:
            self._completions[outcome].inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
