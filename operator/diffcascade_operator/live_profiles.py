"""Live profiles: the deferral curve and the batch latency re-learnt from the workers' histograms.

Pure (no I/O, no torch): the metrics sources read the histograms, the control loops (operator,
`diffcascade up`, the simulator) call `live_profiles()` once per step and plan with what it
returns. The offline profiles of the spec are the prior.

Rules, stated once:
- f_live(t) comes from the gate-confidence histogram's cumulative `le` buckets over the window:
  F(t) / N, linear inside a bucket. With `GATE_CONFIDENCE_BUCKETS` this is within 0.011 of the
  exact curve of the reference scores.
- Blending: the offline curve counts as `prior_samples` pseudo-observations, so
  f(t) = (n0 f_profile(t) + n f_live(t)) / (n0 + n) (the posterior mean of a Dirichlet prior
  centred on the profile); below `min_samples` the live curve is ignored (weight 0). With the
  defaults: 30 samples weigh 0.13, 200 weigh 0.5, 2,000 weigh 0.91.
- Drift: distance = max over the grid of |f_live(t) - f_profile(t)| (a Kolmogorov-Smirnov
  statistic). It is judged only with `drift_min_samples` samples in the window: at 200, the KS
  95 % band is 1.36 / sqrt(200) = 0.096, just under the default `drift_distance` of 0.1.
- Latency: a batch size with `min_batches` batches in the window takes the measured mean;
  profiled sizes not seen enough keep the prior, scaled by the mean measured/prior ratio of the
  sizes that were (so a slower machine does not make unseen sizes look cheap). A mean no worker
  could have measured (outside the spec's batch-latency bounds: a count with a zero sum, say)
  is not trusted, and the scaled table stays within those bounds.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from diffcascade_worker.protocol import GATE_CONFIDENCE_BUCKETS

from diffcascade_operator.profiles import (
    THRESHOLD_GRID,
    CascadeProfiles,
    DeferCurve,
    VariantProfile,
    batch_latency_ms,
    defer_fraction,
)
from diffcascade_operator.spec import MAX_BATCH_LATENCY_MS, MIN_BATCH_LATENCY_MS

LatencySource = Literal["profile", "live", "mixed"]


class LiveProfileError(ValueError):
    """A histogram that cannot be used (no buckets, non-numeric bounds); the message says why."""


# --- observations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceHistogram:
    """Cumulative `le` bucket counts, Prometheus style: counts[i] = observations <= bounds[i].

    The last bound is +Inf (the total); counts are non-decreasing.
    """

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def samples(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def __add__(self, other: ConfidenceHistogram) -> ConfidenceHistogram:
        return histogram_from_buckets(_merge(self.as_buckets(), other.as_buckets(), 1.0))

    def minus(self, earlier: ConfidenceHistogram) -> ConfidenceHistogram:
        """The increase since `earlier`; the whole of self when a counter went back (restart)."""
        if self.samples < earlier.samples:
            return self
        return histogram_from_buckets(_merge(self.as_buckets(), earlier.as_buckets(), -1.0))

    def as_buckets(self) -> dict[float, float]:
        return dict(zip(self.bounds, self.counts, strict=True))


def _merge(a: Mapping[float, float], b: Mapping[float, float], sign: float) -> dict[float, float]:
    return {le: a.get(le, 0.0) + sign * b.get(le, 0.0) for le in {*a, *b}}


def histogram_from_buckets(buckets: Mapping[float, float]) -> ConfidenceHistogram:
    """From {le: cumulative count} (PromQL rows or a parsed /metrics page).

    Prometheus' `increase()` extrapolates each bucket on its own, so neighbours can come back
    slightly out of order; counts are made non-decreasing (running maximum) and >= 0. A missing
    +Inf bucket is added with the largest count.
    """
    if not buckets:
        raise LiveProfileError("a histogram needs at least one bucket")
    items = sorted((float(le), float(c)) for le, c in buckets.items())
    if any(math.isnan(le) or math.isnan(c) for le, c in items):
        raise LiveProfileError("histogram bounds and counts must be numbers")
    bounds: list[float] = []
    counts: list[float] = []
    running = 0.0
    for le, count in items:
        running = max(running, count, 0.0)
        bounds.append(le)
        counts.append(running)
    if not math.isinf(bounds[-1]):
        bounds.append(math.inf)
        counts.append(running)
    return ConfidenceHistogram(bounds=tuple(bounds), counts=tuple(counts))


def confidence_histogram(
    confidences: Iterable[float], *, bounds: Sequence[float] = GATE_CONFIDENCE_BUCKETS
) -> ConfidenceHistogram:
    """What a worker's gate-confidence histogram holds after observing `confidences`.

    For the simulator's workers and for tests; a NaN confidence counts only in +Inf, as in
    prometheus_client.
    """
    values = [float(c) for c in confidences]
    ordered = sorted(c for c in values if not math.isnan(c))
    finite = [float(b) for b in bounds if not math.isinf(b)]
    counts = [float(bisect.bisect_right(ordered, b)) for b in finite]
    return ConfidenceHistogram(bounds=(*finite, math.inf), counts=(*counts, float(len(values))))


@dataclass(frozen=True)
class BatchStat:
    """Batches of one size over the window and their summed pipeline time."""

    batches: float
    seconds: float

    @property
    def mean_ms(self) -> float:
        return 1000.0 * self.seconds / self.batches if self.batches > 0 else math.nan

    def __add__(self, other: BatchStat) -> BatchStat:
        return BatchStat(self.batches + other.batches, self.seconds + other.seconds)

    def minus(self, earlier: BatchStat) -> BatchStat:
        if self.batches < earlier.batches or self.seconds < earlier.seconds:
            return self
        return BatchStat(self.batches - earlier.batches, self.seconds - earlier.seconds)


@dataclass(frozen=True)
class VariantTotals:
    """One variant's (or one worker's) histograms: cumulative or over a window."""

    confidence: ConfidenceHistogram | None = None
    batches: Mapping[int, BatchStat] = field(default_factory=dict)

    def __add__(self, other: VariantTotals) -> VariantTotals:
        conf = self.confidence
        if other.confidence is not None:
            conf = other.confidence if conf is None else conf + other.confidence
        sizes = {*self.batches, *other.batches}
        zero = BatchStat(0.0, 0.0)
        batches = {b: self.batches.get(b, zero) + other.batches.get(b, zero) for b in sizes}
        return VariantTotals(confidence=conf, batches=batches)

    def minus(self, earlier: VariantTotals) -> VariantTotals:
        conf = self.confidence
        if conf is not None and earlier.confidence is not None:
            conf = conf.minus(earlier.confidence)
        batches = {
            b: s.minus(earlier.batches[b]) if b in earlier.batches else s
            for b, s in self.batches.items()
        }
        return VariantTotals(confidence=conf, batches=batches)


@dataclass(frozen=True)
class LiveObservations:
    """What a metrics source saw over one window, by variant name."""

    variants: Mapping[str, VariantTotals]
    window_s: float
    source: str  # "Prometheus", "DirectScrape", "Simulator"
    at: float


class HistogramRecorder:
    """In memory, what one worker's /metrics exports for live profiles (cumulative).

    For the simulator's workers: `observe_batch` per executed batch, `totals()` per control
    step into a `CumulativeWindow`. Same buckets and the same `le` rule as prometheus_client.
    """

    def __init__(self, *, bounds: Sequence[float] = GATE_CONFIDENCE_BUCKETS) -> None:
        self._bounds = tuple(float(b) for b in bounds if not math.isinf(b))
        self._per_bucket = [0] * (len(self._bounds) + 1)  # the last: above every finite bound
        self._batches: dict[int, list[float]] = {}

    def observe_batch(
        self, *, size: int, seconds: float, confidences: Sequence[float] = ()
    ) -> None:
        """One executed batch: its pipeline time and, on a gated stage, its gate confidences."""
        stat = self._batches.setdefault(max(1, size), [0.0, 0.0])
        stat[0] += 1
        stat[1] += seconds
        for value in confidences:
            if math.isnan(value):
                index = len(self._bounds)
            else:
                index = bisect.bisect_left(self._bounds, value)
            self._per_bucket[index] += 1

    def totals(self) -> VariantTotals:
        running, counts = 0, []
        for count in self._per_bucket:
            running += count
            counts.append(float(running))
        confidence = ConfidenceHistogram(bounds=(*self._bounds, math.inf), counts=tuple(counts))
        return VariantTotals(
            confidence=confidence if running else None,
            batches={b: BatchStat(c, sec) for b, (c, sec) in self._batches.items()},
        )


class CumulativeWindow:
    """Cumulative totals (as a /metrics page gives them) -> their increase over a sliding window.

    The direct-scrape fallback keeps one per worker; the simulator can keep one per variant.
    The increase is newest minus the newest reading at or before `now - window_s` (the oldest
    kept one while the window is not yet full).
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise LiveProfileError(f"window must be > 0 s, got {window_s}")
        self.window_s = window_s
        self._readings: deque[tuple[float, VariantTotals]] = deque()

    def add(self, at: float, totals: VariantTotals) -> None:
        self._readings.append((at, totals))
        horizon = at - self.window_s
        while len(self._readings) > 1 and self._readings[1][0] <= horizon:
            self._readings.popleft()

    def increase(self) -> VariantTotals:
        if not self._readings:
            return VariantTotals()
        base = self._readings[0][1]
        newest = self._readings[-1][1]
        if len(self._readings) == 1:
            return VariantTotals(
                confidence=None
                if newest.confidence is None
                else newest.confidence.minus(newest.confidence)
            )
        return newest.minus(base)


