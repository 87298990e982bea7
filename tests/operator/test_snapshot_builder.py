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
from diffcascade_operator.spec import CascadeSpec, parse_spec
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
    assert list(history) == [DemandSample(at=100.0, qps=6.0, instant_qps=6.0)]
    assert snapshot.demand == (DemandSample(at=100.0, qps=6.0, instant_qps=6.0),)
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


def test_live_histograms_are_read_at_most_every_read_every_s_and_reblended_between() -> None:
    from diffcascade_operator.live_profiles import LiveObservations, LiveProfileSettings
    from diffcascade_operator.profiles import profiles_from_spec
    from diffcascade_operator.snapshot_builder import LiveCache, read_live_profiles

    class Counting:
        reads = 0

        def read_live(self, **_: object) -> LiveObservations:
            Counting.reads += 1
            return LiveObservations(variants={}, window_s=120.0, source="Prometheus", at=0.0)

    spec = _spec_for_live()
    profiles = profiles_from_spec(spec)
    settings = LiveProfileSettings()  # 120-s window: a read every 15 s
    cache = LiveCache()
    for now in (0.0, 5.0, 10.0, 15.0, 20.0, 30.0):
        result, _ = read_live_profiles(
            Counting(),
            profiles=profiles,
            cascade="c",
            variants=[v.name for v in spec.variants],
            plan=None,
            settings=settings,
            cache=cache,
            now=now,
        )
        assert result.source == "Prometheus"  # between reads the last one is used
    assert Counting.reads == 3  # at 0, 15 and 30 s
    assert LiveProfileSettings(window_s=20.0).read_every_s == 5.0


def _spec_for_live() -> CascadeSpec:

    curve = {"thresholds": [0, 1], "deferFractions": [0, 1]}
    return parse_spec(
        {
            "sloSeconds": 5,
            "gpuBudget": 2,
            "simulatorOnly": True,  # a curve and no gate: the planner alone reads it
            "variants": [
                {
                    "name": "l",
                    "model": "l",
                    "profile": {"batchLatencyMs": {"1": 10}},
                    "gate": {"deferCurve": curve},
                },
                {"name": "h", "model": "h", "profile": {"batchLatencyMs": {"1": 100}}},
            ],
        }
    )


class _Answering:
    """A source that answers one fixed reading."""

    def __init__(self, reading: MetricsReading) -> None:
        self.reading = reading

    def read(self, **_: object) -> MetricsReading:
        return self.reading


@pytest.mark.parametrize(
    ("qps", "light_queue", "says"),
    [
        (1e25, 2.0, "demand of 1e+25 qps"),
        (float("nan"), 2.0, "demand of nan qps"),
        (-3.0, 2.0, "demand of -3 qps"),
        (6.0, float("nan"), "queue depth of nan"),
        (6.0, 1e12, "queue depth of 1e+12"),
    ],
)
def test_a_reading_no_worker_could_produce_is_refused_and_never_recorded(
    qps: float, light_queue: float, says: str
) -> None:
    reading = _reading(qps, at=100.0)
    reading.stages[LIGHT] = StageSample(queue_depth=light_queue, arrival_qps=6.0)
    got, note = read_metrics(_Answering(reading), cascade="c", variants=[LIGHT, HEAVY])
    assert got is None
    assert note is not None and note.startswith("DirectScrape reading refused: ") and says in note
    spec = make_spec()
    history: deque[DemandSample] = deque()
    snapshot = build_snapshot(
        spec=spec,
        profiles=profiles_from_spec(spec),
        now=100.0,
        history=history,
        reading=got,
        ready_replicas={},
    )
    assert not history and not snapshot.metrics_available


def test_demand_counts_every_arrival_of_the_interval_and_keeps_the_scrapes_rate_for_steps() -> None:
    from dataclasses import replace

    from diffcascade_operator.snapshot_builder import demand_sample

    base = _reading(6.0, at=100.0)
    windowed = replace(base, window_qps={LIGHT: 4.5, HEAVY: 1.0})
    assert demand_sample(windowed, at=100.0, entry=None) == DemandSample(100.0, 4.5, 6.0)
    # a plan entering at the heavy stage: its arrivals are the demand (nothing routed)
    assert demand_sample(windowed, at=100.0, entry=HEAVY).qps == 1.0
    # the router's counter sees every arrival, whatever the entry stage
    routed = replace(windowed, cascade_qps=9.0, cascade_window_qps=8.0)
    assert demand_sample(routed, at=100.0, entry=HEAVY) == DemandSample(100.0, 8.0, 9.0)


def test_an_instant_step_is_planned_for_though_the_interval_rate_lags() -> None:
    from diffcascade_operator.demand import estimate_demand

    flat = [DemandSample(float(t), 2.0, 2.0) for t in range(0, 20, 5)]
    # a step to 10 qps one second before the step: 2 of the interval's 5 s were at 10 qps
    stepped = [*flat, DemandSample(20.0, (3 * 2.0 + 2 * 10.0) / 5, 10.0)]
    estimate = estimate_demand(stepped, now=20.0, alpha=0.3, headroom=1.0, trend_horizon_s=0.0)
    assert estimate.step and estimate.qps == pytest.approx(10.0)
    calm = estimate_demand(
        [*flat, DemandSample(20.0, 2.2, 2.4)], now=20.0, alpha=0.3, headroom=1.0, trend_horizon_s=0
    )
    assert not calm.step and calm.qps == pytest.approx(0.3 * 2.2 + 0.7 * 2.0)
