"""The cascade's status document: conditions, allocation, demand, printer-column fields.

Conditions follow metav1.Condition: one entry per type, `lastTransitionTime` changes only
when `status` flips. `Ready` means "can serve": every stage that should run has a ready pod.
The plan is rebuilt from status after an operator restart, so hysteresis survives restarts.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from diffcascade_operator.live_profiles import LiveProfileResult, VariantLiveSummary
from diffcascade_operator.measured_slo import SloVerdict
from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.profiles import QualityRow

ConditionStatus = Literal["True", "False", "Unknown"]

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
METRICS_AVAILABLE = "MetricsAvailable"
ALLOCATION_SOLVED = "AllocationSolved"
THRESHOLD_APPLIED = "ThresholdApplied"
PROFILE_DRIFT = "ProfileDrift"
SLO_MET = "SLOMet"
CONDITION_TYPES = (
    READY,
    PROGRESSING,
    DEGRADED,
    METRICS_AVAILABLE,
    ALLOCATION_SOLVED,
    THRESHOLD_APPLIED,
    SLO_MET,
    PROFILE_DRIFT,
)


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def merge_conditions(
    existing: Sequence[Mapping[str, Any]] | None,
    updates: Iterable[Condition],
    *,
    now: float,
    generation: int | None,
) -> list[dict[str, Any]]:
    """The new conditions list: updated types replaced, others kept, in CONDITION_TYPES order."""
    by_type: dict[str, dict[str, Any]] = {str(c.get("type")): dict(c) for c in existing or ()}
    for cond in updates:
        old = by_type.get(cond.type)
        flipped = old is None or old.get("status") != cond.status
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": iso(now)
            if flipped or old is None
            else old.get("lastTransitionTime", iso(now)),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[cond.type] = entry
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


def condition_status(conditions: Sequence[Mapping[str, Any]] | None, kind: str) -> str | None:
    for cond in conditions or ():
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def replicas_summary(plan: Plan, ready: Mapping[str, int]) -> str:
    return " ".join(f"{a.name}={a.replicas}/{ready.get(a.name, 0)}" for a in plan.variants)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def allocation_doc(plan: Plan, *, ready: Mapping[str, int], plan_id: str) -> dict[str, Any]:
    variants: list[dict[str, Any]] = []
    for a in plan.variants:
        entry: dict[str, Any] = {
            "name": a.name,
            "replicas": a.replicas,
            "readyReplicas": ready.get(a.name, 0),
            "batchSize": a.batch_size,
        }
        if a.threshold is not None:
            entry["threshold"] = _round(a.threshold, 4)
        if a.next_stage is not None:
            entry["nextStage"] = a.next_stage
        variants.append(entry)
    solver: dict[str, Any] = {
        "status": plan.solver.status.value,
        "solveMillis": _round(plan.solver.solve_ms, 1),
        "message": plan.solver.message,
    }
    if plan.solver.objective_value is not None:
        solver["objectiveValue"] = _round(plan.solver.objective_value, 4)
    doc: dict[str, Any] = {
        "threshold": _round(plan.threshold, 4),
        "deferFraction": _round(plan.defer_fraction, 4),
        "predictedLatencySeconds": _round(plan.predicted_latency_s),
        "predictedThroughputQps": _round(plan.predicted_throughput_qps),
        "planId": plan_id,
        "variants": variants,
        "solver": solver,
        "decidedAt": iso(plan.decided_at),
        "reason": plan.reason,
    }
    # Absent (not null) when unknown: a merge patch treats null as "delete".
    if plan.predicted_fid is not None:
        doc["predictedFID"] = _round(plan.predicted_fid)
    doc.update(hybrid_doc(plan))
    return doc


def plan_pair(plan: Plan) -> tuple[str, str | None]:
    """(entry stage, the stage it sends routed and escalated queries to; None: it serves
    alone): what `kubectl get dcas` shows as the pair."""
    entry = plan.entry()
    chosen = next((v for v in plan.variants if v.name == entry), None)
    heavy = chosen.next_stage if chosen is not None else None
    if heavy is None and chosen is not None and chosen.threshold:
        names = [v.name for v in plan.variants]
        index = names.index(entry)
        heavy = names[index + 1] if index + 1 < len(names) else None
    return entry, heavy


def hybrid_doc(plan: Plan) -> dict[str, Any]:
    """The plan's entry stage, pair, router share and table row (`status.allocation`)."""
    entry, heavy = plan_pair(plan)
    doc: dict[str, Any] = {
        "entryStage": entry,
        "pair": entry if heavy is None else f"{entry}->{heavy}",
        "routerShare": _round(plan.router_share, 4),
    }
    if heavy is not None:
        doc["heavyStage"] = heavy
    if plan.row is not None:
        doc["row"] = {
            "light": plan.row.light,
            "heavy": plan.row.heavy,
            "routerShare": plan.row.router_share,
            "escalateShare": plan.row.escalate_share,
            "heavyShare": plan.row.heavy_share,
            "fid": plan.row.fid,
        }
    return doc


