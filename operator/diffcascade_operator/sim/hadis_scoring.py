"""HADIS's own scoring of a run (`--scoring hadis`), as `analysis/parse_logs.py` computes it.

The artifact's controller writes one log row a second once its demand estimate is above 0;
its figure script (`plot_e1_end2end.py`) reads 360 rows from the first row with any outcome
(fewer, in whole 5-row windows, when the run is shorter) and, per 5-row window:

- SLO violation = (timeouts + drops) / (successes + timeouts + drops) recorded in the
  window; a query is a success or a timeout when answered (within or past the SLO), a drop
  when still unanswered 2 x SLO after its arrival (worker-dropped queries included);
- FID, by system:
  - `hadis`: the FID of the configuration the controller had chosen at each second (an
    exact (pair, r, c) row of the table; a shed plan, with no configuration, is the table's
    worst row), averaged over the window's 5 rows, whatever was actually served;
  - `infaas-acc`: the single FID of the variant that registered the most queries;
  - every other system: the counts of queries registered at each variant's workers (an
    escalated or routed query registers at each stage it passes) as shares, rounded to
    0.05; the first two active variants name the pair and the heavier one's share indexes
    that pair's curve, densified to 0.05 steps (midpoints rounded to 2 decimals); one
    variant: its single FID; none: 29.76;
- both series are smoothed by a 5-point moving average ('valid'), and the run's figures are
  the means of the smoothed series.

The per-second rows are rebuilt from the simulation: row s holds what happened in [s-1, s),
the first row is the first second with an arrival (the controller's estimate turns positive
then), and rows run until the last outcome.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from diffcascade_operator.profiles import QualityTable
from diffcascade_operator.sim.engine import NOT_SERVED, SimResult

ROWS_PER_POINT = 5
LENGTH = 360
SMOOTH = 5
IDLE_FID = 29.76


@dataclass(frozen=True)
class HadisScore:
    method: str  # "hadis" (table row per second), "infaas" (dominant variant) or "mix"
    avg_fid: float
    avg_slo_violation: float
    points: int  # smoothed points averaged
    offset: int  # first row used
    shed_rows: int  # rows with no configuration (scored as the worst row), `hadis` only


def dense_curve(heavy_share_fids: Sequence[float]) -> list[float]:
    """`parse_logs._interpolate`: 0.1-step points to 0.05 steps, midpoints to 2 decimals."""
    out: list[float] = []
    for a, b in itertools.pairwise(heavy_share_fids):
        out.extend([a, round((a + b) / 2, 2)])
    out.append(heavy_share_fids[-1])
    return out


def smooth(values: Sequence[float], window: int = SMOOTH) -> list[float]:
    """Moving average, 'valid' mode (shorter by window - 1)."""
    return [sum(values[i : i + window]) / window for i in range(len(values) - window + 1)]


def method_for(policy: str) -> str:
    if policy == "hadis":
        return "hadis"
    if policy == "infaas-acc":
        return "infaas"
    return "mix"


def _rows(result: SimResult) -> tuple[int, list[list[int]], list[list[int]]]:
    """(first second, per row [succeed, timeout, drop], per row registrations per stage)."""
    slo = result.slo_s
    events: list[tuple[float, int]] = []  # (time, 0 succeed / 1 timeout / 2 drop)
    for qid, arrival in enumerate(result.arrival_s):
        stage = result.served_by[qid]
        finish = result.finish_s[qid]
        if stage == NOT_SERVED or finish - arrival > 2.0 * slo + 1e-9:
            events.append((arrival + 2.0 * slo, 2))
        else:
            events.append((finish, 1 if finish - arrival > slo + 1e-9 else 0))
    first = math.floor(min(result.arrival_s)) + 1 if result.arrival_s else 1
    last = max(t for t, _ in events) if events else 0.0
    count = max(0, math.floor(last) + 1 - first + 1)
    outcomes = [[0, 0, 0] for _ in range(count)]
    registered = [[0] * len(result.stage_names) for _ in range(count)]
    for at, kind in events:
        row = math.floor(at) + 1 - first
        if 0 <= row < count:
            outcomes[row][kind] += 1
    for at, stage in result.registrations:
        row = math.floor(at) + 1 - first
        if 0 <= row < count:
            registered[row][stage] += 1
    return first, outcomes, registered


def _config_fids(
    result: SimResult, table: QualityTable, first: int, count: int
) -> list[float | None]:
    """Per row, the FID of the configuration in force at its tick (None: shed, no config)."""
    decisions = sorted(result.decisions, key=lambda d: d.at)
    out: list[float | None] = []
    k = -1
    for row in range(count):
        tick = first + row
        while k + 1 < len(decisions) and decisions[k + 1].at <= tick + 1e-9:
            k += 1
        chosen = decisions[k].plan.row if k >= 0 else None
        if chosen is None:
            out.append(None)
            continue
        match = [
            r
            for r in table.rows
            if r.matches(chosen.pair, chosen.router_share, chosen.escalate_share)
        ]
        out.append(match[0].fid if match else table.worst().fid)  # unmatched: the worst row
    return out


def _mix_fid(counts: Sequence[int], table: QualityTable, names: Sequence[str]) -> float:
    total = sum(counts)
    if total == 0:
        return IDLE_FID
    shares = [round(c / total / 0.05) * 0.05 for c in counts]
    active = [i for i, s in enumerate(shares) if s > 0]
    if not active:
        return IDLE_FID
    if len(active) == 1:
        return table.single[names[active[0]]]
    light, heavy = active[:2]
    curve = table.pair_curves[(names[light], names[heavy])]
    heavy_fids = list(reversed(curve.fids))  # stored by light share, ascending
    share = round(shares[heavy], 2)
    return dense_curve(heavy_fids)[round(share / 0.05)]


def hadis_score(result: SimResult, table: QualityTable, *, policy: str) -> HadisScore:
    method = method_for(policy)
    first, outcomes, registered = _rows(result)
    served = [k for k, row in enumerate(outcomes) if sum(row) > 0]
    offset = min(served[0], max(len(outcomes) - LENGTH, 0)) if served else 0
    available = len(outcomes) - offset
    length = min(LENGTH, (available // ROWS_PER_POINT) * ROWS_PER_POINT)
    if length < SMOOTH * ROWS_PER_POINT:
        raise ValueError(f"run too short for HADIS's scoring ({available} rows)")
    windows = length // ROWS_PER_POINT
    slo = []
    for w in range(windows):
        rows = outcomes[offset + w * ROWS_PER_POINT : offset + (w + 1) * ROWS_PER_POINT]
        total = sum(sum(r) for r in rows)
        slo.append((sum(r[1] + r[2] for r in rows) / total) if total else 0.0)
    names = result.stage_names
    shed = 0
    if method == "hadis":
        used = _config_fids(result, table, first, len(outcomes))[offset : offset + length]
        shed = sum(1 for f in used if f is None)
        worst = table.worst().fid
        per_row = [worst if f is None else f for f in used]
        fids = [sum(per_row[w * 5 : w * 5 + 5]) / 5 for w in range(windows)]
    else:
        fids = []
        for w in range(windows):
            rows = registered[offset + w * ROWS_PER_POINT : offset + (w + 1) * ROWS_PER_POINT]
            counts = [sum(r[i] for r in rows) for i in range(len(names))]
            if method == "infaas":
                dominant = max(range(len(counts)), key=lambda i: (counts[i], -i))
                fids.append(table.single[names[dominant]])
            else:
                fids.append(_mix_fid(counts, table, names))
    fid_s, slo_s = smooth(fids), smooth(slo)
    return HadisScore(
        method=method,
        avg_fid=sum(fid_s) / len(fid_s),
        avg_slo_violation=sum(slo_s) / len(slo_s),
        points=len(fid_s),
        offset=offset,
        shed_rows=shed,
    )
