"""The allocation MILP: replicas, batch size and threshold of a light -> heavy cascade.

DiffServe's model (paper §3) with three changes: the objective may be the expected FID
instead of the threshold, ties are broken explicitly (fewer GPUs, then fewer replica changes
from the previous plan, then lower latency), and the heavy stage's latency only counts when
queries are deferred at all. A queue at the heavy stage may be given as the paper's Little's-law
waiting time or as a backlog the heavy capacity must drain before a new deferral runs out of
time (what `decide()` passes). The product x·y of replicas and batch choice is linearised with
one integer replica count per batch size, x(b) <= U·y(b).

The solver of record is PuLP. HiGHS runs in-process (highspy); CBC (`PULP_CBC_CMD`) is the
fallback when highspy is missing, at the cost of a subprocess per solve. Before the model is
built an exact presolve removes what cannot be optimal: batch sizes that alone break the SLO,
thresholds with the same deferral fraction as a better one, and (for MinExpectedFID) thresholds
that defer more for no better FID. The lexicographic objective is encoded with integer ranks
and weights, so the MIP gap can be zero and the result is exact.
"""

from __future__ import annotations

import bisect
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import pulp

from diffcascade_operator.plan import SolverStatus
from diffcascade_operator.profiles import (
    THRESHOLD_GRID,
    DeferCurve,
    QualityCurve,
    VariantProfile,
    defer_fraction,
    fid_at,
)
from diffcascade_operator.spec import Objective

#: Capacity may fall short of the requirement by this much (qps): absorbs float rounding in
#: cases like 2 replicas x 10 qps >= 20 qps without admitting real shortfalls.
CAPACITY_TOLERANCE_QPS = 1e-6
LATENCY_TOLERANCE_S = 1e-9


@dataclass(frozen=True)
class ReplicaBounds:
    minimum: int = 0
    maximum: int | None = None


@dataclass(frozen=True)
class AllocationProblem:
    """One light -> heavy pair (or one variant alone when `heavy` is None)."""

    light: VariantProfile
    heavy: VariantProfile | None
    demand_qps: float
    slo_s: float
    gpu_budget: int
    objective: Objective = Objective.MIN_EXPECTED_FID
    quality: QualityCurve | None = None  # FID by light share of this pair
    queue_light_s: float = 0.0  # Little's-law waiting time at the light stage
    queue_heavy_s: float = 0.0
    #: Images already queued at the heavy stage. A deferred query waits behind them for
    #: backlog / planned heavy capacity, so when deferring, the heavy capacity must clear the
    #: backlog within the time a deferral has left (see `_drain_rates`). This is the queue as
    #: work to drain; `queue_heavy_s` is the paper's Little's-law alternative.
    backlog_heavy: float = 0.0
    light_bounds: ReplicaBounds = ReplicaBounds()
    heavy_bounds: ReplicaBounds = ReplicaBounds()
    previous: Mapping[str, int] = field(default_factory=dict)  # replicas by variant name
    thresholds: tuple[float, ...] = THRESHOLD_GRID
    presolve: bool = True  # prune dominated thresholds before the MILP (exact; see _prune_levels)
    solver: str = "auto"  # "auto" (HiGHS if installed, else CBC), "HiGHS", "PULP_CBC_CMD"
    #: Fixed single-variant light share for FID lookup when `heavy` is None (1.0: the light end
    #: of `quality`, 0.0: the heavy end).
    single_light_share: float = 1.0


@dataclass(frozen=True)
class StageAllocation:
    name: str
    replicas: int
    batch_size: int


@dataclass(frozen=True)
class Allocation:
    status: SolverStatus  # OPTIMAL, or INFEASIBLE with a best-effort plan
    light: StageAllocation
    heavy: StageAllocation | None
    threshold: float
    defer_fraction: float
    predicted_latency_s: float  # the deferred path (light-only path when nothing defers)
    predicted_throughput_qps: float  # the largest demand this allocation sustains
    predicted_fid: float | None
    gpus: int
    objective: Objective  # the objective actually used (MaxThreshold when FID is unknown)
    solver: str
    solve_ms: float
    message: str = ""  # for INFEASIBLE: the binding constraint

    def replicas(self) -> dict[str, int]:
        stages = [self.light] if self.heavy is None else [self.light, self.heavy]
        return {s.name: s.replicas for s in stages}