class LiveTracker:
    """Sliding windows over many workers' cumulative totals -> one `LiveObservations`.

    One window per (variant, worker key), so a worker that goes away or restarts does not look
    like a counter reset of its whole variant. The direct-scrape fallback uses it with worker
    URLs as keys; the simulator can use it with its simulated workers' ids and their
    `HistogramRecorder.totals()`.
    """

    def __init__(self, window_s: float, *, source: str) -> None:
        self.window_s = window_s
        self.source = source
        self._windows: dict[tuple[str, str], CumulativeWindow] = {}

    def observe(
        self,
        *,
        now: float,
        variants: Sequence[str],
        totals: Mapping[tuple[str, str], VariantTotals | None],
    ) -> LiveObservations:
        """Add this reading (None: a worker known but not answering) and sum the increases.

        Workers absent from `totals` are forgotten.
        """
        summed = {v: VariantTotals() for v in variants}
        for key, reading in totals.items():
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = CumulativeWindow(self.window_s)
            if reading is not None:
                window.add(now, reading)
            if key[0] in summed:
                summed[key[0]] = summed[key[0]] + window.increase()
        for gone in [k for k in self._windows if k not in totals]:
            del self._windows[gone]
        return LiveObservations(variants=summed, window_s=self.window_s, source=self.source, at=now)


