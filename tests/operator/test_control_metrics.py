"""The operator's own series follow the status it writes, and vanish with the cascade."""

from __future__ import annotations

from typing import Any

from diffcascade_operator.control_metrics import ControlMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

STATUS: dict[str, Any] = {
    "demand": {"qps": 8.4, "measuredQps": 7.9},
    "allocation": {
        "threshold": 0.12,
        "deferFraction": 0.4,
        "predictedLatencySeconds": 1.9,
        "predictedThroughputQps": 9.0,
        "solver": {"status": "Optimal", "solveMillis": 3.0},
        "variants": [
            {"name": "light", "replicas": 2, "readyReplicas": 1},
            {"name": "heavy", "replicas": 3, "readyReplicas": 3},
        ],
    },
    "slo": {"violationRatio": 0.795, "met": False, "promisedViolationRatio": 0.0},
    "profiles": {
        "driftDistance": 0.1,
        "drift": False,
        "variants": [{"name": "light", "maxDistance": 0.03}],
    },
    "conditions": [{"type": "MetricsAvailable", "status": "True"}],
}


def _samples(metrics: ControlMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_series_follow_the_status_document() -> None:
    metrics = ControlMetrics()
    metrics.record(namespace="ns", cascade="c", status=STATUS, variants=["light", "heavy"],
                   slo_seconds=3.0, solved=True)  # fmt: skip
    got = _samples(metrics)
    base = (("cascade", "c"), ("namespace", "ns"))
    assert got[("diffcascade_plan_demand_qps", base)] == 8.4
    assert got[("diffcascade_slo_violation_ratio", base)] == 0.795
    assert got[("diffcascade_slo_met", base)] == 0.0
    entry = (("cascade", "c"), ("namespace", "ns"), ("stage", "0"), ("variant", "light"))
    assert got[("diffcascade_plan_replicas", entry)] == 2
    assert got[("diffcascade_ready_replicas", entry)] == 1
    assert got[("diffcascade_plan_solver_status", (*base, ("status", "Optimal")))] == 1
    assert got[("diffcascade_plan_solver_status", (*base, ("status", "Infeasible")))] == 0
    assert got[("diffcascade_solver_seconds_count", base)] == 1
    assert got[("diffcascade_metrics_available", base)] == 1


def test_an_unknown_value_removes_its_series_and_forget_removes_all() -> None:
    metrics = ControlMetrics()
    metrics.record(namespace="ns", cascade="c", status=STATUS, variants=["light", "heavy"],
                   slo_seconds=3.0, solved=True)  # fmt: skip
    quiet = {**STATUS, "slo": {"met": None}}
    metrics.record(namespace="ns", cascade="c", status=quiet, variants=["light", "heavy"],
                   slo_seconds=3.0, solved=False)  # fmt: skip
    names = {name for name, _ in _samples(metrics)}
    assert "diffcascade_slo_violation_ratio" not in names  # not a stale 79.5 %
    assert "diffcascade_plan_demand_qps" in names
    metrics.forget(namespace="ns", cascade="c")
    assert not [n for n, labels in _samples(metrics) if ("cascade", "c") in labels]