def plan_from_status(status: Mapping[str, Any] | None) -> Plan | None:
    """The plan last written to status, so a restarted operator continues from it."""
    allocation = (status or {}).get("allocation")
    if not isinstance(allocation, Mapping) or not allocation.get("variants"):
        return None
    try:
        variants = tuple(
            VariantAllocation(
                name=str(v["name"]),
                replicas=int(v["replicas"]),
                batch_size=int(v.get("batchSize", 1)),
                threshold=float(v["threshold"]) if v.get("threshold") is not None else None,
                next_stage=str(v["nextStage"]) if v.get("nextStage") else None,
            )
            for v in allocation["variants"]
        )
        solver = allocation.get("solver") or {}
        fid = allocation.get("predictedFID")
        row_doc = allocation.get("row")
        row = None
        if isinstance(row_doc, Mapping):
            row = QualityRow(
                light=str(row_doc["light"]),
                heavy=str(row_doc["heavy"]),
                router_share=float(row_doc["routerShare"]),
                escalate_share=float(row_doc["escalateShare"]),
                heavy_share=float(row_doc["heavyShare"]),
                fid=float(row_doc["fid"]),
            )
        names = [v.name for v in variants]
        entry = allocation.get("entryStage")
        return Plan(
            variants=variants,
            threshold=float(allocation.get("threshold") or 0.0),
            defer_fraction=float(allocation.get("deferFraction") or 0.0),
            demand_qps=float(((status or {}).get("demand") or {}).get("qps") or 0.0),
            predicted_latency_s=float(allocation.get("predictedLatencySeconds") or 0.0),
            predicted_throughput_qps=float(allocation.get("predictedThroughputQps") or 0.0),
            predicted_fid=float(fid) if fid is not None else None,
            solver=SolverOutcome(
                status=SolverStatus(solver.get("status", SolverStatus.HELD.value)),
                solve_ms=float(solver.get("solveMillis") or 0.0),
                message=str(solver.get("message") or ""),
            ),
            reason=str(allocation.get("reason") or "restored from status"),
            decided_at=parse_iso(allocation.get("decidedAt")) or 0.0,
            entry_stage=str(entry) if entry in names and entry != names[0] else None,
            router_share=float(allocation.get("routerShare") or 0.0),
            row=row,
        )
    except (KeyError, TypeError, ValueError):
        return None


# --- the measured SLO ----------------------------------------------------------------------------


def slo_condition(judged: SloVerdict) -> Condition:
    """SLOMet: the SLO the entry stage measured against what the plan promised."""
    return Condition(SLO_MET, judged.status, judged.reason, judged.message[:1000])


# --- live profiles (issue 9) -------------------------------------------------------------------


def profile_drift_condition(result: LiveProfileResult, *, note: str | None = None) -> Condition:
    """ProfileDrift: True when a gated stage's live f(t) departs from its spec profile by more
    than the stated distance (judged only with enough samples in the window)."""
    window = f"{result.window_s:.0f} s window"
    judged = [s for s in result.summaries if s.drift is not None]
    if result.drift is True:
        worst = max(
            (s for s in judged if s.drift), key=lambda s: s.max_distance or 0.0, default=None
        )
        assert worst is not None
        return Condition(
            PROFILE_DRIFT,
            "True",
            "CurveDrifted",
            f"{worst.variant}: live f(t) departs from the profile by {worst.max_distance:.3f} "
            f"> {result.drift_distance:.3f} over the {window} ({worst.samples} samples); "
            f"planning with the blended curve (live weight {worst.weight:.2f})",
        )
    if result.drift is False:
        distance = result.max_distance or 0.0
        return Condition(
            PROFILE_DRIFT,
            "False",
            "WithinProfile",
            f"max |f_live - f_profile| {distance:.3f} <= {result.drift_distance:.3f} over the "
            f"{window} ({result.samples} samples)",
        )
    if result.source is None:
        return Condition(
            PROFILE_DRIFT,
            "Unknown",
            "NoObservations",
            f"no histograms: {note or 'no source'}"[:1000],
        )
    distance_text = "" if result.max_distance is None else f", distance {result.max_distance:.3f}"
    return Condition(
        PROFILE_DRIFT,
        "Unknown",
        "NotEnoughSamples",
        f"{result.samples} gate samples in the {window}{distance_text}; drift is judged from "
        f"{result.drift_min_samples}",
    )


def _put(doc: dict[str, Any], key: str, value: float | None, digits: int = 4) -> None:
    # Absent (not null) when unknown: a merge patch treats null as "delete".
    if value is not None:
        doc[key] = round(value, digits)


def _variant_profile_doc(summary: VariantLiveSummary) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": summary.variant,
        "samples": summary.samples,
        "weight": round(summary.weight, 4),
        "batches": summary.batches,
        "latencySource": summary.latency_source,
        "batchLatencyMs": {str(b): round(ms, 1) for b, ms in sorted(summary.latency_ms.items())},
    }
    _put(doc, "threshold", summary.threshold)
    _put(doc, "fLive", summary.f_live)
    _put(doc, "fProfile", summary.f_profile)
    _put(doc, "fPlanned", summary.f_planned)
    _put(doc, "maxDistance", summary.max_distance)
    if summary.drift is not None:
        doc["drift"] = summary.drift
    return doc


def profiles_doc(result: LiveProfileResult) -> dict[str, Any]:
    """`status.profiles`: the live curve's summary (samples, f at the threshold, max distance)."""
    doc: dict[str, Any] = {
        "source": result.source or "None",
        "windowSeconds": round(result.window_s, 1),
        "samples": result.samples,
        "driftDistance": result.drift_distance,
        "variants": [_variant_profile_doc(s) for s in result.summaries],
    }
    _put(doc, "maxDistance", result.max_distance)
    if result.drift is not None:
        doc["drift"] = result.drift
    return doc


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def diff_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys of `desired` that differ from `current` (a minimal merge patch).

    A null inside `desired` deletes that field (merge-patch semantics), so a field already
    absent from `current` counts as equal to null."""
    return {k: v for k, v in desired.items() if _without_nulls(current.get(k)) != _without_nulls(v)}
