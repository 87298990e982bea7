"""From a metrics reading to `decide()`'s input, as the operator and local mode both do it."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import pytest
from diffcascade_operator.control import decide
from diffcascade_operator.metrics_source import FallbackSource, MetricsReading, MetricsUnavailable
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.snapshot import DemandSample, StageSample
from diffcascade_operator.snapshot_builder import build_snapshot, read_metrics
from test_control import HEAVY, LIGHT, make_spec


def _reading(qps: float, *, at: float) -> MetricsReading:
    stages = {
        LIGHT: StageSample(queue_depth=2.0, arrival_qps=qps),
        HEAVY: StageSample(queue_depth=0.0, arrival_qps=qps / 2),
    }
    return MetricsReading(demand_qps=qps, stages=stages, source="DirectScrape", at=at)


def test_a_reading_finished_after_the_step_began_counts_in_that_steps_demand() -> None:
    spec = make_spec()
    history: deque[DemandSample] = deque()
    # The step began at 100.0; the read took 0.3 s. Stamped 100.3, the sample would lie in
    # the estimator's future and the plan would not see it until the next step.
    snapshot = build_snapshot(
        spec=spec,
        profiles=profiles_from_spec(spec),
        now=100.0,
        history=history,
        reading=_reading(6.0, at=100.3),
        ready_replicas={LIGHT: 1, HEAVY: 1},
    )
    assert list(history) == [DemandSample(at=100.0, qps=6.0)]
    assert snapshot.demand == (DemandSample(at=100.0, qps=6.0),)
    assert snapshot.metrics_available
    assert snapshot.stages[LIGHT].queue_depth == 2.0
    assert decide(snapshot, None).demand_qps == pytest.approx(6.0)


def test_without_a_reading_nothing_is_recorded_and_metrics_are_unavailable() -> None:
    spec = make_spec()
    history = deque([DemandSample(at=90.0, qps=3.0)])
    snapshot = build_snapshot(
        spec=spec,
        profiles=profiles_from_spec(spec),
        now=100.0,
        history=history,
        reading=None,
        ready_replicas={LIGHT: 1, HEAVY: 1},
    )
    assert list(history) == [DemandSample(at=90.0, qps=3.0)]
    assert snapshot.demand == (DemandSample(at=90.0, qps=3.0),)
    assert not snapshot.metrics_available
    assert snapshot.stages == {}


class _Fixed:
    def __init__(self, reading: MetricsReading) -> None:
        self.reading = reading

    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading:
        return self.reading


class _Down:
    def __init__(self, why: str) -> None:
        self.why = why

    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading:
        raise MetricsUnavailable(self.why)


def test_read_metrics_says_why_a_fallback_answered_and_why_nothing_did() -> None:
    reading = _reading(4.0, at=1.0)
    variants = [LIGHT, HEAVY]
    assert read_metrics(_Fixed(reading), cascade="c", variants=variants) == (reading, None)
    fell_back = FallbackSource(_Down("Prometheus refused"), _Fixed(reading))
    assert read_metrics(fell_back, cascade="c", variants=variants) == (
        reading,
        "Prometheus refused",
    )
    neither = FallbackSource(_Down("Prometheus refused"), _Down("no worker answered"))
    assert read_metrics(neither, cascade="c", variants=variants) == (
        None,
        "Prometheus refused; fallback: no worker answered",
    )
