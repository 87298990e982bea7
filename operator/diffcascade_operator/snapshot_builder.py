"""From a metrics source to the input of `decide()`: one rule for the operator and local mode.

Each loop keeps its own demand history (the operator bounds it by count and seeds it from the
status after a restart; the one-machine mode bounds it by age), but both read the source,
record the demand and build the `Snapshot` the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import dataclass

from diffcascade_operator.live_profiles import (
    LiveObservations,
    LiveProfileResult,
    LiveProfileSettings,
    live_profiles,
)
from diffcascade_operator.metrics_source import MetricsReading, MetricsSource, MetricsUnavailable
from diffcascade_operator.plan import Plan
from diffcascade_operator.profiles import CascadeProfiles
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.snapshot import MAX_QPS, MAX_QUEUE_DEPTH, DemandSample, Snapshot
from diffcascade_operator.spec import CascadeSpec

#: Demand samples a control loop keeps (one per tick): the operator's default, the simulator's.
DEMAND_HISTORY = 120


def read_metrics(
    source: MetricsSource, *, cascade: str, variants: Sequence[str], namespace: str | None = None
) -> tuple[MetricsReading | None, str | None]:
    """(reading, note): without a reading the note says why; with one, why a `FallbackSource`
    passed over its primary source (None when it did not). A reading no worker could have
    produced is refused here, so it never enters a demand history."""
    try:
        reading = source.read(cascade=cascade, variants=variants, namespace=namespace)
    except MetricsUnavailable as exc:
        return None, str(exc)
    problem = implausible(reading)
    if problem is not None:
        return None, f"{reading.source} reading refused: {problem}"
    return reading, getattr(source, "last_error", None)


def implausible(reading: MetricsReading) -> str | None:
    """What makes a reading unusable (not finite, negative, beyond `MAX_QPS` or
    `MAX_QUEUE_DEPTH`), or None."""

    def bad(value: float, limit: float) -> bool:
        return not 0.0 <= value <= limit  # NaN fails both comparisons

    if bad(reading.demand_qps, MAX_QPS):
        return f"demand of {reading.demand_qps:g} qps (plausible: 0 to {MAX_QPS:g})"
    for what, total in (
        ("cascade arrival rate", reading.cascade_qps),
        ("cascade arrival rate over the interval", reading.cascade_window_qps),
    ):
        if total is not None and bad(total, MAX_QPS):
            return f"{what} of {total:g} qps (plausible: 0 to {MAX_QPS:g})"
    for name, qps in sorted((reading.window_qps or {}).items()):
        if bad(qps, MAX_QPS):
            return f"{name}: arrival rate over the interval of {qps:g} qps (plausible: 0 to " + (
                f"{MAX_QPS:g})"
            )
    for name, stage in sorted(reading.stages.items()):
        if bad(stage.arrival_qps, MAX_QPS):
            return (
                f"{name}: arrival rate of {stage.arrival_qps:g} qps (plausible: 0 to {MAX_QPS:g})"
            )
        for what, value in (("queue depth", stage.queue_depth), ("in flight", stage.inflight)):
            if bad(value, MAX_QUEUE_DEPTH):
                return f"{name}: {what} of {value:g} (plausible: 0 to {MAX_QUEUE_DEPTH:g})"
    return None


def build_snapshot(
    *,
    spec: CascadeSpec,
    profiles: CascadeProfiles,
    now: float,
    history: MutableSequence[DemandSample],
    reading: MetricsReading | None,
    ready_replicas: Mapping[str, int],
    dispatch: Dispatch = Dispatch.LEAST_LOADED,
    entry: str | None = None,
) -> Snapshot:
    """Record the reading's demand in `history`, then the snapshot of this instant.

    The sample is stamped `now`, the snapshot's own clock: the demand estimator ignores samples
    later than `now`, so a reading's own (later) time would hide it until the next step. Without
    a reading there are no stage numbers and `metrics_available` is False: `decide()` holds.
    """
    if reading is not None:
        history.append(demand_sample(reading, at=now, entry=entry))
    return Snapshot(
        spec=spec,
        profiles=profiles,
        now=now,
        demand=tuple(history),
        stages=reading.stages if reading is not None else {},
        ready_replicas=ready_replicas,
        metrics_available=reading is not None,
        dispatch=dispatch,
    )


def demand_sample(reading: MetricsReading, *, at: float, entry: str | None) -> DemandSample:
    """The cascade's demand in one reading: its router's count of every arrival when the
    source has one, else the arrivals at `entry` (the stage the plan in force sends clients
    to; the first variant when None), whose other prompts skip it only when routed. The
    sample's rate counts every arrival over the control interval where the source has that
    rate; its instant rate (the last scrape) drives the step rule (`demand.py`)."""
    if reading.cascade_qps is not None:
        instant = reading.cascade_qps
        window = reading.cascade_window_qps
    else:
        stage = reading.stages.get(entry) if entry is not None else None
        instant = stage.arrival_qps if stage is not None else reading.demand_qps
        name = entry if stage is not None else next(iter(reading.stages), None)
        window = (reading.window_qps or {}).get(name) if name is not None else None
    if window is None:
        return DemandSample(at=at, qps=instant, instant_qps=instant)
    return DemandSample(at=at, qps=window, instant_qps=instant, span_s=reading.window_s)


# --- live profiles (issue 9) -------------------------------------------------------------------
# The snapshot carries the profiles to plan with: the offline ones blended with what the
# workers' histograms say over the sliding window (rules in `live_profiles`). Both loops call
# this before `build_snapshot` and pass `result.profiles` as its `profiles`.


def plan_thresholds(plan: Plan | None) -> dict[str, float]:
    """The threshold in force per gated variant (where the live summary reports f)."""
    if plan is None:
        return {}
    return {a.name: a.threshold for a in plan.variants if a.threshold is not None}


@dataclass
class LiveCache:
    """The last histogram read of one cascade's loop, reused until `read_every_s` passed."""

    observed: LiveObservations | None = None
    note: str | None = None
    at: float = -math.inf

    def due(self, now: float, settings: LiveProfileSettings) -> bool:
        return now - self.at >= settings.read_every_s - 1e-9


def read_live_profiles(
    source: object | None,
    *,
    profiles: CascadeProfiles,
    cascade: str,
    variants: Sequence[str],
    plan: Plan | None,
    settings: LiveProfileSettings,
    namespace: str | None = None,
    cache: LiveCache | None = None,
    now: float = 0.0,
) -> tuple[LiveProfileResult, str | None]:
    """(blended profiles and their summary, note): the note says why nothing was observed.

    With a `cache`, the histograms are read at most every `settings.read_every_s` (the same
    rule the simulator applies); in between the last read is blended again with the
    thresholds now in force."""
    observed: LiveObservations | None = None
    note: str | None = None
    read = getattr(source, "read_live", None)
    if read is None:
        note = "no metrics source with histograms"
    elif cache is not None and not cache.due(now, settings):
        observed, note = cache.observed, cache.note
    else:
        try:
            observed = read(
                cascade=cascade, variants=variants, window_s=settings.window_s, namespace=namespace
            )
        except MetricsUnavailable as exc:
            note = str(exc)
        if cache is not None:
            cache.observed, cache.note, cache.at = observed, note, now
    result = live_profiles(profiles, observed, thresholds=plan_thresholds(plan), settings=settings)
    return result, note
