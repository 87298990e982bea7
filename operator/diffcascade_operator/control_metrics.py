"""The control loop's own Prometheus series: what each plan decided, beside what it measured.

The workers export what happens to requests (`diffcascade_worker.protocol`); the operator
exports what it decided and saw, one series per cascade (labels `namespace`, `cascade`, and
`variant`/`stage` per stage), read from the very status document it writes, so a dashboard and
`kubectl get dcas` cannot disagree. The chart's Grafana dashboard and PrometheusRule use both;
names are defined here once. Served by `diffcascade operator --metrics-port`.

`diffcascade_plan_replicas{stage="0"}` marks each cascade's entry stage: the dashboard joins
the workers' series on it (`and on (cascade, variant)`) to count every request once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

BASE = ("namespace", "cascade")
STAGE = (*BASE, "variant", "stage")
SOLVER_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SOLVER_STATUSES = ("Optimal", "Infeasible", "Held", "Initial")


@dataclass(frozen=True)
class Series:
    name: str
    help: str
    labels: tuple[str, ...] = BASE


DEMAND = Series("diffcascade_plan_demand_qps", "Demand estimate the plan was solved for.")
MEASURED_DEMAND = Series(
    "diffcascade_measured_demand_qps", "Arrival rate at the entry stage, as last read."
)
CAPACITY = Series(
    "diffcascade_plan_capacity_qps", "Throughput the plan's replicas and batches provide."
)
THRESHOLD = Series("diffcascade_plan_threshold", "Gate threshold of the entry stage.")
DEFER_FRACTION = Series("diffcascade_plan_defer_fraction", "Predicted share of deferred queries.")
PREDICTED_LATENCY = Series(
    "diffcascade_plan_predicted_latency_seconds", "Latency the plan predicts (deferred path)."
)
PREDICTED_FID = Series("diffcascade_plan_predicted_fid", "Expected FID of the plan.")
SLO_SECONDS = Series("diffcascade_slo_seconds", "The cascade's latency SLO (spec.sloSeconds).")
VIOLATION_RATIO = Series(
    "diffcascade_slo_violation_ratio",
    "Share of requests that missed the SLO over the measured window (status.slo).",
)
PROMISED_RATIO = Series(
    "diffcascade_slo_promised_violation_ratio",
    "Violation ratio the plan promised (0 when solved within the SLO; absent: best effort).",
)
MEASURED_P99 = Series(
    "diffcascade_slo_p99_seconds", "p99 latency at the entry stage over the measured window."
)
SLO_MET = Series("diffcascade_slo_met", "1 while SLOMet is True, 0 while False (absent: unknown).")
REPLICAS = Series("diffcascade_plan_replicas", "Replicas the plan wants per stage.", STAGE)
READY = Series("diffcascade_ready_replicas", "Ready replicas per stage.", STAGE)
SOLVER_STATUS = Series(
    "diffcascade_plan_solver_status",
    "1 for the solver outcome of the plan in force (Optimal, Infeasible, Held, Initial).",
    (*BASE, "status"),
)
SOLVER_SECONDS = Series("diffcascade_solver_seconds", "Time of one allocation solve.")
METRICS_AVAILABLE = Series(
    "diffcascade_metrics_available", "1 when the last control step had a metrics reading."
)
DRIFT_DISTANCE = Series(
    "diffcascade_profile_drift_distance",
    "Max |f_live - f_profile| of a gated stage's deferral curve over the live window.",
    (*BASE, "variant"),
)
DRIFT_LIMIT = Series(
    "diffcascade_profile_drift_limit", "The distance above which ProfileDrift turns True."
)
DRIFT = Series("diffcascade_profile_drift", "1 while ProfileDrift is True, 0 while False.")

GAUGES = (
    DEMAND,
    MEASURED_DEMAND,
    CAPACITY,
    THRESHOLD,
    DEFER_FRACTION,
    PREDICTED_LATENCY,
    PREDICTED_FID,
    SLO_SECONDS,
    VIOLATION_RATIO,
    PROMISED_RATIO,
    MEASURED_P99,
    SLO_MET,
    REPLICAS,
    READY,
    SOLVER_STATUS,
    METRICS_AVAILABLE,
    DRIFT_DISTANCE,
    DRIFT_LIMIT,
    DRIFT,
)
ALL_SERIES = (*GAUGES, SOLVER_SECONDS)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _condition(status: Mapping[str, Any], kind: str) -> str | None:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return str(cond.get("status"))
    return None


class ControlMetrics:
    """The series of every cascade this operator serves, set from each status it writes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._gauges = {
            s.name: Gauge(s.name, s.help, s.labels, registry=self.registry) for s in GAUGES
        }
        self._solver = Histogram(
            SOLVER_SECONDS.name,
            SOLVER_SECONDS.help,
            SOLVER_SECONDS.labels,
            buckets=SOLVER_BUCKETS,
            registry=self.registry,
        )
        self._seen: dict[tuple[str, str], set[tuple[str, tuple[str, ...]]]] = {}
        self._lock = threading.Lock()

    def _set(
        self, key: tuple[str, str], series: Series, labels: tuple[str, ...], value: Any
    ) -> None:
        gauge = self._gauges[series.name]
        number = _number(value)
        if number is None:
            if (series.name, labels) in self._seen.get(key, set()):
                gauge.remove(*labels)
                self._seen[key].discard((series.name, labels))
            return
        gauge.labels(*labels).set(number)
        self._seen.setdefault(key, set()).add((series.name, labels))

    def record(
        self,
        *,
        namespace: str,
        cascade: str,
        status: Mapping[str, Any],
        variants: Sequence[str],
        slo_seconds: float | None,
        solved: bool,
    ) -> None:
        """Set the series from the status of one control step (`solved`: it ran a solve)."""
        key = (namespace, cascade)
        base = key
        demand = status.get("demand") or {}
        allocation = status.get("allocation") or {}
        solver = allocation.get("solver") or {}
        slo = status.get("slo") or {}
        profiles = status.get("profiles") or {}
        with self._lock:
            for series, value in (
                (DEMAND, demand.get("qps")),
                (MEASURED_DEMAND, demand.get("measuredQps")),
                (CAPACITY, allocation.get("predictedThroughputQps")),
                (THRESHOLD, allocation.get("threshold")),
                (DEFER_FRACTION, allocation.get("deferFraction")),
                (PREDICTED_LATENCY, allocation.get("predictedLatencySeconds")),
                (PREDICTED_FID, allocation.get("predictedFID")),
                (SLO_SECONDS, slo_seconds),
                (VIOLATION_RATIO, slo.get("violationRatio")),
                (PROMISED_RATIO, slo.get("promisedViolationRatio")),
                (MEASURED_P99, slo.get("p99Seconds")),
                (SLO_MET, slo.get("met")),
                (DRIFT_LIMIT, profiles.get("driftDistance")),
                (DRIFT, profiles.get("drift")),
            ):
                self._set(key, series, base, value)
            available = _condition(status, "MetricsAvailable")
            self._set(
                key, METRICS_AVAILABLE, base, None if available is None else available == "True"
            )
            current = solver.get("status")
            for name in SOLVER_STATUSES:
                value = None if current is None else float(name == current)
                self._set(key, SOLVER_STATUS, (*base, name), value)
            planned = {str(v.get("name")): v for v in allocation.get("variants") or ()}
            for index, variant in enumerate(variants):
                stage = (*base, variant, str(index))
                entry = planned.get(variant) or {}
                self._set(key, REPLICAS, stage, entry.get("replicas"))
                self._set(key, READY, stage, entry.get("readyReplicas"))
            for entry in profiles.get("variants") or ():
                if isinstance(entry, Mapping) and entry.get("name"):
                    labels = (*base, str(entry["name"]))
                    self._set(key, DRIFT_DISTANCE, labels, entry.get("maxDistance"))
            millis = _number(solver.get("solveMillis"))
            if solved and millis is not None and current in ("Optimal", "Infeasible", "Initial"):
                self._solver.labels(*base).observe(millis / 1000.0)

    def forget(self, *, namespace: str, cascade: str) -> None:
        """Drop every series of a deleted cascade."""
        key = (namespace, cascade)
        with self._lock:
            for name, labels in self._seen.pop(key, set()):
                self._gauges[name].remove(*labels)
            with contextlib.suppress(KeyError):
                self._solver.remove(*key)


#: The operator's instance (one per process, served by `diffcascade operator`).
CONTROL_METRICS = ControlMetrics()
