"""The replay's report: SLO violations, latency percentiles, light share, deferrals, errors."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffcascade_operator.loadgen.client import LoadResult, RequestRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def is_light(record: RequestRecord) -> bool:
    """The first stage's image was returned: not deferred, or deferred but degraded."""
    return record.ok and (not record.deferred or record.degraded)


def summarize(result: LoadResult, *, slo_seconds: float) -> dict[str, Any]:
    """The report document (JSON-serialisable).

    A replay stopped by the user (`interrupted`) cancels what is in flight: those requests
    were not refused or late, so they are counted apart (`cancelled`) and left out of the
    totals and the violation ratio. Cancelled by the replay's own time limit, they count."""
    cancelled = [r for r in result.records if result.interrupted and r.error == "cancelled"]
    records = [r for r in result.records if not (result.interrupted and r.error == "cancelled")]
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None)
    late = sum(1 for r in ok if r.latency_s > slo_seconds)
    total = len(records)
    latencies = [r.latency_s for r in ok]
    error_total = sum(errors.values())

    def rounded(value: float | None, digits: int = 4) -> float | None:
        return None if value is None else round(value, digits)

    return {
        "url": result.url,
        "schedule": result.schedule.name,
        "scheduled_duration_s": rounded(result.schedule.duration_s, 3),
        "wall_s": rounded(result.wall_s, 3),
        "started_at": result.started_at,
        "interrupted": result.interrupted,
        "cancelled": len(cancelled),
        "slo_seconds": slo_seconds,
        "total": total,
        "succeeded": len(ok),
        "late": late,
        "error_total": error_total,
        "errors": dict(sorted(errors.items())),
        "slo_violation_ratio": rounded((late + error_total) / total) if total else None,
        "offered_qps": rounded(total / result.schedule.duration_s, 3)
        if result.schedule.duration_s > 0
        else None,
        "goodput_qps": rounded((len(ok) - late) / result.wall_s, 3) if result.wall_s > 0 else None,
        "latency_s": {
            "p50": rounded(percentile(latencies, 50)),
            "p90": rounded(percentile(latencies, 90)),
            "p99": rounded(percentile(latencies, 99)),
            "mean": rounded(sum(latencies) / len(latencies)) if latencies else None,
            "max": rounded(max(latencies)) if latencies else None,
        },
        "light_share": rounded(sum(1 for r in ok if is_light(r)) / len(ok)) if ok else None,
        "deferred": sum(1 for r in ok if r.deferred),
        "degraded": sum(1 for r in ok if r.degraded),
        "deferral_rate": rounded(sum(1 for r in ok if r.deferred) / len(ok)) if ok else None,
        "served_by": dict(sorted(Counter(r.served_by for r in ok if r.served_by).items())),
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def write_records(records: Sequence[RequestRecord], path: Path) -> None:
    """One CSV row per request, for plots and digging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(asdict(records[0]).keys()) if records else ["index"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))