class AllocatorError(ValueError):
    """A problem the allocator cannot even state (missing curve, empty profile)."""


# --- derived data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Level:
    """One candidate threshold after presolve."""

    threshold: float
    fraction: float
    rank: int  # 0 = best by the primary objective
    fid: float | None


def _cost_units(profile: VariantProfile) -> int:
    """What 'fewer GPUs' counts: GPUs, or replicas for a variant that needs no GPU."""
    return max(profile.gpus_per_replica, 1)


def _latency_s(profile: VariantProfile) -> dict[int, float]:
    if not profile.batch_latency_ms:
        raise AllocatorError(f"variant {profile.name} has no batch latency profile")
    return {b: ms / 1000.0 for b, ms in sorted(profile.batch_latency_ms.items())}


def _primary_objective(problem: AllocationProblem) -> Objective:
    if problem.objective is Objective.MIN_EXPECTED_FID and problem.quality is None:
        return Objective.MAX_THRESHOLD
    return problem.objective


def _levels(problem: AllocationProblem, curve: DeferCurve, objective: Objective) -> list[_Level]:
    return list(_ranked_levels(problem.thresholds, curve, problem.quality, objective))


@lru_cache(maxsize=128)
def _ranked_levels(
    thresholds: tuple[float, ...],
    curve: DeferCurve,
    quality: QualityCurve | None,
    objective: Objective,
) -> tuple[_Level, ...]:
    """Thresholds that can be optimal, ranked by the primary objective (exact reduction).

    Cached: profiles change rarely, and this is most of the Python work of a solve.
    """
    by_fraction: dict[float, float] = {}
    for t in thresholds:
        f = round(defer_fraction(curve, t), 12)
        if objective is Objective.MAX_THRESHOLD:
            by_fraction[f] = max(t, by_fraction.get(f, t))
        else:
            by_fraction[f] = min(t, by_fraction.get(f, t))
    ordered = sorted(by_fraction.items())  # by fraction, ascending
    if objective is Objective.MAX_THRESHOLD:
        ranked = sorted(ordered, key=lambda item: -item[1])
        return tuple(
            _Level(t, f, rank, None if quality is None else fid_at(quality, 1.0 - f))
            for rank, (f, t) in enumerate(ranked)
        )
    assert quality is not None
    # Deferring more is only worth it for a strictly better FID (Pareto front in f, FID).
    front: list[tuple[float, float, float]] = []
    best = math.inf
    for f, t in ordered:
        fid = round(fid_at(quality, 1.0 - f), 9)
        if fid < best:
            front.append((f, t, fid))
            best = fid
    distinct = sorted({fid for _, _, fid in front})
    rank_of = {fid: i for i, fid in enumerate(distinct)}
    return tuple(_Level(t, f, rank_of[fid], fid) for f, t, fid in front)


