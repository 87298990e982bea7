"""Demand estimation: what arrival rate to plan for, from recent arrival-rate samples.

An EWMA smooths Poisson noise; a least-squares slope over the last `trend_window_s` seconds,
projected `trend_horizon_s` ahead, meets ramps before the EWMA catches up (only upward: a
falling trend is left to the EWMA and to the controller's scale-down stabilisation); the
headroom multiplies the result. A step the EWMA would take several intervals to follow (the
newest sample above `panic_ratio` x the EWMA, Knative's panic mode) is planned for at once:
scaling up late costs SLO violations, scaling up early costs only GPU time until the
scale-down window passes. Pure: the caller passes the samples and the time.

The EWMA and the trend read each sample's rate over its control interval (every arrival
counts); the step rule reads its instant rate (the last scrape) where the source has one,
so a step is still planned for one scrape after it happens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from diffcascade_operator.snapshot import MAX_QPS, DemandSample


@dataclass(frozen=True)
class DemandEstimate:
    qps: float  # what to plan for: (ewma + upward trend x horizon, or a step) x headroom
    raw_qps: float  # the newest sample (its instant rate when above its interval rate)
    ewma_qps: float
    trend_qps_per_s: float  # least-squares slope over the trend window (may be negative)
    samples: int  # samples used (not in the future)
    empty: bool  # no usable sample: qps is 0 and says nothing about demand
    step: bool = False  # the newest sample jumped above panic_ratio x EWMA: planned for at once

    @property
    def rising(self) -> bool:
        return self.trend_qps_per_s > 0.0


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_q = sum(q for _, q in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 1e-12:
        return 0.0
    return sum((t - mean_t) * (q - mean_q) for t, q in points) / var


def estimate_demand(
    samples: Sequence[DemandSample],
    *,
    now: float,
    alpha: float = 0.3,
    headroom: float = 1.05,
    trend_horizon_s: float = 10.0,
    trend_window_s: float = 30.0,
    panic_ratio: float = 2.0,
) -> DemandEstimate:
    """Plan-for demand from samples ordered oldest first; samples after `now` are ignored, and
    so are samples no source could have measured (NaN, infinite, above `MAX_QPS`).

    Example: samples 10, 10, 10 qps then 20 qps with alpha 0.5 give an EWMA of 15; no trend
    window (horizon 0) and headroom 1.2 plan for 18 qps. Samples 1, 1, 1 then 8 qps (alpha
    0.3, EWMA 3.1) are a step (8 > 2 x 3.1): with headroom 1 the plan is for 8 qps.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if headroom <= 0.0:
        raise ValueError(f"headroom must be > 0, got {headroom}")
    if panic_ratio <= 1.0:
        raise ValueError(f"panic_ratio must be > 1, got {panic_ratio}")
    kept = sorted(
        (
            s
            for s in samples
            if math.isfinite(s.at) and s.at <= now and math.isfinite(s.qps) and s.qps <= MAX_QPS
        ),
        key=lambda s: s.at,
    )
    usable = [(s.at, max(0.0, s.qps)) for s in kept]
    latest = kept[-1] if kept else None
    if not usable:
        return DemandEstimate(
            qps=0.0, raw_qps=0.0, ewma_qps=0.0, trend_qps_per_s=0.0, samples=0, empty=True
        )
    ewma = usable[0][1]
    for _, qps in usable[1:]:
        ewma = alpha * qps + (1.0 - alpha) * ewma
    recent = [p for p in usable if p[0] >= now - trend_window_s]
    slope = _slope(recent)
    newest = usable[-1][1]
    instant = latest.instant_qps if latest is not None else None
    if instant is not None and math.isfinite(instant) and 0.0 <= instant <= MAX_QPS:
        newest = max(newest, instant)
    # a rate over a span describes its middle: project a rise from there
    lag = 0.5 * latest.span_s if latest is not None and math.isfinite(latest.span_s) else 0.0
    smoothed = ewma + max(0.0, slope * (trend_horizon_s + max(0.0, lag)))
    step = len(usable) > 1 and newest > panic_ratio * ewma and newest > smoothed
    planned = (newest if step else smoothed) * headroom
    return DemandEstimate(
        qps=planned,
        raw_qps=newest,
        ewma_qps=ewma,
        trend_qps_per_s=slope,
        samples=len(usable),
        empty=False,
        step=step,
    )
