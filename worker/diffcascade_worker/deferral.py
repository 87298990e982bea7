"""The threshold and deferral-curve contract: one rule, one grid, one curve, one validator.

The worker applies the rule, calibration and on-cluster profiling measure the curve, the
operator's allocator plans with it, the simulator replays it and the live-profile path
re-derives it from traffic. All of them import this module, so it stays free of torch (the
operator image has none) and of anything that is not the contract itself.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: Points of the threshold grid: t = 0, 0.005, ..., 1.0.
THRESHOLD_GRID_POINTS = 201
#: The grid the allocator chooses thresholds from and every measured curve is written on.
THRESHOLD_GRID: tuple[float, ...] = tuple(
    k / (THRESHOLD_GRID_POINTS - 1) for k in range(THRESHOLD_GRID_POINTS)
)


def should_defer(confidence: float, threshold: float) -> bool:
    """True when a query with this gate confidence goes to the next stage.

    confidence < threshold defers; threshold 0 defers nothing; threshold >= 1.0 defers
    everything, even a confidence of exactly 1, so the two ends of the range mean "defer
    nothing" and "defer all". A NaN confidence (a broken score) defers whenever the threshold
    is above 0.
    """
    if threshold >= 1.0:
        return True
    if math.isnan(confidence):
        return threshold > 0.0
    return confidence < threshold


def quality_defers(quality: str | None, confidence: float | None, threshold: float) -> bool:
    """Whether a query goes to the next stage, given OpenAI's `quality` of its request.

    `low` and `medium` ask for the first stage's image (never deferred), `high` for the next
    stage's (always deferred, whatever the gate says); `auto` or none leaves it to the gate:
    `should_defer`, and a stage without a gate score defers nothing.
    """
    if quality in ("low", "medium"):
        return False
    if quality == "high":
        return True
    return confidence is not None and should_defer(confidence, threshold)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through increasing xs, clamped to the end values outside them
    (exact on the points). The planner reads every profiled curve this way."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if x1 == x0:
        return y1
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class DeferCurveError(ValueError):
    """A deferral curve that breaks the contract; the message says where and which rule."""


@dataclass(frozen=True)
class DeferCurve:
    """f(t): the share of queries `should_defer` sends on at threshold t.

    Points are strictly increasing thresholds with non-decreasing fractions, all in [0, 1].
    Between points f is piecewise linear (exact on them); f(t <= 0) = 0 and f(t >= 1) = 1
    whatever the points say, because that is what the rule does at the ends.
    """

    thresholds: tuple[float, ...]
    fractions: tuple[float, ...]

    def at(self, threshold: float) -> float:
        if threshold <= 0.0:
            return 0.0
        if threshold >= 1.0:
            return 1.0
        return interpolate(self.thresholds, self.fractions, threshold)

    def on_grid(self) -> DeferCurve:
        """The same curve sampled on `THRESHOLD_GRID`."""
        if self.thresholds == THRESHOLD_GRID:
            return self
        return DeferCurve(THRESHOLD_GRID, tuple(self.at(t) for t in THRESHOLD_GRID))

    def distance(self, other: DeferCurve) -> float:
        """Largest |f - g| over the grid: how far two curves disagree anywhere."""
        return max(abs(self.at(t) - other.at(t)) for t in THRESHOLD_GRID)


def validate_curve(
    thresholds: Iterable[Any], fractions: Iterable[Any], *, where: str
) -> DeferCurve:
    """The one check every curve passes (spec, file, measurement); DeferCurveError otherwise."""
    try:
        ts = tuple(float(t) for t in thresholds)
        fs = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise DeferCurveError(f"{where}: thresholds and deferFractions must be numbers") from exc
    if len(ts) != len(fs) or len(ts) < 2:
        raise DeferCurveError(f"{where}: thresholds and deferFractions need equal length >= 2")
    if any(not (math.isfinite(v) and 0.0 <= v <= 1.0) for v in (*ts, *fs)):
        raise DeferCurveError(f"{where}: values must lie in [0, 1]")
    if any(b <= a for a, b in itertools.pairwise(ts)):
        raise DeferCurveError(f"{where}: thresholds must be strictly increasing")
    if any(b < a for a, b in itertools.pairwise(fs)):
        raise DeferCurveError(f"{where}: deferFractions must be non-decreasing in t")
    return DeferCurve(thresholds=ts, fractions=fs)


def curve_from_confidences(
    confidences: Iterable[float], *, thresholds: Sequence[float] = THRESHOLD_GRID
) -> DeferCurve:
    """f(t) = share of confidences that `should_defer` at t, exactly, for each t."""
    values = [float(c) for c in confidences]
    if not values:
        raise DeferCurveError("need at least one confidence to build a deferral curve")
    broken = sum(1 for c in values if math.isnan(c))
    ordered = sorted(c for c in values if not math.isnan(c))
    n = len(values)
    fractions = tuple(
        1.0 if t >= 1.0 else 0.0 if t <= 0.0 else (bisect.bisect_left(ordered, t) + broken) / n
        for t in thresholds
    )
    return DeferCurve(thresholds=tuple(float(t) for t in thresholds), fractions=fractions)


def curve_from_document(doc: Any, *, where: str) -> DeferCurve:
    """A curve file's JSON (`thresholds` + `deferFractions`, or per-prompt `confidences`).

    Confidences, when present, win: the curve is rebuilt from them on the grid, exactly,
    instead of interpolating between someone else's points.
    """
    if not isinstance(doc, dict):
        raise DeferCurveError(f"{where}: expected a JSON object")
    confidences = doc.get("confidences")
    if isinstance(confidences, list) and confidences:
        try:
            return curve_from_confidences(float(c) for c in confidences)
        except (TypeError, ValueError) as exc:
            raise DeferCurveError(f"{where}: confidences must be numbers") from exc
    if "thresholds" not in doc or "deferFractions" not in doc:
        raise DeferCurveError(
            f"{where}: needs 'thresholds' and 'deferFractions' (or 'confidences')"
        )
    return validate_curve(doc["thresholds"], doc["deferFractions"], where=where)


__all__ = [
    "THRESHOLD_GRID",
    "THRESHOLD_GRID_POINTS",
    "DeferCurve",
    "DeferCurveError",
    "curve_from_confidences",
    "curve_from_document",
    "interpolate",
    "should_defer",
    "validate_curve",
]
