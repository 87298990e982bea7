"""HADIS's controllers and baselines, as its artifact runs them, for its own benchmark (E1).

Ported from the artifact (github qizhengyang98/HADIS, MIT; `hadis/src/controller/
controller.py`, `qaware_multi_cascade_ILP.py`, `diffserve_cascade_ILP.py`, `infaas.py`,
`hadis/src/worker/model.py`, `load_balancer.py`), onto the simulator's workers:

- the controller's own bookkeeping each 1-s tick (`ClusterTick`): demand = 1.05 x the queries
  in the system (seen by a worker, not by the sink, younger than 2 x SLO), an EWMA with
  halflife 3 (`adjust=False`) over the last 20 nonzero samples; per variant the EWMAs of its
  registered arrivals and queue length over the same ticks (histories start at one 0);
- plans every 5 ticks (the scenario's 5-s interval) on the planner's latency table: the
  profile rounded to 0.1 s (`config.get_controller_runtimes`), batch sizes 1-32;
- `hadis` (`allocateByMultiCascadeAlg` + `solve_milp_loop`): one MILP per pair of the quality
  table (PuLP/HiGHS here, Gurobi there): one table row, one batch per model, integer workers;
  light throughput >= 1.0 x demand (the router's bypass is not credited), heavy throughput
  >= h x demand; latency of both models plus their queue terms (1.2 x queue / arrivals, 0
  when the queue is under 1) <= SLO; workers <= the GPU budget; minimise the row's FID, the
  lowest over pairs wins (ties to the pair met first, (2,3) then (1,2) then (0,1)). No
  demand, or no feasible pair: every worker on the table's lightest variant, batch 1, no
  routing or escalation, logged as no configuration;
- `hadis-diffserve` (`diffserve_cascade_ILP.py`): fixed pair (1,3), router off, threshold
  grid t = 0, 0.005, ..., 1 with f(t) = t (t is a percentile), light throughput >= demand,
  heavy >= t x demand, both latencies plus queue terms 1.2 x queue / arrivals (no q < 1
  guard) <= SLO, maximise t; start 9 light / 7 heavy, batch 8/8, t = 1 (again whenever the
  demand is 0); infeasible: all light, batch 16, t = 0. Solved by exact enumeration of
  batches and the grid (the same optimum as the ILP);
- `clipper-light` / `clipper-heavy`: every worker on the lightest / heaviest variant, the
  largest batch whose planner latency fits the SLO; Clipper-Heavy admits at 1.0 x SLO;
- `infaas-acc` (`infaas.py`, QUALITY_BIAS 0.5): one variant on every worker, the largest
  batch that fits; start at the best-FID variant; each plan: total queue EWMA > 60 -> the
  lightest, else expected latency (latency + 0.225 x queue / (workers x b / latency)) above
  1.0 x SLO -> one step lighter, below 0.89 x SLO -> one step heavier; no demand: workers
  round-robin over the variants, batch 1;
- `proteus` (`solve_proteus_milp`): integer workers per variant, at most one batch each,
  each batch's latency x (1 + queue term) <= SLO, capacity >= 1.25 x demand, maximise the
  FID-weighted worker count (weights 29.76 / 25.13 / 20.61 / 19.95); every worker is at the
  first level, so clients are spread evenly per worker, whatever its variant (no cascade);
  no demand or no solution: round-robin, batch 1.

Roles are given as the artifact gives them: workers in registration order, each to the
first model of the plan still short of its count (light role: router share r and
escalation share c; heavy role: c = 0); workers beyond the plan's count keep their last
role. Clients go to the lowest level any worker runs, each level forwards to the next level
present (uniformly at random per worker, the scenario's dispatch), and a query with no level
above is answered where it is. r and c are percentiles (`sim.routing`).

Differences that remain, and why:
- ties between equally good MILP solutions go to fewer workers and then lower latency
  (Gurobi returns an arbitrary one; nothing in the model prefers any); Proteus's go to more
  workers (its objective counts weighted workers) and then more capacity;
- a worker's drop check uses the latency of the batch as taken (the artifact uses the b=4
  latency for batches of 9-15 and 17-31); the 10 ms simulated discriminator per batch and
  the 1-s heartbeat lag of the controller's counts are not modelled;
- the controller counts queries in the system from the simulator's own records (arrival,
  answer, age), not from heartbeats, so a late query is never double counted;
- with r = 0 the percentile rule still marks the highest-scoring prompt hard; with no level
  above, the artifact forwards it to the sink unanswered, here the entry stage answers it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulp

from diffcascade_operator.allocator import milp_solver
from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.profiles import CascadeProfiles, QualityRow, QualityTable
from diffcascade_operator.sim.engine import ClusterTick
from diffcascade_operator.sim.model import Directive, WorkerRole
from diffcascade_operator.snapshot import Snapshot
from diffcascade_operator.spec import CascadeSpec

OVER_PROVISION = 1.05
HALFLIFE_TICKS = 3.0
EWMA_WINDOW = 20
QUEUE_SAFETY = 1.2
ALLOWED_BATCHES = (1, 2, 4, 8, 16, 32)
#: Proteus's and INFaaS's quality weights, by variant index (the controller's constants).
FID_WEIGHTS = (29.76, 25.13, 20.61, 19.95)
#: INFaaS-Acc at QUALITY_BIAS 0.5.
INFAAS_QUEUE_WEIGHT = 0.40 - 0.35 * 0.5
INFAAS_STEP_DOWN = 0.85 + 0.30 * 0.5
INFAAS_STEP_UP = 0.80 + 0.18 * 0.5
INFAAS_CRITICAL_QUEUE = int(20 + 80 * 0.5)
PROTEUS_DEMAND_WEIGHT = 1.25
DIFFSERVE_PAIR = (1, 3)
DIFFSERVE_GRID = tuple(round(0.005 * i, 4) for i in range(201))
CAPACITY_TOLERANCE = 1e-6

HADIS_POLICIES = (
    "hadis",
    "hadis-diffserve",
    "clipper-light",
    "clipper-heavy",
    "infaas-acc",
    "proteus",
)


def ewma_last(values: Sequence[float], *, halflife: float = HALFLIFE_TICKS) -> float:
    """The newest value of `pandas.Series(values).ewm(halflife=h, adjust=False).mean()`."""
    if not values:
        return 0.0
    alpha = 1.0 - math.exp(math.log(0.5) / halflife)
    out = values[0]
    for value in values[1:]:
        out = (1.0 - alpha) * out + alpha * value
    return out


def queue_delay(queue: float, arrivals: float, *, guard: bool = True) -> float:
    """1.2 x queue / arrivals (Little's law on the EWMAs); 0 with no arrivals, and with
    `guard` also when less than one query is queued (HADIS; its DiffServe port has no guard)."""
    if arrivals == 0 or (guard and queue < 1):
        return 0.0
    return QUEUE_SAFETY * queue / arrivals


def planner_latency_s(batch_latency_ms: Mapping[int, float]) -> dict[int, float]:
    """The planner's table: the profile in seconds rounded to 0.1 s, allowed batches only."""
    return {
        b: round(batch_latency_ms[b] / 1000.0, 1) for b in ALLOWED_BATCHES if b in batch_latency_ms
    }


class Bookkeeping:
    """`Controller.computeSystemEWMA`: the demand and per-variant EWMAs, one tick a second."""

    def __init__(self, stages: int) -> None:
        self.total: deque[float] = deque(maxlen=EWMA_WINDOW)
        self.arrivals = [deque([0.0], maxlen=EWMA_WINDOW) for _ in range(stages)]
        self.queues = [deque([0.0], maxlen=EWMA_WINDOW) for _ in range(stages)]
        self.system_ewma = 0.0
        self.arrival_ewma = [0.0] * stages
        self.queue_ewma = [0.0] * stages

    def observe(self, tick: ClusterTick) -> None:
        demand = tick.in_system * OVER_PROVISION
        if demand <= 0:
            return
        for k in range(len(self.arrivals)):
            self.arrivals[k].append(float(tick.arrivals[k]))
            self.queues[k].append(float(tick.queue[k]))
            self.arrival_ewma[k] = ewma_last(list(self.arrivals[k]))
            self.queue_ewma[k] = ewma_last(list(self.queues[k]))
        self.total.append(demand)
        self.system_ewma = ewma_last(list(self.total))


# --- the HADIS MILP ------------------------------------------------------------------------


@dataclass(frozen=True)
class HadisSolution:
    row: QualityRow
    light: int  # variant index
    heavy: int
    light_batch: int
    heavy_batch: int
    light_workers: int
    heavy_workers: int
    latency_s: float


def solve_pair(
    rows: Sequence[QualityRow],
    *,
    light: int,
    heavy: int,
    lat_light: Mapping[int, float],
    lat_heavy: Mapping[int, float],
    queue_s: float,
    demand: float,
    workers: int,
    slo_s: float,
) -> HadisSolution | None:
    """One pair's MILP (`solve_milp_loop`'s loop body); None when it is infeasible.

    Lexicographic objective: the row's FID (rank), then fewer workers, then lower latency.
    """
    if not rows:
        return None
    ranked = sorted(range(len(rows)), key=lambda k: (rows[k].fid, k))
    rank = {k: i for i, k in enumerate(ranked)}
    w_gpu = 1.0 / (workers + 1)
    lat_norm = 1.0 + 2.0 * (max(lat_light.values()) + max(lat_heavy.values()))
    w_lat = w_gpu / (workers + 1) / lat_norm
    model = pulp.LpProblem("hadis_pair", pulp.LpMinimize)
    yl = {b: model.add_variable(f"yl_{b}", 0, 1, cat=pulp.LpBinary) for b in lat_light}
    yh = {b: model.add_variable(f"yh_{b}", 0, 1, cat=pulp.LpBinary) for b in lat_heavy}
    xl = {b: model.add_variable(f"xl_{b}", 0, workers, cat=pulp.LpInteger) for b in lat_light}
    xh = {b: model.add_variable(f"xh_{b}", 0, workers, cat=pulp.LpInteger) for b in lat_heavy}
    z = {k: model.add_variable(f"z_{k}", 0, 1, cat=pulp.LpBinary) for k in range(len(rows))}
    total = pulp.lpSum(xl.values()) + pulp.lpSum(xh.values())
    latency = pulp.lpSum(lat_light[b] * yl[b] for b in yl) + pulp.lpSum(
        lat_heavy[b] * yh[b] for b in yh
    )
    model += pulp.lpSum(rank[k] * z[k] for k in z) + w_gpu * total + w_lat * latency
    model += pulp.lpSum(yl.values()) == 1
    model += pulp.lpSum(yh.values()) == 1
    model += pulp.lpSum(z.values()) == 1
    for b in yl:
        model += xl[b] <= workers * yl[b]
    for b in yh:
        model += xh[b] <= workers * yh[b]
    model += total <= workers
    model += pulp.lpSum((b / lat_light[b]) * xl[b] for b in xl) >= demand - CAPACITY_TOLERANCE
    model += pulp.lpSum((b / lat_heavy[b]) * xh[b] for b in xh) >= (
        demand * pulp.lpSum(round(rows[k].heavy_share, 2) * z[k] for k in z) - CAPACITY_TOLERANCE
    )
    model += latency + queue_s <= slo_s + 1e-9
    model.solve(milp_solver())
    if pulp.LpStatus[model.status] != "Optimal":
        return None

    def picked(ys: Mapping[int, pulp.LpVariable]) -> int:
        return next(b for b, y in ys.items() if (y.value() or 0.0) > 0.5)

    k = next(k for k, v in z.items() if (v.value() or 0.0) > 0.5)
    b_l, b_h = picked(yl), picked(yh)
    return HadisSolution(
        row=rows[k],
        light=light,
        heavy=heavy,
        light_batch=b_l,
        heavy_batch=b_h,
        light_workers=round(sum(v.value() or 0.0 for v in xl.values())),
        heavy_workers=round(sum(v.value() or 0.0 for v in xh.values())),
        latency_s=lat_light[b_l] + lat_heavy[b_h],
    )


def table_pairs(table: QualityTable, names: Sequence[str]) -> list[tuple[int, int]]:
    """The pairs in `solve_milp_loop`'s order: groupby over the binary model masks, sorted
    ascending, which visits (2,3) before (1,2) before (0,1)."""
    pairs = {(names.index(r.light), names.index(r.heavy)) for r in table.rows}
    mask = {p: tuple(1 if i in p else 0 for i in range(len(names))) for p in pairs}
    return sorted(pairs, key=lambda p: mask[p])


def solve_hadis(
    table: QualityTable,
    names: Sequence[str],
    latencies: Sequence[Mapping[int, float]],
    *,
    demand: float,
    queue_s: Sequence[float],
    workers: int,
    slo_s: float,
) -> HadisSolution | None:
    """`solve_milp_loop`: the best pair's solution, or None (no demand, nothing feasible)."""
    if demand <= 0:
        return None
    best: HadisSolution | None = None
    for light, heavy in table_pairs(table, names):
        rows = [r for r in table.rows if (r.light, r.heavy) == (names[light], names[heavy])]
        solution = solve_pair(
            rows,
            light=light,
            heavy=heavy,
            lat_light=latencies[light],
            lat_heavy=latencies[heavy],
            queue_s=queue_s[light] + queue_s[heavy],
            demand=demand,
            workers=workers,
            slo_s=slo_s,
        )
        if solution is not None and (best is None or solution.row.fid < best.row.fid):
            best = solution
    return best


# --- roles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Assignment:
    stage: int
    batch: int
    light_role: bool  # is_lightweight: router share r and escalation share c apply


def assign_in_order(
    current: Sequence[_Assignment | None], required: Sequence[tuple[int, int, int]]
) -> list[_Assignment | None]:
    """Walk the workers in registration order; each takes the first model of `required`
    (stage, count, batch) still short of its count, the first listed taking the light role
    (a model before the last in the list); a worker with nothing left keeps its role."""
    remaining = [count for _, count, _ in required]
    out = list(current)
    for k in range(len(out)):
        for idx, (stage, _, batch) in enumerate(required):
            if remaining[idx] > 0:
                out[k] = _Assignment(stage, batch, idx < len(required) - 1)
                remaining[idx] -= 1
                break
    return out


def _roles(
    assignments: Sequence[_Assignment | None],
    names: Sequence[str],
    *,
    escalate: float,
    router: float | None,
    first_level_only: bool = False,
) -> tuple[tuple[WorkerRole, ...], str]:
    """Worker roles with the load balancer's routes: clients go to the lowest level present,
    each level forwards to the next level present (none: the worker answers itself)."""
    levels = sorted({a.stage for a in assignments if a is not None})
    roles = []
    for a in assignments:
        assert a is not None, "every worker has a role after the first plan"
        above = [lv for lv in levels if lv > a.stage]
        nxt = None if first_level_only or not above else names[above[0]]
        roles.append(
            WorkerRole(
                stage=names[a.stage],
                batch_size=a.batch,
                escalate_share=escalate if a.light_role else 0.0,
                router_share=router if a.light_role else None,
                next_stage=nxt,
            )
        )
    return tuple(roles), names[levels[0]]


def _plan(
    spec: CascadeSpec,
    roles: Sequence[WorkerRole],
    *,
    entry: str,
    demand: float,
    now: float,
    threshold: float,
    router_share: float,
    row: QualityRow | None,
    predicted_fid: float | None,
    status: SolverStatus,
    solve_ms: float,
    reason: str,
) -> Plan:
    counts: dict[str, int] = {}
    batches: dict[str, int] = {}
    nexts: dict[str, str | None] = {}
    for role in roles:
        counts[role.stage] = counts.get(role.stage, 0) + 1
        batches.setdefault(role.stage, role.batch_size)
        nexts.setdefault(role.stage, role.next_stage)
    last = spec.variants[-1].name
    variants = tuple(
        VariantAllocation(
            name=v.name,
            replicas=counts.get(v.name, 0),
            batch_size=batches.get(v.name, 1),
            threshold=None if v.name == last else (threshold if v.name == entry else 0.0),
            next_stage=nexts.get(v.name),
        )
        for v in spec.variants
    )
    return Plan(
        variants=variants,
        threshold=threshold,
        defer_fraction=threshold,
        demand_qps=demand,
        predicted_latency_s=0.0,
        predicted_throughput_qps=0.0,
        predicted_fid=predicted_fid,
        solver=SolverOutcome(status=status, solve_ms=solve_ms),
        reason=reason,
        decided_at=now,
        entry_stage=entry,
        router_share=router_share,
        row=row,
    )


class _ArtifactPolicy:
    """Shared by the ports: the bookkeeping tick and the per-worker role state."""

    degrade = False
    admission_factor = 1.5  # HADIS's workers start a query until 1.5 x SLO
    entry_stages: tuple[str, ...] | None = None
    live_profiles = False

    def __init__(self, *, name: str, spec: CascadeSpec, profiles: CascadeProfiles) -> None:
        self.name = name
        self.spec = spec
        self.profiles = profiles
        self.names = [v.name for v in spec.variants]
        self.workers = spec.gpu_budget
        self.slo = spec.slo_seconds
        self.latency = [planner_latency_s(v.batch_latency_ms) for v in profiles.variants]
        self.book = Bookkeeping(len(self.names))
        self.assigned: list[_Assignment | None] = [None] * self.workers
        self.table = profiles.table
        self.quality = profiles.quality

    def observe_cluster(self, tick: ClusterTick) -> None:
        self.book.observe(tick)

    def largest_fitting_batch(self, stage: int) -> int | None:
        fitting = [b for b in ALLOWED_BATCHES if self.latency[stage].get(b, math.inf) <= self.slo]
        return fitting[-1] if fitting else None


class HadisPolicy(_ArtifactPolicy):
    """`hadis`: `allocateByMultiCascadeAlg` with `solve_milp_loop` (see the module doc)."""

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        table = self.table
        assert table is not None
        demand = self.book.system_ewma
        queue = [
            queue_delay(q, a)
            for q, a in zip(self.book.queue_ewma, self.book.arrival_ewma, strict=True)
        ]
        started = time.perf_counter()
        solution = solve_hadis(
            table,
            self.names,
            self.latency,
            demand=demand,
            queue_s=queue,
            workers=self.workers,
            slo_s=self.slo,
        )
        solve_ms = (time.perf_counter() - started) * 1000.0
        if solution is not None:
            required = [
                (solution.light, solution.light_workers, solution.light_batch),
                (solution.heavy, solution.heavy_workers, solution.heavy_batch),
            ]
            row: QualityRow | None = solution.row
            escalate, router = solution.row.escalate_share, solution.row.router_share
            status = SolverStatus.OPTIMAL
            reason = (
                f"demand {demand:.1f} (1.05 x in system) -> {solution.row.pair} "
                f"r={router:g} c={escalate:g} FID {solution.row.fid:g}; workers "
                f"{solution.light_workers}/{solution.heavy_workers} b{solution.light_batch}/"
                f"{solution.heavy_batch}"
            )
        else:
            lightest = min(self.names.index(n) for r in table.rows for n in r.pair)
            required = [(lightest, self.workers, 1)] + [
                (k, 0, 1) for k in range(len(self.names)) if k != lightest
            ]
            row, escalate, router = None, 0.0, 0.0
            status = SolverStatus.INFEASIBLE if demand > 0 else SolverStatus.INITIAL
            reason = (
                f"demand {demand:.1f}: no feasible pair, every worker on {self.names[lightest]}"
            )
        self.assigned = assign_in_order(self.assigned, required)
        roles, entry = _roles(self.assigned, self.names, escalate=escalate, router=router)
        fid = row.fid if row is not None else table.worst().fid
        plan = _plan(
            self.spec,
            roles,
            entry=entry,
            demand=demand,
            now=snapshot.now,
            threshold=escalate,
            router_share=router,
            row=row,
            predicted_fid=fid,
            status=status,
            solve_ms=solve_ms,
            reason=reason,
        )
        return Directive(plan=plan, roles=roles, solved=demand > 0)


class HadisDiffServePolicy(_ArtifactPolicy):
    """`hadis-diffserve`: the artifact's DiffServe port (`diffserve_cascade_ILP.py`)."""

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        light, heavy = DIFFSERVE_PAIR
        demand = self.book.system_ewma
        started = time.perf_counter()
        if previous is None or demand <= 0:
            x1 = math.ceil((self.workers + 1) / 2)
            x2, b1, b2, t = self.workers - x1, 8, 8, 1.0
            status, reason = SolverStatus.INITIAL, "start: 9 light / 7 heavy, b8/8, t=1"
        else:
            queue = [
                queue_delay(q, a, guard=False)
                for q, a in zip(self.book.queue_ewma, self.book.arrival_ewma, strict=True)
            ]
            found = self.solve(demand, queue[light] + queue[heavy])
            if found is None:
                x1, x2, b1, b2, t = self.workers, 0, 16, 1, 0.0
                status = SolverStatus.INFEASIBLE
                reason = f"demand {demand:.1f}: infeasible, all light"
            else:
                x1, x2, b1, b2, t = found
                status = SolverStatus.OPTIMAL
                reason = f"demand {demand:.1f} -> t={t:g}, {x1}/{x2} workers, b{b1}/{b2}"
        solve_ms = (time.perf_counter() - started) * 1000.0
        self.assigned = assign_in_order(self.assigned, [(light, x1, b1), (heavy, x2, b2)])
        roles, entry = _roles(self.assigned, self.names, escalate=t, router=None)
        plan = _plan(
            self.spec,
            roles,
            entry=entry,
            demand=demand,
            now=snapshot.now,
            threshold=t,
            router_share=0.0,
            row=None,
            predicted_fid=None,
            status=status,
            solve_ms=solve_ms,
            reason=reason,
        )
        return Directive(plan=plan, roles=roles, solved=status is not SolverStatus.INITIAL)

    def solve(self, demand: float, queue_s: float) -> tuple[int, int, int, int, float] | None:
        """Max t, then fewest workers, then lowest latency, over batches and the t grid."""
        light, heavy = DIFFSERVE_PAIR
        best: tuple[tuple[float, int, float], tuple[int, int, int, int, float]] | None = None
        for b1, l1 in self.latency[light].items():
            x1 = math.ceil(demand * l1 / b1 - 1e-9)
            if x1 > self.workers:
                continue
            for b2, l2 in [(None, 0.0), *self.latency[heavy].items()]:
                if l1 + l2 + queue_s > self.slo + 1e-9:
                    continue
                room = self.workers - x1
                if b2 is None:
                    t, x2 = 0.0, 0
                else:
                    t_max = min(1.0, room * b2 / l2 / demand)
                    t = max(v for v in DIFFSERVE_GRID if v <= t_max + 1e-12)
                    x2 = math.ceil(demand * t * l2 / b2 - 1e-9)
                key = (-t, x1 + x2, l1 + l2)
                if best is None or key < best[0]:
                    best = (key, (x1, x2, b1, b2 or 1, t))
        return best[1] if best is not None else None


class ClipperPolicy(_ArtifactPolicy):
    """`clipper-light` / `clipper-heavy`: every worker on one variant, no cascade."""

    stage = 0

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        batch = self.largest_fitting_batch(self.stage) or 1
        self.assigned = [_Assignment(self.stage, batch, False)] * self.workers
        roles, entry = _roles(self.assigned, self.names, escalate=0.0, router=None)
        plan = _plan(
            self.spec,
            roles,
            entry=entry,
            demand=self.book.system_ewma,
            now=snapshot.now,
            threshold=0.0,
            router_share=0.0,
            row=None,
            predicted_fid=None,
            status=SolverStatus.HELD,
            solve_ms=0.0,
            reason=f"{self.name}: every worker on {self.names[self.stage]}, batch {batch}",
        )
        return Directive(plan=plan, roles=roles)


class _FirstLevelPolicy(_ArtifactPolicy):
    """INFaaS and Proteus: every worker at the first level, so clients spread per worker."""

    def _directive(
        self,
        required: list[tuple[int, int, int]],
        snapshot: Snapshot,
        status: SolverStatus,
        solve_ms: float,
        reason: str,
    ) -> Directive:
        self.assigned = assign_in_order(self.assigned, required)
        # conf_thres 1.0 with no level above: every worker answers its own queries
        roles, entry = _roles(
            self.assigned, self.names, escalate=0.0, router=None, first_level_only=True
        )
        self.entry_stages = tuple(dict.fromkeys(r.stage for r in roles))
        plan = _plan(
            self.spec,
            roles,
            entry=entry,
            demand=self.book.system_ewma,
            now=snapshot.now,
            threshold=0.0,
            router_share=0.0,
            row=None,
            predicted_fid=None,
            status=status,
            solve_ms=solve_ms,
            reason=reason,
        )
        return Directive(
            plan=plan,
            roles=roles,
            solved=status is SolverStatus.OPTIMAL,
            entry_stages=self.entry_stages,
        )

    def round_robin(self) -> list[tuple[int, int, int]]:
        counts = [0] * len(self.names)
        for k in range(self.workers):
            counts[k % len(self.names)] += 1
        return [(k, counts[k], 1) for k in range(len(self.names))]


class InfaasPolicy(_FirstLevelPolicy):
    """`infaas-acc`: `solve_infaas_accuracy` (see the module doc)."""

    def __init__(self, *, name: str, spec: CascadeSpec, profiles: CascadeProfiles) -> None:
        super().__init__(name=name, spec=spec, profiles=profiles)
        # by FID weight, best first: the heaviest variant is index 0
        self.by_fid = sorted(range(len(self.names)), key=lambda k: FID_WEIGHTS[k])
        self.current = 0

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        demand = self.book.system_ewma
        choice = self.step() if demand > 0 else None
        if choice is None:
            return self._directive(
                self.round_robin(), snapshot, SolverStatus.INITIAL, 0.0, "no demand: round-robin"
            )
        stage, batch, why = choice
        required = [(stage, self.workers, batch)] + [
            (k, 0, 1) for k in range(len(self.names)) if k != stage
        ]
        return self._directive(required, snapshot, SolverStatus.OPTIMAL, 0.0, why)

    def step(self) -> tuple[int, int, str] | None:
        worst = len(self.by_fid) - 1
        model = self.by_fid[self.current]
        batch = self.largest_fitting_batch(model)
        if batch is None:
            self.current = min(self.current + 1, worst)
            model = self.by_fid[self.current]
            batch = self.largest_fitting_batch(model)
            if batch is None:
                return None
        queue = sum(self.book.queue_ewma)
        lat = self.latency[model][batch]
        expected = lat + INFAAS_QUEUE_WEIGHT * queue / (self.workers * batch / lat)
        if queue > INFAAS_CRITICAL_QUEUE:
            self.current = worst
        elif expected > self.slo * INFAAS_STEP_DOWN:
            self.current = min(self.current + 1, worst)
        elif expected < self.slo * INFAAS_STEP_UP:
            self.current = max(self.current - 1, 0)
        model = self.by_fid[self.current]
        batch = self.largest_fitting_batch(model)
        if batch is None:
            return None
        return model, batch, f"queue {queue:.1f}, expected {expected:.2f} s -> {self.names[model]}"


class ProteusPolicy(_FirstLevelPolicy):
    """`proteus`: `solve_proteus_milp`, query-agnostic (see the module doc)."""

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        demand = self.book.system_ewma
        started = time.perf_counter()
        solved = self.solve(demand) if demand > 0 else None
        solve_ms = (time.perf_counter() - started) * 1000.0
        if solved is None:
            return self._directive(
                self.round_robin(), snapshot, SolverStatus.INFEASIBLE, solve_ms, "round-robin"
            )
        # the controller walks `device_allocation`, keyed by model names in sorted order
        order = sorted(range(len(self.names)), key=lambda k: _ARTIFACT_NAMES[k])
        required = [(k, solved[k][0], solved[k][1]) for k in order]
        return self._directive(required, snapshot, SolverStatus.OPTIMAL, solve_ms, "proteus")

    def solve(self, demand: float) -> dict[int, tuple[int, int]] | None:
        fmax, fmin = max(FID_WEIGHTS), min(FID_WEIGHTS)
        weight = [(fmax - f) / (fmax - fmin + 1e-9) for f in FID_WEIGHTS]
        model = pulp.LpProblem("proteus", pulp.LpMaximize)
        y: dict[tuple[int, int], pulp.LpVariable] = {}
        w: dict[tuple[int, int], pulp.LpVariable] = {}
        capacity = []
        for i in range(len(self.names)):
            qd = 0.0
            if self.book.arrival_ewma[i] != 0:
                qd = QUEUE_SAFETY * self.book.queue_ewma[i] / self.book.arrival_ewma[i]
            for b, lat in self.latency[i].items():
                if lat * (1.0 + qd) > self.slo:
                    continue
                y[i, b] = model.add_variable(f"y_{i}_{b}", 0, 1, cat=pulp.LpBinary)
                w[i, b] = model.add_variable(f"w_{i}_{b}", 0, self.workers, cat=pulp.LpInteger)
                model += w[i, b] <= self.workers * y[i, b]
                model += w[i, b] >= y[i, b]
                capacity.append(w[i, b] * (b / lat))
            model += pulp.lpSum(y[k] for k in y if k[0] == i) <= 1
        total = pulp.lpSum(w.values())
        model += total <= self.workers
        model += pulp.lpSum(capacity) >= PROTEUS_DEMAND_WEIGHT * demand
        # lexicographic: the weighted worker count (in 1e-6 units), then more workers, then
        # more capacity (Gurobi's tie-break is arbitrary)
        quality = pulp.lpSum(round(weight[i] * 1e6) * w[i, b] for i, b in w)
        most = self.workers * max(b / lat for lats in self.latency for b, lat in lats.items())
        model += (
            quality
            + pulp.lpSum(w.values()) * (1.0 / (self.workers + 1))
            + pulp.lpSum(capacity) * (1.0 / ((self.workers + 1) * (most + 1.0)))
        )
        model.solve(milp_solver())
        if pulp.LpStatus[model.status] != "Optimal":
            return None
        out = {i: (0, 1) for i in range(len(self.names))}
        for (i, b), var in w.items():
            count = round(var.value() or 0.0)
            if count > 0:
                out[i] = (count, b)
        return out


#: The artifact's model names in its order (Proteus's allocation dict is sorted by them).
_ARTIFACT_NAMES = ("sdxlltn", "sd35turbo", "sd35med", "sd35large")


def make_hadis_policy(
    name: str, *, spec: CascadeSpec, profiles: CascadeProfiles
) -> _ArtifactPolicy:
    if len(spec.variants) != len(_ARTIFACT_NAMES):
        raise ValueError("the HADIS ports run the four-variant hadis-sd35 scenario")
    if name == "hadis":
        if profiles.table is None:
            raise ValueError("the hadis policy needs spec.qualityTable")
        return HadisPolicy(name=name, spec=spec, profiles=profiles)
    if name == "hadis-diffserve":
        return HadisDiffServePolicy(name=name, spec=spec, profiles=profiles)
    if name in ("clipper-light", "clipper-heavy"):
        policy = ClipperPolicy(name=name, spec=spec, profiles=profiles)
        policy.stage = len(policy.names) - 1 if name == "clipper-heavy" else 0
        if name == "clipper-heavy":
            policy.admission_factor = 1.0  # SLO_ADMISSION_FACTOR: Clipper-Heavy only
        return policy
    if name == "infaas-acc":
        return InfaasPolicy(name=name, spec=spec, profiles=profiles)
    if name == "proteus":
        return ProteusPolicy(name=name, spec=spec, profiles=profiles)
    raise ValueError(f"unknown HADIS policy {name!r}")
