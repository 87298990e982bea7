"""The figures a run is judged by, computed as the DiffServe evaluation computes them.

- `slo_violation_ratio` = (late + dropped) / requests; late = answered after the SLO.
- `mean_fid`: per 5-s window of completions, the share served by the light model is read
  through the quality curve; the mean over windows with completions (paper §7.2, without
  its normalisation fudge: the share here is the simulator's exact one).
- latency percentiles are over answered queries (dropped ones have no latency).
- with a quality table (HADIS's benchmark) a window's FID is what was really served: the two
  variants that answered most of its completions, the share the router sent past the first
  and the share escalated among the others, read as the table's row at those shares (rounded
  to its 0.1 grid) or else the pair's discriminator-only curve (`QualityTable.served_fid`);
- `drop_after_slo`: a query answered later than that many SLOs counts as dropped, not late
  (HADIS's controller stops waiting at 2 x SLO); both are violations either way.

This is the project's scoring, `scoring: project` in every summary; `sim/hadis_scoring.py`
reproduces HADIS's own (`--scoring hadis`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from diffcascade_operator.profiles import QualityCurve, QualityTable, fid_at
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
    scoring: str = "project"

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


def table_window_fids(
    result: SimResult, table: QualityTable, *, window_s: float = FID_WINDOW_S
) -> list[float]:
    """Per 5-s window of completions, the FID of what was served (module doc)."""
    windows = max(1, math.ceil(result.end_s / window_s + 1e-9))
    served: list[dict[int, int]] = [{} for _ in range(windows)]
    routed: list[dict[int, int]] = [{} for _ in range(windows)]
    escalated: list[dict[int, int]] = [{} for _ in range(windows)]
    for qid, stage in enumerate(result.served_by):
        if stage == NOT_SERVED:
            continue
        k = min(int(result.finish_s[qid] // window_s), windows - 1)
        served[k][stage] = served[k].get(stage, 0) + 1
        if result.routed and result.routed[qid]:
            routed[k][stage] = routed[k].get(stage, 0) + 1
        elif result.deferred[qid]:
            escalated[k][stage] = escalated[k].get(stage, 0) + 1
    names = result.stage_names
    out = []
    for k in range(windows):
        if not served[k]:
            continue
        top = sorted(served[k], key=lambda s: (-served[k][s], s))[:2]
        if len(top) == 1:
            out.append(table.served_fid((names[top[0]], names[top[0]]), 0.0, 0.0))
            continue
        light, heavy = sorted(top)
        total = served[k][light] + served[k][heavy]
        sent = routed[k].get(heavy, 0)
        rest = total - sent
        share_r = sent / total
        share_c = escalated[k].get(heavy, 0) / rest if rest else 0.0
        out.append(table.served_fid((names[light], names[heavy]), share_r, share_c))
    return out


def mean_fid(
    result: SimResult, quality: QualityCurve | None, table: QualityTable | None = None
) -> float | None:
    if table is not None:
        fids = table_window_fids(result, table)
        return sum(fids) / len(fids) if fids else None
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
    table: QualityTable | None = None,
    drop_after_slo: float | None = None,
) -> Summary:
    slo = result.slo_s
    cutoff = math.inf if drop_after_slo is None else drop_after_slo * slo
    latencies: list[float] = []
    late = dropped = light = 0
    for arrival, finish, stage in zip(
        result.arrival_s, result.finish_s, result.served_by, strict=True
    ):
        if stage == NOT_SERVED:
            dropped += 1
            continue
        latency = finish - arrival
        if latency > cutoff + 1e-9:
            dropped += 1
            continue
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
        mean_fid=mean_fid(result, quality, table),
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
