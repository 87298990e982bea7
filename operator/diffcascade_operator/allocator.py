"""The allocation MILP: replicas, batch size, threshold and router share of a light -> heavy pair.

DiffServe's model (paper §3) with these changes: the objective may be the expected FID
instead of the threshold, ties are broken explicitly (fewer GPUs, then fewer replica changes
from the previous plan, then lower latency), and each path is charged what it runs through:
the light-only path the light stage, an escalated query both stages, and (with a quality
table) a query the router sends straight to the heavy stage only the heavy one. With a
table's rows a level is a measured configuration (router share r, escalation share c, FID):
the light stage is charged (1 - r) of the demand, the heavy stage its routed plus escalated
share h (HADIS charges its light stage the full demand). A queue at the heavy stage may be
given as the paper's Little's-law waiting time or as a backlog the heavy capacity must drain
before a new escalation runs out of time (what `decide()` passes). Under random dispatch each
stage option carries a waiting allowance and a utilisation cap (`queueing`). The product x·y
of replicas and option choice is linearised with one integer replica count per option,
x(o) <= U·y(o).

The solver of record is PuLP. HiGHS runs in-process (highspy); CBC (`PULP_CBC_CMD`) is the
fallback when highspy is missing, at the cost of a subprocess per solve. Before the model is
built an exact presolve removes what cannot be optimal: options that alone break the SLO,
thresholds with the same deferral fraction as a better one, levels another beats in FID and
load, and levels that no choice of options can serve, or that a feasible level beats in FID.
The lexicographic objective is encoded with integer ranks and weights, so the MIP gap can be
zero and the result is exact.
"""

