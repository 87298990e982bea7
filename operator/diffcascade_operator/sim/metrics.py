"""The figures a run is judged by, computed as the DiffServe evaluation computes them.

- `slo_violation_ratio` = (late + dropped) / requests; late = answered after the SLO.
- `mean_fid`: per 5-s window of completions, the share served by the light model is read
  through the quality curve; the mean over windows with completions (paper §7.2, without
  its normalisation fudge: the share here is the simulator's exact one).
- latency percentiles are over answered queries (dropped ones have no latency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from diffcascade_operator.profiles import QualityCurve, fid_at
from diffcascade_operator.sim.engine import NOT_SERVED, SimResult

FID_WINDOW_S = 5.0


@dataclass(frozen=True)
class Summary:
    scenario: str
    policy: str
    trace: str
    gpus: int
    slo_seconds: float
    requests: int
    served: int
    late: int
    dropped: int
    degraded: int
    deferred: int
    slo_violation_ratio: float
    mean_fid: float | None
    p50_latency_s: float | None
    p99_latency_s: float | None
    light_share: float | None
    gpu_seconds: float
    solves: int
    solve_ms_p50: float | None
    solve_ms_p95: float | None
    decide_ms_p95: float | None
    decide_cpu_ms_p95: float | None
    decisions: int
    startup_seconds: float
    dispatch: str
    scrape_interval_s: float
    sim_seconds: float
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def window_light_shares(result: SimResult, *, window_s: float = FID_WINDOW_S) -> list[float | None]:
    """Light share of each window's completions (None for a window with none)."""
    windows = max(1, math.ceil(result.end_s / window_s + 1e-9))
    light = [0] * windows
    total = [0] * windows
    for finish, stage in zip(result.finish_s, result.served_by, strict=True):
        if stage == NOT_SERVED:
            continue
        k = min(int(finish // window_s), windows - 1)
        total[k] += 1
        if stage == 0:
            light[k] += 1
    return [light[k] / total[k] if total[k] else None for k in range(windows)]


def mean_fid(result: SimResult, quality: QualityCurve | None) -> float | None:
    if quality is None:
        return None
    fids = [fid_at(quality, share) for share in window_light_shares(result) if share is not None]
    return sum(fids) / len(fids) if fids else None


def summarize(
    result: SimResult,
    *,
    quality: QualityCurve | None,
    scenario: str,
    policy: str,
    trace: str,
    gpus: int,
    startup_s: float,
    dispatch: str,
    scrape_interval_s: float = 1.0,
    wall_s: float | None = None,
) -> Summary:
    slo = result.slo_s
    latencies: list[float] = []
    late = dropped = light = 0
    for arrival, finish, stage in zip(
        result.arrival_s, result.finish_s, result.served_by, strict=True
    ):
        if stage == NOT_SERVED:
            dropped += 1
            continue
        latency = finish - arrival
        latencies.append(latency)
        if latency > slo + 1e-9:
            late += 1
        if stage == 0:
            light += 1
    requests = len(result.arrival_s)
    served = len(latencies)
    solves = [d.solve_ms for d in result.decisions if d.solved]
    return Summary(
        scenario=scenario,
        policy=policy,
        trace=trace,
        gpus=gpus,
        slo_seconds=slo,
        requests=requests,
        served=served,
        late=late,
        dropped=dropped,
        degraded=sum(result.degraded),
        deferred=sum(result.deferred),
        slo_violation_ratio=(late + dropped) / requests if requests else 0.0,
        mean_fid=mean_fid(result, quality),
        p50_latency_s=percentile(latencies, 50),
        p99_latency_s=percentile(latencies, 99),
        light_share=light / served if served else None,
        gpu_seconds=result.gpu_seconds,
        solves=len(solves),
        solve_ms_p50=percentile(solves, 50),
        solve_ms_p95=percentile(solves, 95),
        decide_ms_p95=percentile([d.wall_ms for d in result.decisions if d.solved], 95),
        decide_cpu_ms_p95=percentile([d.cpu_ms for d in result.decisions if d.solved], 95),
        decisions=len(result.decisions),
        startup_seconds=startup_s,
        dispatch=dispatch,
        scrape_interval_s=scrape_interval_s,
        sim_seconds=result.end_s,
        wall_s=result.wall_s if wall_s is None else wall_s,
    )