# --- curves ------------------------------------------------------------------------------------


def defer_curve_from_histogram(
    histogram: ConfidenceHistogram,
    *,
    thresholds: Sequence[float] = THRESHOLD_GRID,
    shape: DeferCurve | None = None,
) -> DeferCurve:
    """f(t) = F(t) / N with F the cumulative count; f(0) = 0, f(1) = 1. Inside a bucket the
    count is spread as `shape` (the offline curve) spreads its own share of that bucket, else
    linearly: a gate whose confidences crowd into the first bucket (HADIS's discriminator puts
    most below 0.005) keeps the profile's resolution there, scaled to what was observed.

    A query defers when confidence < t while a bucket counts <= le; the two differ only by
    observations exactly on a bound, which continuous scores do not have.
    """
    total = histogram.samples
    if total <= 0:
        raise LiveProfileError("the histogram holds no observations")
    xs = [0.0]
    ys = [0.0]
    for le, count in zip(histogram.bounds, histogram.counts, strict=True):
        if math.isinf(le) or le <= 0.0:
            continue
        if le >= 1.0:
            xs.append(1.0)
            ys.append(count)
            break
        xs.append(le)
        ys.append(count)
    if xs[-1] < 1.0:
        xs.append(1.0)
        ys.append(total)
    fractions = []
    for t in thresholds:
        if t >= 1.0:
            fractions.append(1.0)
        elif t <= 0.0:
            fractions.append(0.0)
        else:
            i = bisect.bisect_left(xs, t)
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            part = 1.0 if x1 == x0 else (t - x0) / (x1 - x0)
            if shape is not None:
                low, high = defer_fraction(shape, x0), defer_fraction(shape, x1)
                if high > low:
                    part = (defer_fraction(shape, t) - low) / (high - low)
            value = y0 + (y1 - y0) * part
            fractions.append(min(1.0, max(0.0, value / total)))
    return DeferCurve(thresholds=tuple(float(t) for t in thresholds), fractions=tuple(fractions))


