"""The measured SLO: bucket arithmetic, the verdict against the plan's promise, windows."""

from __future__ import annotations

import math

import pytest
from diffcascade_operator.live_profiles import histogram_from_buckets
from diffcascade_operator.measured_slo import (
    EntryTotals,
    SloObservations,
    SloSettings,
    SloWindow,
    count_above,
    histogram_quantile,
    measure,
    promised_violation_ratio,
    verdict,
)
from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus

HIST = histogram_from_buckets({1.0: 10.0, 2.0: 30.0, 5.0: 90.0, math.inf: 100.0})


def _plan(status: SolverStatus = SolverStatus.OPTIMAL, latency: float = 1.5) -> Plan:
    return Plan(
        variants=(),
        threshold=0.1,
        defer_fraction=0.3,
        demand_qps=8.0,
        predicted_latency_s=latency,
        predicted_throughput_qps=9.0,
        predicted_fid=17.0,
        solver=SolverOutcome(status=status, solve_ms=3.0),
        reason="test",
        decided_at=0.0,
    )


def _observed(outcomes: dict[str, float], hist: object = HIST) -> SloObservations:
    totals = EntryTotals(latency=hist, outcomes=outcomes)  # type: ignore[arg-type]
    return SloObservations(totals=totals, window_s=60.0, source="Prometheus", at=0.0)


def test_count_above_is_exact_on_a_bucket_bound_and_linear_inside_a_bucket() -> None:
    assert count_above(HIST, 2.0) == 70.0
    assert count_above(HIST, 3.5) == pytest.approx(40.0)  # half of the (2, 5] bucket's 60
    assert count_above(HIST, 10.0) == 10.0  # everything in +Inf is above the last bound
    assert count_above(HIST, 0.0) == 100.0


def test_histogram_quantile_follows_prometheus() -> None:
    assert histogram_quantile(HIST, 0.5) == pytest.approx(2.0 + 3.0 * 20 / 60)
    assert histogram_quantile(HIST, 0.99) == 5.0  # in +Inf: the last finite bound
    empty = histogram_from_buckets({1.0: 0.0, math.inf: 0.0})
    assert histogram_quantile(empty, 0.5) is None


def test_measure_counts_late_answers_and_refusals_but_not_abandoned_ones() -> None:
    outcomes = {"served": 70.0, "deferred": 25.0, "degraded": 5.0, "dropped": 8.0}
    measured = measure(_observed({**outcomes, "rejected": 2.0, "abandoned": 50.0}), slo_s=2.0)
    assert measured.requests == 110.0
    assert measured.late == 70.0 and measured.violations == 80.0
    assert measured.violation_ratio == pytest.approx(80 / 110)


def test_slo_met_turns_false_with_the_numbers_when_an_optimal_plan_is_missed() -> None:
    measured = measure(_observed({"served": 100.0}), slo_s=2.0)
    judged = verdict(measured, plan=_plan(), settings=SloSettings())
    assert (judged.status, judged.reason) == ("False", "Missed")
    assert judged.message.startswith("70.0% of 100 requests missed the 2 s SLO over 60 s")
    assert "p99 5.00 s" in judged.message
    assert "the plan (Optimal, predicted 1.50 s) promised 0.0%" in judged.message


def test_slo_met_is_true_within_the_tolerance_and_unknown_on_little_traffic() -> None:
    fast = histogram_from_buckets({1.0: 995.0, 5.0: 1000.0, math.inf: 1000.0})
    measured = measure(_observed({"served": 1000.0}, fast), slo_s=1.0)
    assert verdict(measured, plan=_plan(), settings=SloSettings()).status == "True"
    strict = SloSettings(tolerance=0.001)
    assert verdict(measured, plan=_plan(), settings=strict).status == "False"
    few = measure(_observed({"served": 5.0}, fast), slo_s=1.0)
    assert verdict(few, plan=_plan(), settings=SloSettings()).reason == "NotEnoughRequests"
    assert verdict(None, plan=_plan(), settings=SloSettings(), note="down").status == "Unknown"


def test_a_best_effort_plan_promises_nothing() -> None:
    assert promised_violation_ratio(_plan(), slo_s=2.0) == 0.0
    assert promised_violation_ratio(_plan(latency=2.5), slo_s=2.0) is None
    assert promised_violation_ratio(_plan(SolverStatus.INFEASIBLE), slo_s=2.0) is None
    measured = measure(_observed({"served": 100.0}), slo_s=2.0)
    judged = verdict(measured, plan=_plan(SolverStatus.INFEASIBLE), settings=SloSettings())
    assert judged.status == "False" and "promised nothing: best effort" in judged.message


def test_slo_window_sums_workers_and_survives_a_restart() -> None:
    window = SloWindow(10.0)

    def totals(served: float) -> EntryTotals:
        return EntryTotals(outcomes={"served": served})

    window.observe(now=0.0, totals={"a": totals(10), "b": totals(5)})
    summed = window.observe(now=5.0, totals={"a": totals(14), "b": totals(6)})
    assert summed.outcomes["served"] == 5.0
    restarted = window.observe(now=8.0, totals={"a": totals(2), "b": totals(6)})
    assert restarted.outcomes["served"] == 3.0  # a's counter began again: all of it counts
    later = window.observe(now=30.0, totals={"a": totals(2), "b": totals(6)})
    assert later.outcomes["served"] == 0.0  # nothing new in the last 10 s
