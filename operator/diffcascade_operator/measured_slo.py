"""What the cascade really met: the entry stage's latency histogram and outcomes over a window.

A plan predicts a latency; the workers measure one. Every request enters at the first stage,
whose `diffcascade_request_latency_seconds` histogram holds each answered image's end-to-end
time there (a deferral's wait for the next stage included) and whose
`diffcascade_completed_requests_total` counts every image by outcome. Over a sliding window:

    requests   = answered (served, deferred, degraded) + dropped + rejected + failed
    late       = answered images slower than the SLO (linear inside the bucket holding it,
                 Prometheus' histogram_quantile rule; exact when the SLO is a bucket bound)
    violations = late + dropped + rejected + failed     (abandoned: the client left; not counted)

and p50/p99 latency. The plan promises every request within the SLO when it was solved and
its predicted latency fits (0 violations); a best-effort (Infeasible) plan promises nothing.
`SLOMet` is False when the measured violation ratio exceeds the promise by more than the
tolerance, with enough requests in the window to say so. Pure: the reading is
`metrics_source`'s, the status documents `kube.status`'s.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from diffcascade_worker.protocol import Outcome

from diffcascade_operator.live_profiles import ConfidenceHistogram, histogram_from_buckets
from diffcascade_operator.plan import Plan, SolverStatus

#: Outcomes that answered with an image (their latency is in the histogram).
ANSWERED = (Outcome.SERVED, Outcome.DEFERRED, Outcome.DEGRADED)
#: Outcomes that are violations by themselves: no image within the deadline.
REFUSED = (Outcome.DROPPED, Outcome.REJECTED, Outcome.FAILED)

Verdict = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class EntryTotals:
    """The entry stage's latency buckets and outcome counts: cumulative or over a window."""

    latency: ConfidenceHistogram | None = None  # cumulative `le` buckets (any histogram)
    outcomes: Mapping[str, float] = field(default_factory=dict)

    def __add__(self, other: EntryTotals) -> EntryTotals:
        latency = self.latency
        if other.latency is not None:
            latency = other.latency if latency is None else latency + other.latency
        keys = {*self.outcomes, *other.outcomes}
        return EntryTotals(
            latency=latency,
            outcomes={k: self.outcomes.get(k, 0.0) + other.outcomes.get(k, 0.0) for k in keys},
        )

    def minus(self, earlier: EntryTotals) -> EntryTotals:
        """The increase since `earlier`; all of self when a counter went back (a restart)."""
        went_back = any(v < earlier.outcomes.get(k, 0.0) for k, v in self.outcomes.items())
        if went_back:
            return self
        latency = self.latency
        if latency is not None and earlier.latency is not None:
            latency = latency.minus(earlier.latency)
        return EntryTotals(
            latency=latency,
            outcomes={k: v - earlier.outcomes.get(k, 0.0) for k, v in self.outcomes.items()},
        )


@dataclass(frozen=True)
class SloObservations:
    """What a metrics source saw at the entry stage over one window."""

    totals: EntryTotals
    window_s: float
    source: str  # "Prometheus", "DirectScrape"
    at: float


def entry_totals(buckets: Mapping[float, float], outcomes: Mapping[str, float]) -> EntryTotals:
    """From {le: count} and {outcome: count} (PromQL rows or a /metrics page)."""
    return EntryTotals(
        latency=histogram_from_buckets(buckets) if buckets else None,
        outcomes={k: max(0.0, v) for k, v in outcomes.items() if math.isfinite(v)},
    )