def drift_distance(live: DeferCurve, profile: DeferCurve) -> float:
    """max over the 201-point grid of |f_live(t) - f_profile(t)|."""
    return max(abs(defer_fraction(live, t) - defer_fraction(profile, t)) for t in THRESHOLD_GRID)


@dataclass(frozen=True)
class LiveProfileSettings:
    window_s: float = 120.0  # sliding window of the histograms
    prior_samples: float = 200.0  # pseudo-observations the offline curve is worth
    min_samples: int = 30  # fewer in the window: plan with the offline curve alone
    drift_distance: float = 0.1  # ProfileDrift is True above this max |f_live - f_profile|
    drift_min_samples: int = 200  # fewer: drift is not judged (condition Unknown)
    min_batches: int = 20  # batches of one size before its measured latency counts
    #: Seconds between histogram reads: a 120-s window moves little in a few control steps,
    #: and the read is the costliest query of a step (capped at a quarter of the window).
    refresh_s: float = 15.0

    @property
    def read_every_s(self) -> float:
        return min(self.refresh_s, self.window_s / 4)

    def __post_init__(self) -> None:
        if not self.window_s > 0 or self.prior_samples < 0 or self.drift_distance < 0:
            raise LiveProfileError(
                "live profiles need window_s > 0, prior_samples >= 0 and drift_distance >= 0, "
                f"got {self.window_s}, {self.prior_samples}, {self.drift_distance}"
            )


def blend_weight(samples: float, *, settings: LiveProfileSettings) -> float:
    """Weight of the live curve: n / (n + n0), 0 below `min_samples`."""
    if samples < settings.min_samples or samples <= 0:
        return 0.0
    return samples / (samples + settings.prior_samples)


def blend_curves(profile: DeferCurve, live: DeferCurve, weight: float) -> DeferCurve:
    """(1 - w) f_profile + w f_live at the points of both (the profile itself when w = 0)."""
    if weight <= 0.0:
        return profile
    w = min(1.0, weight)
    points = tuple(sorted(set(THRESHOLD_GRID) | set(profile.thresholds) | set(live.thresholds)))
    fractions = tuple(
        (1.0 - w) * defer_fraction(profile, t) + w * defer_fraction(live, t) for t in points
    )
    return DeferCurve(thresholds=points, fractions=fractions)


def live_latency_table(
    prior: Mapping[int, float], observed: Mapping[int, BatchStat], *, min_batches: int
) -> tuple[dict[int, float], LatencySource]:
    """The batch-latency table to plan with, over the prior's batch sizes, and where it came from.

    Sizes seen `min_batches` times take the measured mean. The rest keep the prior times the
    mean measured/prior ratio of all sizes seen enough (unprofiled partial batches included,
    against the prior's interpolation), or the prior itself when none was.
    """
    trusted = {
        b: s.mean_ms
        for b, s in observed.items()
        if b >= 1
        and s.batches >= min_batches
        and MIN_BATCH_LATENCY_MS <= s.mean_ms <= MAX_BATCH_LATENCY_MS  # NaN fails too
    }
    if not trusted or not prior:
        return dict(prior), "profile"
    ratios = [ms / batch_latency_ms(prior, b) for b, ms in trusted.items()]
    scale = sum(ratios) / len(ratios)
    table = {
        b: trusted.get(b, min(MAX_BATCH_LATENCY_MS, max(MIN_BATCH_LATENCY_MS, ms * scale)))
        for b, ms in prior.items()
    }
    measured = sum(1 for b in prior if b in trusted)
    source: LatencySource = "live" if measured == len(prior) else "mixed"
    return table, source