from __future__ import annotations

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
    QualityRow,
    VariantProfile,
    defer_fraction,
    fid_at,
    threshold_for_share,
)
from diffcascade_operator.queueing import (
    TAIL_PROBABILITY,
    Dispatch,
    StageOption,
    path_tails,
    stage_options,
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
    presolve: bool = True  # drop levels that cannot be optimal before the MILP (exact)
    solver: str = "auto"  # "auto" (HiGHS if installed, else CBC), "HiGHS", "PULP_CBC_CMD"
    #: Fixed single-variant light share for FID lookup when `heavy` is None (1.0: the light end
    #: of `quality`, 0.0: the heavy end).
    single_light_share: float = 1.0
    #: FID of the light variant serving alone when measured (a quality table's single FID);
    #: replaces the `quality` lookup at `single_light_share`.
    fid_alone: float | None = None
    #: Measured hybrid configurations of this pair (a quality table's rows): each is a level
    #: with a router share r (the top-r prompts go straight to heavy) beside the gate's.
    rows: tuple[QualityRow, ...] = ()
    #: Of the prompts the router sends to heavy, the share it sends through the light stage
    #: anyway (exploration for a learning router): the light stage is charged for them.
    exploration: float = 0.0
    #: How each stage's replicas share its queries (`queueing`): random dispatch charges a
    #: waiting allowance on every path and caps each replica's utilisation.
    dispatch: Dispatch = Dispatch.LEAST_LOADED
    tail_probability: float = TAIL_PROBABILITY


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
    #: Share of all queries the heavy stage serves: routed plus escalated (the gate's f(t)
    #: when nothing is routed).
    defer_fraction: float
    predicted_latency_s: float  # the slowest path (light-only path when nothing defers)
    predicted_throughput_qps: float  # the largest demand this allocation sustains
    predicted_fid: float | None
    gpus: int
    objective: Objective  # the objective actually used (MaxThreshold when FID is unknown)
    solver: str
    solve_ms: float
    message: str = ""  # for INFEASIBLE: the binding constraint
    #: Router share r: the top-r share of prompts skips the light stage (0: none).
    router_share: float = 0.0
    #: The quality-table row this allocation runs at (None: a point of the 1-D curve).
    row: QualityRow | None = None

    def replicas(self) -> dict[str, int]:
        stages = [self.light] if self.heavy is None else [self.light, self.heavy]
        return {s.name: s.replicas for s in stages}


class AllocatorError(ValueError):
    """A problem the allocator cannot even state (missing curve, empty profile)."""


# --- derived data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Level:
    """One candidate configuration of the pair after presolve: a gate threshold, and with a
    quality table a router share as well (one table row)."""

    threshold: float
    fraction: float  # share of all queries the heavy stage serves (routed + escalated)
    rank: int  # 0 = best by the primary objective
    fid: float | None
    router_share: float = 0.0  # r: routed straight to heavy before any image is made
    light_share: float = 1.0  # share of all queries the light stage runs: 1 - r x (1 - explore)
    escalates: bool = False  # some queries pass the light stage and then the heavy one
    row: QualityRow | None = None

    @property
    def routes(self) -> bool:
        return self.router_share > 0.0


def _cost_units(profile: VariantProfile) -> int:
    """What 'fewer GPUs' counts: GPUs, or replicas for a variant that needs no GPU."""
    return max(profile.gpus_per_replica, 1)


def _latency_s(profile: VariantProfile) -> dict[int, float]:
    if not profile.batch_latency_ms:
        raise AllocatorError(f"variant {profile.name} has no batch latency profile")
    return {b: ms / 1000.0 for b, ms in sorted(profile.batch_latency_ms.items())}


def _primary_objective(problem: AllocationProblem) -> Objective:
    fid_unknown = problem.quality is None and not problem.rows
    if problem.objective is Objective.MIN_EXPECTED_FID and fid_unknown:
        return Objective.MAX_THRESHOLD
    return problem.objective


def _levels(problem: AllocationProblem, curve: DeferCurve, objective: Objective) -> list[_Level]:
    rows = problem.rows if objective is Objective.MIN_EXPECTED_FID else ()
    return list(
        _ranked_levels(
            problem.thresholds,
            curve,
            problem.quality,
            objective,
            rows,
            problem.exploration,
            problem.fid_alone,
        )
    )


@lru_cache(maxsize=256)
def _ranked_levels(
    thresholds: tuple[float, ...],
    curve: DeferCurve,
    quality: QualityCurve | None,
    objective: Objective,
    rows: tuple[QualityRow, ...] = (),
    exploration: float = 0.0,
    fid_alone: float | None = None,
) -> tuple[_Level, ...]:
    """Levels that can be optimal, ranked by the primary objective (exact reduction).

    The gate's thresholds give the 1-D curve's levels (nothing routed); a quality table's
    rows add levels with a router share, their escalation share c turned into the threshold
    whose f(t) is c (c is a percentile of the light model's confidences). A level is dropped
    when another is no worse in FID, heavy load, light load and path (no escalation is the
    shorter path) and better in one, or equal in all and listed first.

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
            _Level(
                t, f, rank, None if quality is None else fid_at(quality, 1.0 - f), escalates=f > 0
            )
            for rank, (f, t) in enumerate(ranked)
        )
    candidates: list[_Level] = []
    if quality is not None:
        candidates += [
            _Level(t, f, 0, round(fid_at(quality, 1.0 - f), 9), escalates=f > 0) for f, t in ordered
        ]
    elif not any(r.router_share == 0 and r.escalate_share == 0 for r in rows):
        # no curve: nothing deferred is the light variant alone
        candidates.append(_Level(0.0, 0.0, 0, fid_alone))
    for row in rows:
        r = row.router_share
        c = row.escalate_share
        t = threshold_for_share(curve, c) if c > 0 else 0.0
        candidates.append(
            _Level(
                threshold=t,
                fraction=round(min(1.0, row.heavy_share), 12),
                rank=0,
                fid=round(row.fid, 9),
                router_share=r,
                light_share=round(1.0 - r * (1.0 - exploration), 12),
                escalates=c > 0,
                row=row,
            )
        )
    kept = _pareto(candidates)
    distinct = sorted({lv.fid for lv in kept if lv.fid is not None})
    rank_of = {fid: i for i, fid in enumerate(distinct)}
    worst = len(distinct)
    return tuple(replace(lv, rank=rank_of[lv.fid] if lv.fid is not None else worst) for lv in kept)


def _pareto(levels: Sequence[_Level]) -> list[_Level]:
    """The levels no other one beats (module rule in `_ranked_levels`), in the given order."""

    def key(lv: _Level) -> tuple[float, float, float, int]:
        fid = lv.fid if lv.fid is not None else math.inf
        return (fid, lv.fraction, lv.light_share, int(lv.escalates))

    kept: list[_Level] = []
    keys = [key(lv) for lv in levels]
    for i, a in enumerate(keys):
        beaten = False
        for j, b in enumerate(keys):
            if i == j:
                continue
            if all(y <= x for x, y in zip(a, b, strict=True)) and (b != a or j < i):
                beaten = True
                break
        if not beaten:
            kept.append(levels[i])
    return kept


def _replicas_for(load: float, capacity: float) -> int:
    """The fewest replicas whose capacity meets `load` (within the tolerance)."""
    need = load - CAPACITY_TOLERANCE_QPS
    if need <= 0:
        return 0
    return max(0, math.ceil(need / capacity - 1e-12))


@dataclass(frozen=True)
class _Stages:
    """One level's stage options and limits: what its MILP and the presolve share."""

    light: tuple[StageOption, ...]  # within the SLO on the light-only path
    heavy: tuple[StageOption, ...]  # usable on every path the level runs
    drain: Mapping[int, float]  # per heavy option: capacity (qps) the backlog needs
    limits_l: tuple[int, int, int]  # GPUs per replica, minimum, maximum replicas
    limits_h: tuple[int, int, int]
    budget: int  # GPUs for the two stages (a level deferring nothing: minus heavy's minimum)
    slack_s: float  # what an escalated query may spend in the two stages' options


def _feasible(level: _Level, stages: _Stages, *, demand: float) -> bool:
    """Whether any choice of options serves `level` within budget and bounds (exact: the
    level's MILP constraints with the fewest replicas per option)."""
    g_l, min_l, u_l = stages.limits_l
    g_h, min_h, u_h = stages.limits_h
    for o_l in stages.light:
        x_l = max(min_l, _replicas_for(demand * level.light_share, o_l.capacity_qps))
        if x_l > u_l:
            continue
        if level.fraction <= 0.0:
            if g_l * x_l <= stages.budget:
                return True
            continue
        for k, o_h in enumerate(stages.heavy):
            if level.escalates and o_l.latency_s + o_h.latency_s > stages.slack_s:
                continue
            x_h = max(min_h, 1, _replicas_for(demand * level.fraction, o_h.capacity_qps))
            if stages.drain.get(k, 0.0) > 0:
                x_h = max(x_h, _replicas_for(stages.drain[k], o_h.capacity_qps))
            if x_h <= u_h and g_l * x_l + g_h * x_h <= stages.budget:
                return True
    return False


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
    """Each level's MILP (levels are the gate's thresholds and the table's rows), the best by
    (FID or threshold rank, GPUs, replica changes, latency). Paths are charged separately:
    the light-only path its light option, a routed query (router share r) its heavy option
    alone, an escalated query both; the light stage runs (1 - r) of the demand (plus explored
    prompts), the heavy stage h of it. With presolve, levels no choice of options can serve
    and levels a feasible one beats in rank are dropped first (exact)."""
    if problem.demand_qps < 0 or not math.isfinite(problem.demand_qps):
        raise AllocatorError(f"demand must be a finite number >= 0, got {problem.demand_qps}")
    if problem.heavy is not None and problem.light.defer_curve is None:
        raise AllocatorError(f"variant {problem.light.name} defers but has no deferral curve")
    objective = _primary_objective(problem)
    solver, solver_name = _pick_solver(problem.solver)
    light, heavy = problem.light, problem.heavy
    levels = (
        _levels(problem, light.defer_curve, objective)
        if heavy is not None and light.defer_curve is not None
        else []
    )
    if not any(lv.fraction == 0.0 for lv in levels):
        levels.insert(0, _Level(0.0, 0.0, len(levels), _single_fid(problem)))
    if heavy is None:
        levels = [replace(lv, rank=0) for lv in levels if lv.fraction == 0.0][:1]
    usable: list[tuple[_Level, _Stages]] = []
    if problem.presolve:
        # by rank: the first rank with a feasible level is the optimum's
        for lv in sorted(levels, key=lambda lv: lv.rank):
            if usable and lv.rank > usable[0][0].rank:
                break
            st = _stages(problem, lv)
            if st is not None and _feasible(lv, st, demand=problem.demand_qps):
                usable.append((lv, st))
    else:
        usable = [(lv, st) for lv in levels if (st := _stages(problem, lv)) is not None]
    solved = [
        found
        for lv, st in usable
        if (found := _solve_level(problem, lv, st, solver, solver_name, objective)) is not None
    ]
    if not solved:
        return _best_effort(problem, objective, solver_name)
    return min(solved, key=lambda pair: pair[0])[1]


def _stages(problem: AllocationProblem, level: _Level) -> _Stages | None:
    """The options and limits of one level; None when its paths cannot fit the SLO."""
    light, heavy = problem.light, problem.heavy
    demand = problem.demand_qps
    q_l = max(0.0, problem.queue_light_s)
    q_h = max(0.0, problem.queue_heavy_s)
    slo = problem.slo_s + LATENCY_TOLERANCE_S
    routed = level.router_share * (1.0 - problem.exploration) if level.fraction > 0 else 0.0
    escalated = max(0.0, level.fraction - routed) if level.escalates else 0.0
    tails = path_tails(
        light_only=max(0.0, level.light_share - escalated),
        routed=routed,
        escalated=escalated,
        total=problem.tail_probability,
    )
    opt_l = tuple(
        o
        for o in stage_options(
            _latency_s(light),
            problem.dispatch,
            direct_tail=tails.light_only,
            direct_s=slo - q_l,
            escalated_tail=tails.escalated_light,
        )
        if o.batch_s + q_l <= slo
    )
    if not opt_l:
        return None
    slack = slo - q_l - q_h
    opt_h: tuple[StageOption, ...] = ()
    drain: dict[int, float] = {}
    if heavy is not None and level.fraction > 0:
        fastest_l = min(o.latency_s for o in opt_l)
        candidates = [
            o
            for o in stage_options(
                _latency_s(heavy),
                problem.dispatch,
                direct_tail=tails.routed,
                direct_s=slo - q_h,
                escalated_tail=tails.escalated_heavy,
            )
            if o.batch_s + q_h <= slo and (not level.escalates or fastest_l + o.latency_s <= slack)
        ]
        rates = _drain_rates(problem, fastest_l, candidates, slack_s=slack)
        if level.escalates:
            candidates = [o for k, o in enumerate(candidates) if k in rates]
            drain = _drain_rates(problem, fastest_l, candidates, slack_s=slack)
        opt_h = tuple(candidates)
        if not opt_h:
            return None
    g_l, g_h = light.gpus_per_replica, heavy.gpus_per_replica if heavy else 0
    min_l = max(1, problem.light_bounds.minimum)
    min_h = problem.heavy_bounds.minimum if heavy is not None else 0
    if g_l > 0:
        cap_l = (problem.gpu_budget - g_h * min_h) // g_l
    else:
        slowest = min(o.capacity_qps for o in opt_l)
        cap_l = math.ceil(demand / slowest) + min_l + problem.previous.get(light.name, 0)
    u_l = _upper(problem.light_bounds, max(cap_l, 0))
    u_h = min_h
    if heavy is not None and opt_h:
        if g_h > 0:
            cap_h = (problem.gpu_budget - g_l * min_l) // g_h
        else:
            slowest = min(o.capacity_qps for o in opt_h)
            cap_h = math.ceil(demand / slowest) + min_h + problem.previous.get(heavy.name, 0)
        u_h = _upper(problem.heavy_bounds, max(cap_h, 0))
    if u_l < min_l or u_h < min_h:
        return None
    budget = problem.gpu_budget - (g_h * min_h if not opt_h else 0)
    return _Stages(
        light=opt_l,
        heavy=opt_h,
        drain=drain,
        limits_l=(g_l, min_l, u_l),
        limits_h=(g_h, min_h, u_h),
        budget=budget,
        slack_s=slack,
    )


def _solve_level(
    problem: AllocationProblem,
    level: _Level,
    stages: _Stages,
    solver: Any,
    solver_name: str,
    objective: Objective,
) -> tuple[tuple[float, ...], Allocation] | None:
    """The MILP of one level: options and replicas; (sort key, allocation) or None."""
    light, heavy = problem.light, problem.heavy
    demand = problem.demand_qps
    opt_l, opt_h = stages.light, stages.heavy
    g_l, min_l, u_l = stages.limits_l
    g_h, min_h, u_h = stages.limits_h
    prev_l = problem.previous.get(light.name, 0)
    prev_h = problem.previous.get(heavy.name, 0) if heavy is not None else 0
    c_l, c_h = _cost_units(light), _cost_units(heavy) if heavy else 0
    max_changes = u_l + u_h + prev_l + prev_h
    w_changes = 1
    w_cost = max_changes + 1
    lat_norm = 1.0 + 1.0001 * (
        max(o.latency_s for o in opt_l) + (max(o.latency_s for o in opt_h) if opt_h else 0.0)
    )

    model = pulp.LpProblem("cascade", pulp.LpMinimize)
    var = model.add_variable
    ks_l, ks_h = range(len(opt_l)), range(len(opt_h))
    x_l = {k: var(f"xl_{k}", 0, u_l, cat=pulp.LpInteger) for k in ks_l}
    y_l = {k: var(f"yl_{k}", 0, 1, cat=pulp.LpBinary) for k in ks_l}
    x_h = {k: var(f"xh_{k}", 0, u_h, cat=pulp.LpInteger) for k in ks_h}
    y_h = {k: var(f"yh_{k}", 0, 1, cat=pulp.LpBinary) for k in ks_h}
    d_l = var("dl", 0)  # |light replicas - previous|
    d_h = var("dh", 0)

    sum_xl = pulp.lpSum(x_l.values())
    sum_xh = pulp.lpSum(x_h.values())
    light_latency = pulp.lpSum(opt_l[k].latency_s * y_l[k] for k in ks_l)
    heavy_latency = pulp.lpSum(opt_h[k].latency_s * y_h[k] for k in ks_h)
    heavy_fixed = min_h if not opt_h else 0  # a level deferring nothing keeps heavy's minimum

    model += (
        w_cost * (c_l * sum_xl + c_h * sum_xh)
        + w_changes * (d_l + d_h)
        + (light_latency + heavy_latency) * (1.0 / lat_norm)
    )
    model += pulp.lpSum(y_l.values()) == 1
    for k in ks_l:
        model += x_l[k] <= u_l * y_l[k]
    model += sum_xl >= min_l
    model += pulp.lpSum(opt_l[k].capacity_qps * x_l[k] for k in ks_l) >= (
        demand * level.light_share - CAPACITY_TOLERANCE_QPS
    )
    if opt_h:
        model += pulp.lpSum(y_h.values()) == 1
        for k in ks_h:
            model += x_h[k] <= u_h * y_h[k]
        model += sum_xh >= max(min_h, 1)
        heavy_capacity = pulp.lpSum(opt_h[k].capacity_qps * x_h[k] for k in ks_h)
        model += heavy_capacity >= demand * level.fraction - CAPACITY_TOLERANCE_QPS
        if any(stages.drain.values()):
            model += heavy_capacity >= (
                pulp.lpSum(stages.drain.get(k, 0.0) * y_h[k] for k in ks_h) - CAPACITY_TOLERANCE_QPS
            )
        if level.escalates:
            model += light_latency + heavy_latency <= stages.slack_s
    model += g_l * sum_xl + g_h * sum_xh <= stages.budget
    model += d_l >= sum_xl - prev_l
    model += d_l >= prev_l - sum_xl
    model += d_h >= sum_xh + heavy_fixed - prev_h
    model += d_h >= prev_h - sum_xh - heavy_fixed

    model.solve(solver)
    if pulp.LpStatus[model.status] != "Optimal":
        return None

    def chosen(ys: Mapping[int, pulp.LpVariable]) -> int | None:
        picked = [k for k, y in ys.items() if (y.value() or 0.0) > 0.5]
        return picked[0] if picked else None

    k_l = chosen(y_l)
    assert k_l is not None
    o_l = opt_l[k_l]
    n_l = round(sum(v.value() or 0.0 for v in x_l.values()))
    q_l = max(0.0, problem.queue_light_s)
    q_h = max(0.0, problem.queue_heavy_s)
    latency = o_l.latency_s + q_l if level.light_share > 0 else 0.0
    tie_latency = o_l.latency_s
    heavy_alloc: StageAllocation | None = None
    o_h: StageOption | None = None
    n_h = heavy_fixed
    if heavy is not None:
        k_h = chosen(y_h) if opt_h else None
        if k_h is not None:
            o_h = opt_h[k_h]
            n_h = round(sum(v.value() or 0.0 for v in x_h.values()))
            latency = max(latency, o_h.latency_s + q_h)
            if level.escalates:
                latency = max(latency, o_l.latency_s + q_l + o_h.latency_s + q_h)
            tie_latency += o_h.latency_s
            b_h = o_h.batch
        else:
            b_h = _max_throughput_batch(heavy, problem.slo_s)
        heavy_alloc = StageAllocation(heavy.name, n_h, b_h)
    result = _allocation(
        problem,
        objective,
        solver_name,
        SolverStatus.OPTIMAL,
        StageAllocation(light.name, n_l, o_l.batch),
        heavy_alloc,
        level,
        latency,
        capacity=(o_l.capacity_qps, o_h.capacity_qps if o_h is not None else None),
    )
    changes = abs(n_l - prev_l) + abs(n_h - prev_h)
    key = (float(level.rank), float(c_l * n_l + c_h * n_h), float(changes), tie_latency)
    return key, result


def _drain_rates(
    problem: AllocationProblem,
    fastest_l: float,
    opt_h: Sequence[StageOption],
    *,
    slack_s: float,
) -> dict[int, float]:
    """Per heavy option (index): the heavy capacity (qps) that clears the heavy backlog in time.

    A query escalated now queues behind `backlog_heavy` images and waits backlog / capacity;
    it has the SLO minus the fastest light option, the queueing terms and its own heavy
    option left. Options that leave no time are absent (they cannot serve an escalation now).
    With capacity >= demand x f as well the queue does not grow, so no later escalation waits
    longer. Without a backlog every option maps to 0.
    """
    backlog = max(0.0, problem.backlog_heavy)
    if backlog <= 0.0:
        return {k: 0.0 for k in range(len(opt_h))}
    rates = {}
    for k, o in enumerate(opt_h):
        horizon = slack_s - fastest_l - o.latency_s
        if horizon > LATENCY_TOLERANCE_S:
            rates[k] = backlog / horizon
    return rates


def _single_fid(problem: AllocationProblem) -> float | None:
    if problem.fid_alone is not None:
        return problem.fid_alone
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
    capacity: tuple[float, float | None] | None = None,
) -> Allocation:
    """The allocation's figures; `capacity` is the per-replica rate of each stage's option
    (default: the batch's full rate, b / latency)."""
    per_l, per_h = capacity if capacity is not None else (None, None)
    if per_l is None:
        per_l = light.batch_size / _latency_s(problem.light)[light.batch_size]
    cap_l = light.replicas * per_l
    throughput = cap_l / level.light_share if level.light_share > 0 else math.inf
    if heavy is not None and problem.heavy is not None and level.fraction > 0:
        if per_h is None:
            per_h = heavy.batch_size / _latency_s(problem.heavy)[heavy.batch_size]
        cap_h = heavy.replicas * per_h
        throughput = min(throughput, cap_h / level.fraction)
    if level.row is not None:
        fid: float | None = level.row.fid
    elif problem.heavy is None:
        fid = _single_fid(problem)
    elif problem.quality is None:
        fid = level.fid if level.fraction == 0 else None
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
        router_share=level.router_share,
        row=level.row,
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
    q_l = max(0.0, problem.queue_light_s)
    options = stage_options(
        _latency_s(light),
        problem.dispatch,
        direct_tail=problem.tail_probability,
        direct_s=problem.slo_s - q_l,
    )
    fastest = min(_latency_s(light).values())
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
    best_p = max(
        (o.capacity_qps for o in options if o.batch_s + q_l <= problem.slo_s + LATENCY_TOLERANCE_S),
        default=0.0,
    )
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
    """Every variant of a cascade and what may be tried of it.

    Without a quality table the cascade is entered at its first variant (the Service every
    query hits) and `solve_cascade` tries what the drivers can route: the first variant
    deferring to each later variant, and (with `include_single`) the first variant alone.
    With `entries` (a quality table) every named variant may be the entry, alone or deferring
    to a later one; `rows` add router shares to the pairs they measure.
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
    #: A quality table's measured rows (pair, r, c -> FID): levels with a router share.
    rows: tuple[QualityRow, ...] = ()
    #: Measured FID of each variant serving alone (a quality table's single FIDs).
    single_fid: Mapping[str, float] = field(default_factory=dict)
    exploration: float = 0.0  # see AllocationProblem.exploration
    dispatch: Dispatch = Dispatch.LEAST_LOADED
    tail_probability: float = TAIL_PROBABILITY


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
    """Orders allocations of one cascade: feasible first, then by the objective, GPUs, latency.

    Among best-effort (infeasible) allocations the one that sustains the most demand comes
    first: under overload the plan that sheds least, not the best-looking one that serves
    least (HADIS falls back to its worst configuration; a heavy variant alone would be worse).
    """
    if allocation.status is SolverStatus.INFEASIBLE:
        return (1.0, -allocation.predicted_throughput_qps, float(allocation.gpus), 0.0)
    if allocation.objective is Objective.MIN_EXPECTED_FID:
        primary = allocation.predicted_fid if allocation.predicted_fid is not None else math.inf
    else:
        primary = -allocation.threshold
    return (0.0, primary, float(allocation.gpus), allocation.predicted_latency_s)


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
    A variant alone takes its measured single FID when the table has one, else its FID from
    the light end of the pair it leads, else the heavy end of the pair it closes.
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
    rows = tuple(r for r in problem.rows if r.pair == (light, heavy)) if heavy is not None else ()
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
        fid_alone=problem.single_fid.get(light),
        rows=rows,
        exploration=problem.exploration,
        dispatch=problem.dispatch,
        tail_probability=problem.tail_probability,
    )


def _others_floor(problem: CascadeProblem, used: set[str]) -> int:
    """GPUs the variants outside a candidate keep at their minimum replicas."""
    return sum(
        problem.bounds.get(v.name, ReplicaBounds()).minimum * v.gpus_per_replica
        for v in problem.variants
        if v.name not in used
    )