class SloWindow:
    """Cumulative totals of many workers -> their summed increase over a sliding window.

    One window per worker key (the direct-scrape fallback's worker URLs), so a worker that
    restarts or goes away does not look like a reset of the whole stage. A worker's first
    reading only sets its baseline.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._readings: dict[str, deque[tuple[float, EntryTotals]]] = {}

    def observe(self, *, now: float, totals: Mapping[str, EntryTotals | None]) -> EntryTotals:
        summed = EntryTotals()
        for key, reading in totals.items():
            kept = self._readings.setdefault(key, deque())
            if reading is not None:
                kept.append((now, reading))
                while len(kept) > 1 and kept[1][0] <= now - self.window_s:
                    kept.popleft()
            if len(kept) > 1:
                summed = summed + kept[-1][1].minus(kept[0][1])
        for gone in [k for k in self._readings if k not in totals]:
            del self._readings[gone]
        return summed


# --- the numbers -------------------------------------------------------------------------------


def count_above(histogram: ConfidenceHistogram, x: float) -> float:
    """Observations above `x`, linear inside the bucket holding it (beyond the last finite
    bound: everything there counts as above)."""
    below = 0.0
    lower, lower_count = 0.0, 0.0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=True):
        if x < bound:
            if math.isinf(bound):
                below = lower_count
            else:
                width = bound - lower
                share = (x - lower) / width if width > 0 else 1.0
                below = lower_count + (count - lower_count) * max(0.0, share)
            break
        lower, lower_count = bound, count
    else:
        below = histogram.samples
    return max(0.0, histogram.samples - below)


def histogram_quantile(histogram: ConfidenceHistogram, q: float) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket; the last finite bound when
    the rank falls in +Inf; None without observations."""
    total = histogram.samples
    if total <= 0:
        return None
    rank = q * total
    lower, lower_count = 0.0, 0.0
    finite = [b for b in histogram.bounds if not math.isinf(b)]
    for bound, count in zip(histogram.bounds, histogram.counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return finite[-1] if finite else None
            in_bucket = count - lower_count
            if in_bucket <= 0:
                return bound
            return lower + (bound - lower) * (rank - lower_count) / in_bucket
        lower, lower_count = bound, count
    return finite[-1] if finite else None


@dataclass(frozen=True)
class MeasuredSlo:
    slo_s: float
    window_s: float
    source: str
    answered: float
    late: float
    dropped: float
    rejected: float
    failed: float
    p50_s: float | None
    p99_s: float | None

    @property
    def requests(self) -> float:
        return self.answered + self.dropped + self.rejected + self.failed

    @property
    def violations(self) -> float:
        return self.late + self.dropped + self.rejected + self.failed

    @property
    def violation_ratio(self) -> float | None:
        return self.violations / self.requests if self.requests > 0 else None


def measure(observed: SloObservations, *, slo_s: float) -> MeasuredSlo:
    """The SLO attainment the entry stage measured over the window."""
    totals = observed.totals
    outcomes = totals.outcomes
    hist = totals.latency
    answered = sum(outcomes.get(o.value, 0.0) for o in ANSWERED)
    if hist is not None and hist.samples > 0:
        # The histogram and the counters are read at slightly different instants: scale the
        # late share onto the answered count.
        late = count_above(hist, slo_s) * (answered / hist.samples if answered else 1.0)
        p50, p99 = histogram_quantile(hist, 0.5), histogram_quantile(hist, 0.99)
    else:
        late, p50, p99 = 0.0, None, None
    return MeasuredSlo(
        slo_s=slo_s,
        window_s=observed.window_s,
        source=observed.source,
        answered=answered,
        late=min(late, answered) if answered else late,
        dropped=outcomes.get(Outcome.DROPPED.value, 0.0),
        rejected=outcomes.get(Outcome.REJECTED.value, 0.0),
        failed=outcomes.get(Outcome.FAILED.value, 0.0),
        p50_s=p50,
        p99_s=p99,
    )


# --- the verdict -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SloSettings:
    window_s: float = 60.0  # sliding window of the measurement
    tolerance: float = 0.01  # violation ratio allowed above what the plan promised
    min_requests: int = 20  # fewer in the window: not judged (Unknown)
    refresh_s: float = 15.0  # seconds between reads in the operator (a quarter window at most)

    @property
    def read_every_s(self) -> float:
        return min(self.refresh_s, self.window_s / 4)

    def __post_init__(self) -> None:
        if not self.window_s > 0 or not 0 <= self.tolerance <= 1 or self.min_requests < 1:
            raise ValueError(
                "the SLO measurement needs window_s > 0, 0 <= tolerance <= 1 and "
                f"min_requests >= 1, got {self.window_s}, {self.tolerance}, {self.min_requests}"
            )


def promised_violation_ratio(plan: Plan | None, *, slo_s: float) -> float | None:
    """0 when the plan was solved and predicts a latency within the SLO; None otherwise (a
    best-effort plan, or none yet, promises nothing)."""
    if plan is None or plan.solver.status is SolverStatus.INFEASIBLE:
        return None
    return 0.0 if plan.predicted_latency_s <= slo_s + 1e-9 else None


@dataclass(frozen=True)
class SloVerdict:
    status: Verdict
    reason: str  # Met, Missed, NotEnoughRequests, NoMeasurement
    message: str


def _pct(ratio: float) -> str:
    return f"{100.0 * ratio:.1f}%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def describe(measured: MeasuredSlo) -> str:
    """`79.5% of 1800 requests missed the 3 s SLO over 60 s (late 1200, dropped 230, ...)`."""
    parts = [f"late {measured.late:.0f}"]
    for name, value in (
        ("dropped", measured.dropped),
        ("rejected", measured.rejected),
        ("failed", measured.failed),
    ):
        if value >= 0.5:
            parts.append(f"{name} {value:.0f}")
    ratio = measured.violation_ratio or 0.0
    return (
        f"{_pct(ratio)} of {measured.requests:.0f} requests missed the {measured.slo_s:g} s SLO "
        f"over {measured.window_s:.0f} s ({', '.join(parts)}; p50 {_seconds(measured.p50_s)}, "
        f"p99 {_seconds(measured.p99_s)})"
    )


def _promise_text(plan: Plan | None, promised: float | None) -> str:
    if plan is None:
        return "no plan yet"
    status = plan.solver.status.value
    if promised is None:
        return (
            f"the plan ({status}, predicted {plan.predicted_latency_s:.2f} s) promised nothing: "
            "best effort"
        )
    return (
        f"the plan ({status}, predicted {plan.predicted_latency_s:.2f} s) promised {_pct(promised)}"
    )


def verdict(
    measured: MeasuredSlo | None,
    *,
    plan: Plan | None,
    settings: SloSettings,
    note: str | None = None,
) -> SloVerdict:
    """SLOMet: True within promise + tolerance, False beyond it (with the numbers), Unknown
    without a measurement or with fewer than `min_requests` requests in the window."""
    if measured is None:
        return SloVerdict("Unknown", "NoMeasurement", f"no latency histogram: {note or '-'}")
    if measured.requests < settings.min_requests:
        return SloVerdict(
            "Unknown",
            "NotEnoughRequests",
            f"{measured.requests:.0f} requests in the {measured.window_s:.0f} s window; the SLO "
            f"is judged from {settings.min_requests}",
        )
    ratio = measured.violation_ratio or 0.0
    promised = promised_violation_ratio(plan, slo_s=measured.slo_s)
    allowed = (promised or 0.0) + settings.tolerance
    promise = _promise_text(plan, promised)
    if ratio > allowed:
        tolerance = f" (+{_pct(settings.tolerance)} tolerance)" if settings.tolerance else ""
        return SloVerdict("False", "Missed", f"{describe(measured)}; {promise}{tolerance}")
    return SloVerdict("True", "Met", f"{describe(measured)}; {promise}")


def slo_summary(
    measured: MeasuredSlo | None,
    *,
    plan: Plan | None,
    slo_s: float,
    settings: SloSettings,
    note: str | None = None,
) -> dict[str, object]:
    """`status.slo` (and a local run's `slo`): measured beside predicted, and the verdict."""
    judged = verdict(measured, plan=plan, settings=settings, note=note)
    doc: dict[str, object] = {
        "sloSeconds": slo_s,
        "windowSeconds": settings.window_s,
        "tolerance": settings.tolerance,
        "met": {"True": True, "False": False}.get(judged.status),
        "reason": judged.reason,
        "message": judged.message,
    }
    ratio = measured.violation_ratio if measured is not None else None
    # Null, not absent, when unknown: in a merge patch null deletes the last window's numbers
    # (a printer column must not keep showing them once traffic stopped).
    doc.update(
        {
            "source": measured.source if measured is not None else None,
            "requests": round(measured.requests) if measured is not None else None,
            "violations": round(measured.violations) if measured is not None else None,
            "late": round(measured.late) if measured is not None else None,
            "refused": round(measured.dropped + measured.rejected + measured.failed)
            if measured is not None
            else None,
            "violationRatio": None if ratio is None else round(ratio, 4),
            "p50Seconds": _rounded(measured.p50_s if measured is not None else None),
            "p99Seconds": _rounded(measured.p99_s if measured is not None else None),
            "predictedLatencySeconds": _rounded(plan.predicted_latency_s if plan else None),
            "promisedViolationRatio": promised_violation_ratio(plan, slo_s=slo_s),
        }
    )
    return doc


@dataclass
class SloCache:
    """The last measurement of one cascade's loop, reused until `read_every_s` passed."""

    measured: MeasuredSlo | None = None
    note: str | None = None
    at: float = -math.inf


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def read_slo(
    source: object | None,
    *,
    cascade: str,
    variants: Sequence[str],
    slo_s: float,
    settings: SloSettings,
    namespace: str | None = None,
    cache: SloCache | None = None,
    now: float = 0.0,
) -> tuple[MeasuredSlo | None, str | None]:
    """(measurement, note): a source with `read_slo` asked for the entry stage's window; the
    note says why there is none. With a `cache`, read at most every `settings.read_every_s`."""
    from diffcascade_operator.metrics_source import MetricsUnavailable

    if cache is not None and now - cache.at < settings.read_every_s - 1e-9:
        return cache.measured, cache.note
    read = getattr(source, "read_slo", None)
    measured: MeasuredSlo | None = None
    note: str | None = None
    if read is None or not variants:
        note = "no metrics source with histograms"
    else:
        try:
            observed: SloObservations = read(
                cascade=cascade,
                variant=variants[0],
                window_s=settings.window_s,
                namespace=namespace,
            )
        except MetricsUnavailable as exc:
            note = str(exc)
        else:
            measured = measure(observed, slo_s=slo_s)
    if cache is not None:
        cache.measured, cache.note, cache.at = measured, note, now
    return measured, note