# --- one step ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantLiveSummary:
    """What `status.profiles` says about one variant."""

    variant: str
    samples: int  # gate confidences in the window (0 on an ungated stage)
    weight: float  # of the live curve in the planned one
    threshold: float | None
    f_live: float | None  # at the threshold
    f_profile: float | None
    f_planned: float | None
    max_distance: float | None  # None: no live curve
    drift: bool | None  # None: not judged (no curve, or too few samples)
    batches: int  # batches in the window
    latency_source: LatencySource
    latency_ms: Mapping[int, float]  # the table planned with


@dataclass(frozen=True)
class LiveProfileResult:
    profiles: CascadeProfiles  # what to plan with
    summaries: tuple[VariantLiveSummary, ...]
    window_s: float
    source: str | None  # None: no observations this step (the offline profiles as they are)
    drift_distance: float  # the stated threshold
    drift_min_samples: int  # samples a stage needs before its drift is judged

    @property
    def drift(self) -> bool | None:
        """True if any gated stage drifted, False if all judged ones did not, None: not judged."""
        judged = [s.drift for s in self.summaries if s.drift is not None]
        if not judged:
            return None
        return any(judged)

    @property
    def max_distance(self) -> float | None:
        distances = [s.max_distance for s in self.summaries if s.max_distance is not None]
        return max(distances) if distances else None

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.summaries)


def _variant(
    profile: VariantProfile,
    totals: VariantTotals | None,
    threshold: float | None,
    settings: LiveProfileSettings,
) -> tuple[VariantProfile, VariantLiveSummary]:
    totals = totals or VariantTotals()
    curve = profile.defer_curve
    samples = totals.confidence.samples if totals.confidence is not None else 0.0
    live: DeferCurve | None = None
    if curve is not None and totals.confidence is not None and samples > 0:
        points = tuple(sorted(set(THRESHOLD_GRID) | set(curve.thresholds)))
        live = defer_curve_from_histogram(totals.confidence, thresholds=points, shape=curve)
    weight = blend_weight(samples, settings=settings) if live is not None else 0.0
    planned = blend_curves(curve, live, weight) if curve is not None and live is not None else curve
    distance = drift_distance(live, curve) if live is not None and curve is not None else None
    drift = (
        None
        if distance is None or samples < settings.drift_min_samples
        else distance > settings.drift_distance
    )
    table, latency_source = live_latency_table(
        profile.batch_latency_ms, totals.batches, min_batches=settings.min_batches
    )

    def at(c: DeferCurve | None) -> float | None:
        return None if c is None or threshold is None else defer_fraction(c, threshold)

    summary = VariantLiveSummary(
        variant=profile.name,
        samples=round(samples),
        weight=weight,
        threshold=threshold if curve is not None else None,
        f_live=at(live),
        f_profile=at(curve),
        f_planned=at(planned),
        max_distance=distance,
        drift=drift,
        batches=round(sum(s.batches for s in totals.batches.values())),
        latency_source=latency_source,
        latency_ms=table,
    )
    return replace(profile, batch_latency_ms=table, defer_curve=planned), summary


def live_profiles(
    offline: CascadeProfiles,
    observed: LiveObservations | None,
    *,
    thresholds: Mapping[str, float],
    settings: LiveProfileSettings = LiveProfileSettings(),
) -> LiveProfileResult:
    """The profiles to plan with this step, and the summary `status.profiles` shows.

    `thresholds` is the threshold in force per gated variant (the previous plan's), where
    f is reported. Without observations the offline profiles come back unchanged.
    """
    parts = [
        _variant(
            v,
            observed.variants.get(v.name) if observed is not None else None,
            thresholds.get(v.name),
            settings,
        )
        for v in offline.variants
    ]
    return LiveProfileResult(
        profiles=replace(offline, variants=tuple(p for p, _ in parts)),
        summaries=tuple(s for _, s in parts),
        window_s=observed.window_s if observed is not None else settings.window_s,
        source=observed.source if observed is not None else None,
        drift_distance=settings.drift_distance,
        drift_min_samples=settings.drift_min_samples,
    )