def _prune_levels(
    levels: list[_Level],
    *,
    demand: float,
    lat_l: Mapping[int, float],
    lat_h: Mapping[int, float],
    slack_s: float,
    light: tuple[int, int, int],
    heavy: tuple[int, int, int],
    budget: int,
    drain_h: Mapping[int, float],
) -> list[_Level]:
    """Bound tightening before the MILP: drop thresholds that cannot be optimal.

    For every batch pair, light at its fewest replicas and heavy given every remaining GPU
    is the most deferral that pair can absorb. The largest such fraction bounds f from above
    (levels deferring more are infeasible), and the best level it admits is a feasible
    incumbent, so every level ranked worse than it is dominated. Both rules are exact; the
    MILP still chooses the level, the batch sizes and the replica counts.
    """
    g_l, min_l, u_l = light
    g_h, min_h, u_h = heavy
    by_fraction = sorted(levels, key=lambda lv: lv.fraction)
    fractions = [lv.fraction for lv in by_fraction]
    best_rank_upto: list[int] = []  # best rank among levels with fraction <= fractions[i]
    for lv in by_fraction:
        best_rank_upto.append(min(lv.rank, best_rank_upto[-1]) if best_rank_upto else lv.rank)
    incumbent: int | None = None
    f_max = -1.0
    for b_l, s_l in lat_l.items():
        x_l = max(min_l, math.ceil(max(demand - CAPACITY_TOLERANCE_QPS, 0.0) * s_l / b_l))
        if x_l > u_l or g_l * x_l + g_h * min_h > budget:
            continue
        admissible = 0.0  # light alone: nothing deferred
        for b_h, s_h in lat_h.items():
            if s_l + s_h > slack_s:
                continue
            n_h = u_h if g_h == 0 else min(u_h, (budget - g_l * x_l) // g_h)
            if n_h < max(min_h, 1):
                continue
            capacity = n_h * b_h / s_h + CAPACITY_TOLERANCE_QPS
            if capacity < drain_h.get(b_h, 0.0):
                continue  # cannot clear the heavy backlog in time with this batch
            admissible = max(admissible, capacity / demand if demand > 0 else math.inf)
        f_max = max(f_max, admissible)
        i = bisect.bisect_right(fractions, admissible + 1e-12) - 1
        if i >= 0 and (incumbent is None or best_rank_upto[i] < incumbent):
            incumbent = best_rank_upto[i]
    kept = [
        lv
        for lv in levels
        if lv.fraction <= max(f_max, 0.0) + 1e-12 and (incumbent is None or lv.rank <= incumbent)
    ]
    return kept or levels


def _upper(bounds: ReplicaBounds, cap: int) -> int:
    if bounds.maximum is not None:
        return min(bounds.maximum, cap)
    return cap


# --- the model ---------------------------------------------------------------------------------


#: Zero relative gap: the objective is lexicographic, so any gap could trade a tie-break away.
_GAPS: dict[str, Any] = {"msg": False, "gapRel": 0.0, "gapAbs": 1e-7, "threads": 1}
#: HiGHS's feasibility-jump heuristic triples the p95 solve time on these tiny models and
#: never changes the optimum (measured by bench/allocator_solve.py).
_HIGHS_OPTIONS: dict[str, Any] = {"mip_heuristic_run_feasibility_jump": False}


class _HiGHS(pulp.HiGHS):  # type: ignore[misc]
    """PuLP's in-process HiGHS, marking integer columns in one call instead of one each.

    `changeColIntegrality` per column costs ~70 us; a model here has ~20 integer columns.
    """

    mip: bool

    def buildSolverModel(self, lp: pulp.LpProblem) -> None:
        mip = self.mip
        self.mip = False
        try:
            super().buildSolverModel(lp)
        finally:
            self.mip = mip
        if mip:
            import highspy
            import numpy as np

            columns = [v.index for v in lp.variables() if v.cat == pulp.LpInteger]
            if columns:
                lp.solverModel.changeColsIntegrality(
                    len(columns),
                    np.array(columns, dtype=np.int32),
                    np.full(len(columns), int(highspy.HighsVarType.kInteger), dtype=np.uint8),
                )


def _pick_solver(name: str) -> tuple[Any, str]:
    if name in ("auto", "HiGHS"):
        highs = _HiGHS(**_GAPS, **_HIGHS_OPTIONS)
        if highs.available():
            return highs, "HiGHS"
        if name == "HiGHS":
            raise AllocatorError("HiGHS requested but highspy is not installed")
    if name not in ("auto", "HiGHS", "PULP_CBC_CMD"):
        raise AllocatorError(f"unknown solver {name!r}: use auto, HiGHS or PULP_CBC_CMD")
    # CBC with `threads 1` stalled ~10 s on some of these models (bench): leave it default.
    cbc_options = {k: v for k, v in _GAPS.items() if k != "threads"}
    coin = pulp.COIN_CMD(**cbc_options)
    if coin.available():
        return coin, "PULP_CBC_CMD"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 4 drops its bundled CBC
        return pulp.PULP_CBC_CMD(**cbc_options), "PULP_CBC_CMD"


def milp_solver(name: str = "auto") -> Any:
    """The PuLP solver this module solves with (HiGHS in-process, else CBC), configured for
    exact lexicographic objectives: for other MILPs of the control plane and the simulator."""
    return _pick_solver(name)[0]


def solve(problem: AllocationProblem) -> Allocation:
    """Optimal allocation for one pair, or a best-effort one marked INFEASIBLE."""
    started = time.perf_counter()
    result = _solve(problem)
    return replace(result, solve_ms=(time.perf_counter() - started) * 1000.0)


def _solve(problem: AllocationProblem) -> Allocation:
    if problem.demand_qps < 0 or not math.isfinite(problem.demand_qps):
        raise AllocatorError(f"demand must be a finite number >= 0, got {problem.demand_qps}")
    if problem.heavy is not None and problem.light.defer_curve is None:
        raise AllocatorError(f"variant {problem.light.name} defers but has no deferral curve")
    objective = _primary_objective(problem)
    solver, solver_name = _pick_solver(problem.solver)
    light, heavy = problem.light, problem.heavy
    demand = problem.demand_qps
    q_l = max(0.0, problem.queue_light_s)
    q_h = max(0.0, problem.queue_heavy_s)
    slo = problem.slo_s + LATENCY_TOLERANCE_S

    lat_l = {b: s for b, s in _latency_s(light).items() if s + q_l <= slo}
    lat_h: dict[int, float] = {}
    if heavy is not None and lat_l:
        fastest_l = min(lat_l.values())
        lat_h = {b: s for b, s in _latency_s(heavy).items() if fastest_l + q_l + s + q_h <= slo}
    drain_h = _drain_rates(problem, lat_l, lat_h, slack_s=slo - q_l - q_h)
    lat_h = {b: s for b, s in lat_h.items() if b in drain_h}
    levels = (
        _levels(problem, light.defer_curve, objective)
        if heavy is not None and light.defer_curve is not None
        else []
    )
    if heavy is None or not lat_h:
        # Nothing can be deferred: only levels with f = 0 remain (t = 0 when none exist).
        levels = [lv for lv in levels if lv.fraction == 0.0][:1] or [
            _Level(0.0, 0.0, 0, _single_fid(problem))
        ]
        levels = [replace(lv, rank=0) for lv in levels]

    g_l, g_h = light.gpus_per_replica, heavy.gpus_per_replica if heavy else 0
    min_l = max(1, problem.light_bounds.minimum)
    min_h = problem.heavy_bounds.minimum if heavy is not None else 0
    base_gpus = g_h * min_h
    if lat_l:
        slowest_p = min(b / s for b, s in lat_l.items())
        cap_l = (
            (problem.gpu_budget - base_gpus) // g_l
            if g_l > 0
            else math.ceil(demand / slowest_p) + min_l + problem.previous.get(light.name, 0)
        )
    else:
        cap_l = 0
    u_l = _upper(problem.light_bounds, max(cap_l, 0))
    u_h = 0
    if heavy is not None:
        if lat_h:
            slowest_h = min(b / s for b, s in lat_h.items())
            cap_h = (
                (problem.gpu_budget - g_l * min_l) // g_h
                if g_h > 0
                else math.ceil(demand / slowest_h) + min_h + problem.previous.get(heavy.name, 0)
            )
        else:
            cap_h = min_h
        u_h = _upper(problem.heavy_bounds, max(cap_h, 0))

    if not lat_l or u_l < min_l or (heavy is not None and u_h < min_h):
        return _best_effort(problem, objective, solver_name)
    if problem.presolve and lat_h:
        levels = _prune_levels(
            levels,
            demand=demand,
            lat_l=lat_l,
            lat_h=lat_h,
            slack_s=slo - q_l - q_h,
            light=(g_l, min_l, u_l),
            heavy=(g_h, min_h, u_h),
            budget=problem.gpu_budget,
            drain_h=drain_h,
        )

    prev_l = problem.previous.get(light.name, 0)
    prev_h = problem.previous.get(heavy.name, 0) if heavy is not None else 0
    c_l, c_h = _cost_units(light), _cost_units(heavy) if heavy else 0
    max_changes = u_l + u_h + prev_l + prev_h
    max_cost = c_l * u_l + c_h * u_h
    w_changes = 1
    w_cost = max_changes + 1
    w_rank = (max_cost + 1) * w_cost
    lat_norm = 1.0 + 1.0001 * (max(lat_l.values()) + (max(lat_h.values()) if lat_h else 0.0))

    model = pulp.LpProblem("cascade", pulp.LpMinimize)
    var = model.add_variable
    x_l = {b: var(f"xl_{b}", 0, u_l, cat=pulp.LpInteger) for b in lat_l}
    y_l = {b: var(f"yl_{b}", 0, 1, cat=pulp.LpBinary) for b in lat_l}
    x_h = {b: var(f"xh_{b}", 0, u_h, cat=pulp.LpInteger) for b in lat_h}
    y_h = {b: var(f"yh_{b}", 0, 1, cat=pulp.LpBinary) for b in lat_h}
    w_h = {b: var(f"wh_{b}", 0, 1) for b in lat_h}  # heavy path in use (only when deferring)
    z = {i: var(f"z_{i}", 0, 1, cat=pulp.LpBinary) for i in range(len(levels))}
    d_l = var("dl", 0)  # |light replicas - previous|
    d_h = var("dh", 0)

    sum_xl = pulp.lpSum(x_l.values())
    sum_xh = pulp.lpSum(x_h.values())
    defers = pulp.lpSum(z[i] for i, lv in enumerate(levels) if lv.fraction > 0)
    light_latency = pulp.lpSum(lat_l[b] * y_l[b] for b in lat_l)
    heavy_latency = pulp.lpSum(lat_h[b] * w_h[b] for b in lat_h)

    model += (
        w_rank * pulp.lpSum(lv.rank * z[i] for i, lv in enumerate(levels))
        + w_cost * (c_l * sum_xl + c_h * sum_xh)
        + w_changes * (d_l + d_h)
        + (light_latency + heavy_latency) * (1.0 / lat_norm)
    )
    model += pulp.lpSum(y_l.values()) == 1
    model += pulp.lpSum(z.values()) == 1
    for b in lat_l:
        model += x_l[b] <= u_l * y_l[b]
    model += sum_xl >= min_l
    model += pulp.lpSum((b / lat_l[b]) * x_l[b] for b in lat_l) >= (demand - CAPACITY_TOLERANCE_QPS)
    if lat_h:
        model += pulp.lpSum(y_h.values()) <= 1
        for b in lat_h:
            model += x_h[b] <= u_h * y_h[b]
            model += w_h[b] <= y_h[b]
        model += sum_xh >= min_h
        model += sum_xh >= defers
        model += pulp.lpSum(w_h.values()) >= defers
        model += pulp.lpSum((b / lat_h[b]) * x_h[b] for b in lat_h) >= (
            demand * pulp.lpSum(lv.fraction * z[i] for i, lv in enumerate(levels))
            - CAPACITY_TOLERANCE_QPS
        )
        if any(drain_h.values()):
            model += pulp.lpSum((b / lat_h[b]) * x_h[b] for b in lat_h) >= (
                pulp.lpSum(drain_h[b] * w_h[b] for b in lat_h) - CAPACITY_TOLERANCE_QPS
            )
        model += light_latency + heavy_latency + q_h * pulp.lpSum(w_h.values()) <= slo - q_l
    else:
        model += light_latency <= slo - q_l
    model += g_l * sum_xl + g_h * sum_xh <= problem.gpu_budget - (g_h * min_h if not lat_h else 0)
    model += d_l >= sum_xl - prev_l
    model += d_l >= prev_l - sum_xl
    if lat_h:
        model += d_h >= sum_xh - prev_h
        model += d_h >= prev_h - sum_xh

    model.solve(solver)
    if pulp.LpStatus[model.status] != "Optimal":
        return _best_effort(problem, objective, solver_name)

    def chosen(ys: Mapping[int, pulp.LpVariable]) -> int | None:
        picked = [b for b, y in ys.items() if (y.value() or 0.0) > 0.5]
        return picked[0] if picked else None

    b_l = chosen(y_l)
    assert b_l is not None
    n_l = round(sum(v.value() or 0.0 for v in x_l.values()))
    level = next(lv for i, lv in enumerate(levels) if (z[i].value() or 0.0) > 0.5)
    heavy_alloc: StageAllocation | None = None
    latency = lat_l[b_l] + q_l
    if heavy is not None:
        b_h = chosen(y_h)
        n_h = round(sum(v.value() or 0.0 for v in x_h.values())) if lat_h else min_h
        if b_h is None or n_h == 0:
            b_h = _max_throughput_batch(heavy, problem.slo_s)
        if level.fraction > 0:
            latency += _latency_s(heavy)[b_h] + q_h
        heavy_alloc = StageAllocation(heavy.name, n_h, b_h)
    return _allocation(
        problem,
        objective,
        solver_name,
        SolverStatus.OPTIMAL,
        StageAllocation(light.name, n_l, b_l),
        heavy_alloc,
        level,
        latency,
    )


def _drain_rates(
    problem: AllocationProblem,
    lat_l: Mapping[int, float],
    lat_h: Mapping[int, float],
    *,
    slack_s: float,
) -> dict[int, float]:
    """Per heavy batch size: the heavy capacity (qps) that clears the heavy backlog in time.

    A query deferred now queues behind `backlog_heavy` images and waits backlog / capacity;
    it has the SLO minus the fastest light batch, the queueing terms and its own heavy batch
    left. Batch sizes that leave no time are absent (they cannot serve a deferral now). With
    capacity >= demand x f as well the queue does not grow, so no later deferral waits
    longer. Without a backlog every batch maps to 0.
    """
    backlog = max(0.0, problem.backlog_heavy)
    if backlog <= 0.0 or not lat_l:
        return {b: 0.0 for b in lat_h}
    fastest_l = min(lat_l.values())
    rates = {}
    for b, s in lat_h.items():
        horizon = slack_s - fastest_l - s
        if horizon > LATENCY_TOLERANCE_S:
            rates[b] = backlog / horizon
    return rates


def _single_fid(problem: AllocationProblem) -> float | None:
    if problem.quality is None:
        return None
    return fid_at(problem.quality, problem.single_light_share)


def _allocation(
    problem: AllocationProblem,
    objective: Objective,
    solver_name: str,
    status: SolverStatus,
    light: StageAllocation,
    heavy: StageAllocation | None,
    level: _Level,
    latency_s: float,
    message: str = "",
) -> Allocation:
    cap_l = light.replicas * light.batch_size / _latency_s(problem.light)[light.batch_size]
    throughput = cap_l
    if heavy is not None and problem.heavy is not None and level.fraction > 0:
        cap_h = heavy.replicas * heavy.batch_size / _latency_s(problem.heavy)[heavy.batch_size]
        throughput = min(cap_l, cap_h / level.fraction)
    if problem.heavy is None:
        fid = _single_fid(problem)
    elif problem.quality is None:
        fid = None
    else:
        fid = fid_at(problem.quality, 1.0 - level.fraction)
    gpus = light.replicas * problem.light.gpus_per_replica
    if heavy is not None and problem.heavy is not None:
        gpus += heavy.replicas * problem.heavy.gpus_per_replica
    return Allocation(
        status=status,
        light=light,
        heavy=heavy,
        threshold=level.threshold,
        defer_fraction=level.fraction,
        predicted_latency_s=latency_s,
        predicted_throughput_qps=throughput,
        predicted_fid=fid,
        gpus=gpus,
        objective=objective,
        solver=solver_name,
        solve_ms=0.0,
        message=message,
    )


def _max_throughput_batch(profile: VariantProfile, slo_s: float) -> int:
    """The highest-throughput batch within the SLO; the fastest batch if none fits."""
    lat = _latency_s(profile)
    fitting = [b for b, s in lat.items() if s <= slo_s]
    if not fitting:
        return min(lat, key=lambda b: (lat[b], b))
    return max(fitting, key=lambda b: (b / lat[b], -b))


def _best_effort(problem: AllocationProblem, objective: Objective, solver_name: str) -> Allocation:
    """All light at maximum throughput, nothing deferred; the message names what binds."""
    light, heavy = problem.light, problem.heavy
    g_l = light.gpus_per_replica
    min_h = problem.heavy_bounds.minimum if heavy is not None else 0
    g_h = heavy.gpus_per_replica if heavy is not None else 0
    room = problem.gpu_budget - g_h * min_h
    n_l = room // g_l if g_l > 0 else max(1, problem.light_bounds.minimum)
    if problem.light_bounds.maximum is not None:
        n_l = min(n_l, problem.light_bounds.maximum)
    n_l = max(n_l, 0)
    b_l = _max_throughput_batch(light, problem.slo_s)
    heavy_alloc = None
    if heavy is not None:
        heavy_alloc = StageAllocation(
            heavy.name, min_h, _max_throughput_batch(heavy, problem.slo_s)
        )
    latency = _latency_s(light)[b_l] + max(0.0, problem.queue_light_s)
    level = _Level(0.0, 0.0, 0, None)
    return _allocation(
        problem,
        objective,
        solver_name,
        SolverStatus.INFEASIBLE,
        StageAllocation(light.name, n_l, b_l),
        heavy_alloc,
        level,
        latency,
        message=_binding_constraint(problem),
    )


def _binding_constraint(problem: AllocationProblem) -> str:
    light, heavy = problem.light, problem.heavy
    lat = _latency_s(light)
    q_l = max(0.0, problem.queue_light_s)
    fastest = min(lat.values())
    if fastest + q_l > problem.slo_s + LATENCY_TOLERANCE_S:
        return (
            f"latency: the fastest {light.name} batch ({fastest * 1000:.0f} ms) plus queueing "
            f"({q_l:.2f} s) exceeds the SLO ({problem.slo_s:g} s)"
        )
    min_l = max(1, problem.light_bounds.minimum)
    min_h = problem.heavy_bounds.minimum if heavy is not None else 0
    g_h = heavy.gpus_per_replica if heavy is not None else 0
    floor = light.gpus_per_replica * min_l + g_h * min_h
    if floor > problem.gpu_budget:
        return (
            f"budget: minimum replicas need {floor} GPUs, above the budget of {problem.gpu_budget}"
        )
    fitting = {b: s for b, s in lat.items() if s + q_l <= problem.slo_s + LATENCY_TOLERANCE_S}
    best_p = max(b / s for b, s in fitting.items())
    room = problem.gpu_budget - g_h * min_h
    n_l = room // light.gpus_per_replica if light.gpus_per_replica > 0 else 10**9
    if problem.light_bounds.maximum is not None:
        n_l = min(n_l, problem.light_bounds.maximum)
    return (
        f"capacity: {n_l} {light.name} replicas serve at most {n_l * best_p:.1f} qps, "
        f"below the demand of {problem.demand_qps:.1f} qps"
    )


# --- cascades of more than two variants --------------------------------------------------------


@dataclass(frozen=True)
class CascadeProblem:
    """Every variant of a cascade, entered at its first variant (the Service every query hits).

    `solve_cascade` tries what the drivers can route: the first variant deferring to each later
    variant, and (with `include_single`) the first variant alone.
    """

    variants: tuple[VariantProfile, ...]  # ordered light -> heavy
    demand_qps: float
    slo_s: float
    gpu_budget: int
    objective: Objective = Objective.MIN_EXPECTED_FID
    quality: QualityCurve | None = None  # default FID curve for every pair
    pair_quality: Mapping[tuple[str, str], QualityCurve] = field(default_factory=dict)
    queue_s: Mapping[str, float] = field(default_factory=dict)  # by variant name
    backlog: Mapping[str, float] = field(default_factory=dict)  # images queued, by variant name
    bounds: Mapping[str, ReplicaBounds] = field(default_factory=dict)  # by variant name
    previous: Mapping[str, int] = field(default_factory=dict)
    solver: str = "auto"
    include_single: bool = True  # also the first variant alone (nothing deferred)
    #: Variants a plan may enter at (the drivers route arrivals to the plan's entry stage);
    #: None: the first variant only, the Service every query hits today.
    entries: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CascadeAllocation:
    best: Allocation
    #: Per entry (the first variant unless `entries` says more), in variant order: the entry
    #: alone (if tried), then the entry deferring to each later variant.
    candidates: tuple[Allocation, ...]
    solve_ms: float

    def replicas(self, names: Sequence[str]) -> dict[str, int]:
        chosen = self.best.replicas()
        return {n: chosen.get(n, 0) for n in names}


def sort_key(allocation: Allocation) -> tuple[float, ...]:
    """Orders allocations of one cascade: feasible first, then by the objective, GPUs, latency."""
    infeasible = 1.0 if allocation.status is SolverStatus.INFEASIBLE else 0.0
    if allocation.objective is Objective.MIN_EXPECTED_FID:
        primary = allocation.predicted_fid if allocation.predicted_fid is not None else math.inf
    else:
        primary = -allocation.threshold
    return (infeasible, primary, float(allocation.gpus), allocation.predicted_latency_s)


def solve_cascade(problem: CascadeProblem) -> CascadeAllocation:
    """Best routable cascade by the objective: each entry variant deferring to each later one
    (adjacent or not), and the entry alone. Entries are the first variant unless the problem
    names more (`entries`): a pair that does not start at an entry is never tried, as no query
    reaches its light stage. Ties go to the earlier candidate, so a plan that defers nothing
    says the entry serves alone, and an earlier entry wins a tie with a later one.
    """
    started = time.perf_counter()
    names = [v.name for v in problem.variants]
    entries = [names[0]] if problem.entries is None else [n for n in names if n in problem.entries]
    if not entries:
        raise AllocatorError(f"no entry variant among {problem.entries}")
    subproblems = []
    for entry in entries:
        later = names[names.index(entry) + 1 :]
        if problem.include_single or not later or problem.entries is not None:
            subproblems.append(pair_problem(problem, entry, None))
        subproblems += [pair_problem(problem, entry, heavy) for heavy in later]
    candidates = tuple(solve(p) for p in subproblems)
    best = min(candidates, key=sort_key)
    return CascadeAllocation(
        best=best, candidates=candidates, solve_ms=(time.perf_counter() - started) * 1000.0
    )


def pair_problem(problem: CascadeProblem, light: str, heavy: str | None) -> AllocationProblem:
    """The two-stage problem of one candidate (heavy None: the variant alone) of a cascade.

    Variants outside the candidate keep their minimum replicas, whose GPUs leave the budget.
    A variant alone takes its FID from the light end of the pair it leads, else the heavy end
    of the pair it closes.
    """
    by_name = {v.name: v for v in problem.variants}
    names = [v.name for v in problem.variants]
    lp = by_name[light]
    hp = by_name[heavy] if heavy is not None else None
    share = 1.0
    if heavy is not None:
        quality = problem.pair_quality.get((light, heavy), problem.quality)
    else:
        i = names.index(light)
        if i + 1 < len(names):
            quality = problem.pair_quality.get((light, names[i + 1]), problem.quality)
        elif i > 0:
            quality = problem.pair_quality.get((names[i - 1], light), problem.quality)
            share = 0.0
        else:
            quality = problem.quality
    used = {light} if heavy is None else {light, heavy}
    return AllocationProblem(
        light=lp,
        heavy=hp,
        demand_qps=problem.demand_qps,
        slo_s=problem.slo_s,
        gpu_budget=problem.gpu_budget - _others_floor(problem, used),
        objective=problem.objective,
        quality=quality,
        queue_light_s=problem.queue_s.get(light, 0.0),
        queue_heavy_s=problem.queue_s.get(heavy, 0.0) if heavy is not None else 0.0,
        backlog_heavy=problem.backlog.get(heavy, 0.0) if heavy is not None else 0.0,
        light_bounds=problem.bounds.get(light, ReplicaBounds()),
        heavy_bounds=problem.bounds.get(heavy, ReplicaBounds())
        if heavy is not None
        else ReplicaBounds(),
        previous=problem.previous,
        solver=problem.solver,
        single_light_share=share,
    )


def _others_floor(problem: CascadeProblem, used: set[str]) -> int:
    """GPUs the variants outside a candidate keep at their minimum replicas."""
    return sum(
        problem.bounds.get(v.name, ReplicaBounds()).minimum * v.gpus_per_replica
        for v in problem.variants
        if v.name not in used
    )
