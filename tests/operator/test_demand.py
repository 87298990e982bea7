"""Demand estimation: EWMA, upward trend, headroom."""

from __future__ import annotations

import pytest
from diffcascade_operator.demand import estimate_demand
from diffcascade_operator.snapshot import DemandSample


def samples(*rates: float, start: float = 0.0, step: float = 1.0) -> tuple[DemandSample, ...]:
    return tuple(DemandSample(at=start + i * step, qps=q) for i, q in enumerate(rates))


def test_ewma_weights_recent_samples_by_alpha() -> None:
    est = estimate_demand(
        samples(10, 10, 10, 20), now=3, alpha=0.5, headroom=1.2, trend_horizon_s=0
    )
    assert est.ewma_qps == pytest.approx(15.0)
    assert est.qps == pytest.approx(18.0)
    assert est.raw_qps == 20 and est.samples == 4 and not est.empty


def test_steady_demand_is_planned_at_the_rate_times_headroom() -> None:
    est = estimate_demand(samples(*[12.0] * 10), now=9, headroom=1.05, trend_horizon_s=10)
    assert est.trend_qps_per_s == pytest.approx(0.0, abs=1e-9)
    assert est.qps == pytest.approx(12.6)


def test_a_ramp_is_met_early_by_the_projected_trend() -> None:
    ramp = samples(*[10 + 2 * i for i in range(10)])  # +2 qps per second, now at 28
    plain = estimate_demand(ramp, now=9, alpha=0.3, headroom=1.0, trend_horizon_s=0)
    ahead = estimate_demand(ramp, now=9, alpha=0.3, headroom=1.0, trend_horizon_s=5)
    assert ahead.trend_qps_per_s == pytest.approx(2.0)
    assert ahead.rising
    assert plain.qps < 28  # the EWMA lags the ramp
    assert ahead.qps == pytest.approx(plain.qps + 10.0)
    assert ahead.qps > 28


def test_a_falling_trend_does_not_lower_the_estimate_below_the_ewma() -> None:
    fall = samples(*[30 - 2 * i for i in range(10)])
    est = estimate_demand(fall, now=9, alpha=0.3, headroom=1.0, trend_horizon_s=10)
    assert est.trend_qps_per_s < 0 and not est.rising
    assert est.qps == pytest.approx(est.ewma_qps)


def test_trend_uses_only_the_recent_window() -> None:
    old_ramp = samples(*[float(i) for i in range(10)], start=0)
    recent_flat = samples(*[9.0] * 10, start=100)
    est = estimate_demand(
        old_ramp + recent_flat, now=109, alpha=1.0, headroom=1.0, trend_window_s=30
    )
    assert est.trend_qps_per_s == pytest.approx(0.0, abs=1e-9)
    assert est.qps == pytest.approx(9.0)


def test_no_samples_give_zero_flagged_empty() -> None:
    est = estimate_demand((), now=5)
    assert est.empty and est.qps == 0.0 and est.samples == 0


def test_samples_from_the_future_are_ignored() -> None:
    est = estimate_demand(samples(5, 5, 500), now=1, alpha=1.0, headroom=1.0)
    assert est.samples == 2 and est.qps == pytest.approx(5.0)
    assert estimate_demand(samples(5), now=-1).empty


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="alpha"):
        estimate_demand(samples(1), now=0, alpha=0.0)
    with pytest.raises(ValueError, match="headroom"):
        estimate_demand(samples(1), now=0, headroom=0.0)


def test_a_step_far_above_the_ewma_is_planned_for_at_once() -> None:
    samples = [DemandSample(at=float(t), qps=q) for t, q in enumerate([1.0, 1.0, 1.0, 8.0])]
    estimate = estimate_demand(samples, now=3.0, alpha=0.3, headroom=1.0, trend_horizon_s=0.0)
    assert estimate.step
    assert estimate.qps == 8.0
    assert estimate.ewma_qps < 4.0


def test_noise_within_the_panic_ratio_stays_smoothed() -> None:
    samples = [DemandSample(at=float(t), qps=q) for t, q in enumerate([10.0, 10.0, 10.0, 15.0])]
    estimate = estimate_demand(samples, now=3.0, alpha=0.3, headroom=1.0, trend_horizon_s=0.0)
    assert not estimate.step
    assert estimate.qps == estimate.ewma_qps == 11.5
