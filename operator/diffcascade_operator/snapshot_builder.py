"""From a metrics source to the input of `decide()`: one rule for the operator and local mode.

Each loop keeps its own demand history (the operator bounds it by count and seeds it from the
status after a restart; the one-machine mode bounds it by age), but both read the source,
record the demand and build the `Snapshot` the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableSequence, Sequence

from diffcascade_operator.metrics_source import MetricsReading, MetricsSource, MetricsUnavailable
from diffcascade_operator.profiles import CascadeProfiles
from diffcascade_operator.snapshot import DemandSample, Snapshot
from diffcascade_operator.spec import CascadeSpec


def read_metrics(
    source: MetricsSource, *, cascade: str, variants: Sequence[str], namespace: str | None = None
) -> tuple[MetricsReading | None, str | None]:
    """(reading, note): without a reading the note says why; with one, why a `FallbackSource`
    passed over its primary source (None when it did not)."""
    try:
        reading = source.read(cascade=cascade, variants=variants, namespace=namespace)
    except MetricsUnavailable as exc:
        return None, str(exc)
    return reading, getattr(source, "last_error", None)


def build_snapshot(
    *,
    spec: CascadeSpec,
    profiles: CascadeProfiles,
    now: float,
    history: MutableSequence[DemandSample],
    reading: MetricsReading | None,
    ready_replicas: Mapping[str, int],
) -> Snapshot:
    """Record the reading's demand in `history`, then the snapshot of this instant.

    The sample is stamped `now`, the snapshot's own clock: the demand estimator ignores samples
    later than `now`, so a reading's own (later) time would hide it until the next step. Without
    a reading there are no stage numbers and `metrics_available` is False: `decide()` holds.
    """
    if reading is not None:
        history.append(DemandSample(at=now, qps=reading.demand_qps))
    return Snapshot(
        spec=spec,
        profiles=profiles,
        now=now,
        demand=tuple(history),
        stages=reading.stages if reading is not None else {},
        ready_replicas=ready_replicas,
        metrics_available=reading is not None,
    )
