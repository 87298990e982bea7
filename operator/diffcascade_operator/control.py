"""`decide()`: the control policy, a pure function of a snapshot and the previous plan.

Every rule lives here, in one place, like Ray Serve's autoscaling policy: pause and missing
metrics hold the previous plan; demand is estimated; the entry stage's queue becomes a
Little's-law waiting time and a deferred-to stage's queue a backlog its planned capacity must
drain in time; the allocator solves; hysteresis scales up at once and down only after a
stabilisation window; bounds and the GPU budget are enforced last; the threshold and batch
sizes are re-solved for the replicas that actually serve now (held ones, not starting ones).
The Kubernetes operator, the one-machine mode and the simulator all call this function, so
they behave alike.

Determinism: the decision depends only on the arguments (time comes from the snapshot).
`solve_ms` is measured with a wall clock and reported, but never decides anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from diffcascade_operator.allocator import (
    Allocation,
    AllocationProblem,
    AllocatorError,
    CascadeProblem,
    ReplicaBounds,
    pair_problem,
    solve,
    solve_cascade,
)
from diffcascade_operator.demand import DemandEstimate, estimate_demand
from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.profiles import CascadeProfiles, VariantProfile, batch_latency_ms
from diffcascade_operator.queueing import Dispatch, steady_queue
from diffcascade_operator.snapshot import MAX_QPS, MAX_QUEUE_DEPTH, Snapshot
from diffcascade_operator.spec import (
    MAX_BATCH_LATENCY_MS,
    MAX_REPLICAS,
    MIN_BATCH_LATENCY_MS,
    CascadeSpec,
    Objective,
)

#: While the plan in force was made before any reading (status Initial), the drivers step
#: this often instead of every interval: load already arriving is planned for one scrape
#: after the first reading, not an interval later (a cascade started, or an operator
#: restarted, under load).
FIRST_READING_POLL_S = 1.0
#: Below this arrival rate (qps) a stage's queue says nothing about waiting time.
MIN_ARRIVAL_QPS = 1e-6


# --- inputs ------------------------------------------------------------------------------------


def queue_terms(
    snapshot: Snapshot, *, excess: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Little's law per stage: waiting time = queue depth / arrival rate, capped at the SLO.

    Example: 6 images queued at a stage receiving 12 qps wait about 0.5 s. A stage with no
    arrivals contributes 0 (its queue, if any, is not a rate problem). `excess` replaces a
    stage's queue depth (the part not planned for already, see `queue_inputs`).
    """
    slo = snapshot.spec.slo_seconds
    terms: dict[str, float] = {}
    for name, stage in snapshot.stages.items():
        depth = _plausible(stage.queue_depth, MAX_QUEUE_DEPTH)
        if excess is not None:
            depth = excess.get(name, depth)
        rate = _plausible(stage.arrival_qps, MAX_QPS)
        if rate > MIN_ARRIVAL_QPS and depth > 0:
            terms[name] = min(slo, depth / rate)
        else:
            terms[name] = 0.0
    return terms


def _plausible(value: float, limit: float) -> float:
    """A queue or rate number to plan with: one no source could have measured (not finite,
    negative, beyond the reading bounds of `snapshot`) counts as 0."""
    return value if 0.0 <= value <= limit else 0.0


def queue_inputs(
    snapshot: Snapshot, entry: str | None = None, *, previous: Plan | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """What the allocator is told about queues: (waiting time by stage, backlog by stage).

    The entry stage keeps the Little's-law waiting time: every query passes it, and its
    arrival rate is the demand. A stage that receives deferrals reports its queue as a
    backlog instead: work the planned capacity must drain in time. Its Little's-law time
    (queue / arrival rate) ignores how much capacity the plan gives the stage, so a short
    burst made deferral look impossible exactly when the heavy stage needed its full batch
    size to catch up (and, with scale-down at once, stranded the queued deferrals).

    Under random dispatch a stage always holds some queue (`queueing.steady_queue` at the
    utilisation `previous` runs it at), which the allocator's waiting allowances already
    plan for; only the queue beyond it is a backlog or a waiting time.
    """
    excess = _excess_queues(snapshot, previous)
    terms = queue_terms(snapshot, excess=excess)
    entry = entry if entry is not None else snapshot.spec.variants[0].name
    backlog: dict[str, float] = {}
    for name, stage in snapshot.stages.items():
        if name != entry:
            terms[name] = 0.0
            backlog[name] = excess.get(name, _plausible(stage.queue_depth, MAX_QUEUE_DEPTH))
    return terms, backlog


def _excess_queues(snapshot: Snapshot, previous: Plan | None) -> dict[str, float]:
    """Per stage, its queue beyond what random dispatch keeps at the previous plan's
    utilisation (the whole queue under queue-aware dispatch or without a previous plan)."""
    out = {
        name: _plausible(stage.queue_depth, MAX_QUEUE_DEPTH)
        for name, stage in snapshot.stages.items()
    }
    if snapshot.dispatch is not Dispatch.RANDOM or previous is None:
        return out
    batches = {v.name: v.batch_size for v in previous.variants}
    for profile in snapshot.profiles.variants:
        stage = snapshot.stages.get(profile.name)
        replicas = snapshot.ready_replicas.get(profile.name, 0)
        batch = batches.get(profile.name)
        if stage is None or replicas <= 0 or batch is None:
            continue
        per_image = batch_latency_ms(profile.batch_latency_ms, batch) / 1000.0 / batch
        rho = _plausible(stage.arrival_qps, MAX_QPS) * per_image / replicas
        out[profile.name] = max(0.0, out[profile.name] - steady_queue(rho, replicas))
    return out


def replica_bounds(spec: CascadeSpec) -> dict[str, ReplicaBounds]:
    """The spec's bounds; without maxReplicas, the spec's ceiling (the GPU budget bounds it too)."""
    return {
        v.name: ReplicaBounds(
            v.min_replicas, v.max_replicas if v.max_replicas is not None else MAX_REPLICAS
        )
        for v in spec.variants
    }


def _gpus(spec: CascadeSpec) -> dict[str, int]:
    return {v.name: v.gpus_per_replica for v in spec.variants}


def _cascade_problem(
    spec: CascadeSpec,
    profiles: CascadeProfiles,
    *,
    demand_qps: float,
    queue_s: Mapping[str, float],
    previous: Mapping[str, int],
    backlog: Mapping[str, float] | None = None,
    dispatch: Dispatch = Dispatch.LEAST_LOADED,
) -> CascadeProblem:
    """The whole cascade as one problem. With a quality table: every variant may be the
    entry, alone or deferring to any later one, priced by the table's discriminator-only pair
    curves and measured single FIDs, and (with a router that routes) by its rows with a
    router share r; the entry stage is charged (1 - r) of the demand, each path its stages."""
    table = profiles.table
    router = spec.router
    routes = router is not None and router.routes()
    rows = (
        () if table is None else tuple(row for row in table.rows if routes or not row.router_share)
    )
    return CascadeProblem(
        variants=profiles.variants,
        demand_qps=demand_qps,
        slo_s=spec.slo_seconds,
        gpu_budget=spec.gpu_budget,
        objective=spec.objective,
        quality=profiles.quality,
        pair_quality=dict(table.pair_curves) if table is not None else {},
        queue_s=queue_s,
        backlog=backlog or {},
        bounds=replica_bounds(spec),
        previous=previous,
        # Beyond a pair the first variant alone is a cascade of its own (with two variants it
        # is the pair's defer-nothing option already).
        include_single=len(profiles.variants) > 2,
        # With a quality table the plan may enter at any variant (the router sends arrivals
        # to the plan's entry stage).
        entries=tuple(v.name for v in profiles.variants) if table is not None else None,
        rows=rows,
        single_fid=dict(table.single) if table is not None else {},
        exploration=router.effective_exploration() if router is not None and routes else 0.0,
        dispatch=dispatch,
    )


# --- plans -------------------------------------------------------------------------------------


def _default_batch(profile: VariantProfile) -> int:
    table = profile.batch_latency_ms
    return max(table, key=lambda b: (b / table[b], -b))


def _variants(
    profiles: CascadeProfiles,
    allocation: Allocation,
    replicas: Mapping[str, int],
    previous: Plan | None,
) -> tuple[VariantAllocation, ...]:
    batches = {allocation.light.name: allocation.light.batch_size}
    if allocation.heavy is not None:
        batches[allocation.heavy.name] = allocation.heavy.batch_size
    prev_batch = {v.name: v.batch_size for v in previous.variants} if previous else {}
    last = profiles.variants[-1].name
    out = []
    for profile in profiles.variants:
        name = profile.name
        next_stage: str | None = None
        if name == allocation.light.name and allocation.heavy is not None:
            threshold: float | None = allocation.threshold
            next_stage = allocation.heavy.name
        elif name == last:
            threshold = None
        else:
            threshold = 0.0  # outside the chosen cascade, or serving alone: keep what it gets
        batch = batches.get(name) or prev_batch.get(name) or _default_batch(profile)
        out.append(VariantAllocation(name, replicas.get(name, 0), batch, threshold, next_stage))
    return tuple(out)


def _objective_value(allocation: Allocation) -> float | None:
    if allocation.objective is Objective.MIN_EXPECTED_FID:
        return allocation.predicted_fid
    return allocation.threshold


def _describe(
    variants: tuple[VariantAllocation, ...], allocation: Allocation, estimate: DemandEstimate | None
) -> str:
    parts = []
    if estimate is not None:
        arrow = " (step)" if estimate.step else " (↑ trend)" if estimate.rising else ""
        parts.append(f"demand {estimate.qps:.1f} qps{arrow} → ")
    if allocation.row is not None or allocation.router_share > 0:
        pair = allocation.light.name + (
            f"→{allocation.heavy.name}"
            if allocation.heavy is not None and allocation.defer_fraction > 0
            else ""
        )
        parts.append(f"{pair} r={allocation.router_share:.2g} ")
    parts.append(f"t={allocation.threshold:.3g} f={allocation.defer_fraction:.2f} ")
    parts.append(", ".join(f"{v.name} x{v.replicas} b{v.batch_size}" for v in variants))
    if allocation.predicted_fid is not None:
        parts.append(f", FID {allocation.predicted_fid:.1f}")
    return "".join(parts)


def _plan(
    *,
    profiles: CascadeProfiles,
    allocation: Allocation,
    replicas: Mapping[str, int],
    status: SolverStatus,
    solve_ms: float,
    estimate: DemandEstimate | None,
    demand_qps: float,
    now: float,
    previous: Plan | None,
    scale_down_since: Mapping[str, float],
    notes: tuple[str, ...] = (),
) -> Plan:
    variants = _variants(profiles, allocation, replicas, previous)
    summary = _describe(variants, allocation, estimate)
    if status is SolverStatus.INFEASIBLE:
        tail = f"infeasible ({allocation.message}): best effort, all light"
    elif status is SolverStatus.INITIAL:
        tail = "initial plan, no demand seen yet"
    else:
        tail = f"solved {status.value.lower()} in {solve_ms:.0f} ms"
    reason = "; ".join((summary, *notes, tail))
    entry = allocation.light.name if profiles.table is not None else None
    return Plan(
        variants=variants,
        threshold=allocation.threshold,
        defer_fraction=allocation.defer_fraction,
        demand_qps=demand_qps,
        predicted_latency_s=allocation.predicted_latency_s,
        predicted_throughput_qps=allocation.predicted_throughput_qps,
        predicted_fid=allocation.predicted_fid,
        solver=SolverOutcome(
            status=status,
            solve_ms=solve_ms,
            objective_value=_objective_value(allocation),
            message=allocation.message or f"{allocation.solver}, objective {allocation.objective}",
        ),
        reason=reason,
        decided_at=now,
        scale_down_since=dict(scale_down_since),
        entry_stage=entry,
        router_share=allocation.router_share,
        row=allocation.row,
    )


def initial_plan(
    spec: CascadeSpec,
    profiles: CascadeProfiles,
    now: float,
    dispatch: Dispatch = Dispatch.LEAST_LOADED,
) -> Plan:
    """The plan before any demand is seen: minimum replicas (at least one to enter the cascade
    and one for the stage receiving deferrals), threshold at the objective's optimum if it fits.
    """
    problem = unusable_profiles(profiles)
    if problem is not None:
        return fallback_plan(spec, now, f"cannot plan: {problem}")
    try:
        result = solve_cascade(
            _cascade_problem(
                spec, profiles, demand_qps=0.0, queue_s={}, previous={}, dispatch=dispatch
            )
        )
    except Exception as exc:  # a plan that cannot be solved is a status, never a crash
        return fallback_plan(spec, now, f"cannot plan: {_error_text(exc)}")
    best = result.best
    status = SolverStatus.INITIAL if best.status is SolverStatus.OPTIMAL else best.status
    return _plan(
        profiles=profiles,
        allocation=best,
        replicas=_with_minimums(spec, best.replicas()),
        status=status,
        solve_ms=result.solve_ms,
        estimate=None,
        demand_qps=0.0,
        now=now,
        previous=None,
        scale_down_since={},
    )


def fallback_plan(spec: CascadeSpec, now: float, why: str) -> Plan:
    """The plan when none can be solved and none is held: minimum replicas, one entry replica
    if the bounds and the budget allow it, nothing deferred; status Failed, saying why."""
    replicas = {v.name: v.min_replicas for v in spec.variants}
    entry = spec.variants[0]
    used = sum(v.min_replicas * v.gpus_per_replica for v in spec.variants)
    if (
        replicas[entry.name] == 0
        and (entry.max_replicas is None or entry.max_replicas >= 1)
        and used + entry.gpus_per_replica <= spec.gpu_budget
    ):
        replicas[entry.name] = 1
    last = spec.variants[-1].name
    variants = tuple(
        VariantAllocation(v.name, replicas[v.name], 1, None if v.name == last else 0.0)
        for v in spec.variants
    )
    return Plan(
        variants=variants,
        threshold=0.0,
        defer_fraction=0.0,
        demand_qps=0.0,
        predicted_latency_s=0.0,
        predicted_throughput_qps=0.0,
        predicted_fid=None,
        solver=SolverOutcome(status=SolverStatus.FAILED, solve_ms=0.0, message=why),
        reason=f"{why}; minimum replicas, nothing deferred: "
        + ", ".join(f"{v.name} x{v.replicas}" for v in variants),
        decided_at=now if math.isfinite(now) else 0.0,
    )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def unusable_profiles(profiles: CascadeProfiles) -> str | None:
    """Why the profiles cannot be planned with (a latency no worker could have), or None.

    The spec and the live-profile reader refuse such numbers already; this keeps `decide()`
    safe from any other caller."""
    for profile in profiles.variants:
        for size, ms in profile.batch_latency_ms.items():
            if not MIN_BATCH_LATENCY_MS <= ms <= MAX_BATCH_LATENCY_MS:
                return (
                    f"variant {profile.name}: batch {size} takes {ms} ms, outside "
                    f"[{MIN_BATCH_LATENCY_MS:g}, {MAX_BATCH_LATENCY_MS:.0f}] ms"
                )
        if not 0.0 <= profile.startup_seconds < math.inf:
            return f"variant {profile.name}: startup of {profile.startup_seconds} s"
    return None


def _with_minimums(spec: CascadeSpec, replicas: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for v in spec.variants:
        n = max(replicas.get(v.name, 0), v.min_replicas)
        if v.max_replicas is not None:
            n = min(n, v.max_replicas)
        out[v.name] = n
    return out


def _held(
    snapshot: Snapshot,
    previous: Plan | None,
    why: str,
    status: SolverStatus = SolverStatus.HELD,
) -> Plan:
    """Keep the previous plan (status Held, or Failed when the inputs were unusable), or start
    from the initial plan when there is none."""
    names = [v.name for v in snapshot.spec.variants]
    at = snapshot.now if math.isfinite(snapshot.now) else None
    if previous is None or [v.name for v in previous.variants] != names:
        plan = initial_plan(
            snapshot.spec, snapshot.profiles, 0.0 if at is None else at, snapshot.dispatch
        )
        if status is SolverStatus.FAILED:
            plan = replace(plan, solver=replace(plan.solver, status=status, message=why))
        return replace(plan, reason=f"{why}; {plan.reason}")
    return replace(
        previous,
        solver=SolverOutcome(
            status=status,
            solve_ms=0.0,
            objective_value=previous.solver.objective_value,
            message=why,
        ),
        reason=f"{why}: holding t={previous.threshold:.3g}, "
        + ", ".join(f"{v.name} x{v.replicas} b{v.batch_size}" for v in previous.variants),
        decided_at=previous.decided_at if at is None else at,
        scale_down_since={},
    )


# --- hysteresis --------------------------------------------------------------------------------


def apply_hysteresis(
    *,
    target: Mapping[str, int],
    previous: Plan | None,
    now: float,
    window_s: float,
    spec: CascadeSpec,
) -> tuple[dict[str, int], dict[str, float]]:
    """Replicas to run and the updated scale-down clocks.

    Up at once; down only once a lower count has been wanted continuously for `window_s`
    (then straight to the current target). Bounds always hold. If held replicas and immediate
    scale-ups together exceed the GPU budget, held replicas give way (last stage first): the
    budget is a hard limit and scaling up is what protects the SLO.
    """
    if previous is None:
        return _with_minimums(spec, target), {}
    have = previous.replicas()
    kept: dict[str, int] = {}
    since: dict[str, float] = {}
    for v in spec.variants:
        want = target.get(v.name, 0)
        current = have.get(v.name)
        if current is None or want >= current:
            kept[v.name] = want
            continue
        started = previous.scale_down_since.get(v.name, now)
        if now - started >= window_s:
            kept[v.name] = want
        else:
            kept[v.name] = current
            since[v.name] = started
    kept = _with_minimums(spec, kept)
    gpus = _gpus(spec)
    over = sum(kept[n] * gpus[n] for n in kept) - spec.gpu_budget
    for v in reversed(spec.variants):
        floor = max(target.get(v.name, 0), v.min_replicas)
        while over > 0 and gpus[v.name] > 0 and kept[v.name] > floor:
            kept[v.name] -= 1
            over -= gpus[v.name]
        if kept[v.name] <= target.get(v.name, 0):
            since.pop(v.name, None)
    return kept, since


def _resolve_with_replicas(
    problem: CascadeProblem, allocation: Allocation, kept: Mapping[str, int]
) -> Allocation | None:
    """Batch sizes and threshold that are optimal for the replicas actually kept."""
    heavy = allocation.heavy.name if allocation.heavy is not None else None
    fixed = {name: ReplicaBounds(n, n) for name, n in kept.items()}
    base = pair_problem(replace(problem, bounds=fixed), allocation.light.name, heavy)
    used = {allocation.light.name} | ({heavy} if heavy else set())
    by_name = {v.name: v.gpus_per_replica for v in problem.variants}
    others = sum(n * by_name[name] for name, n in kept.items() if name not in used)
    sub: AllocationProblem = replace(base, gpu_budget=problem.gpu_budget - others)
    result = solve(sub)
    return result if result.status is SolverStatus.OPTIMAL else None


def starting_replicas(
    snapshot: Snapshot, previous: Plan | None, kept: Mapping[str, int]
) -> dict[str, int]:
    """Per stage that receives deferrals: replicas of `kept` that will not serve this interval.

    Those the previous plan asked for that are not ready yet, plus new ones of a variant whose
    profile needs start-up time. A stage the snapshot reports no readiness for counts as ready.
    """
    entry = previous.entry() if previous is not None else snapshot.spec.variants[0].name
    before = previous.replicas() if previous is not None else {}
    out: dict[str, int] = {}
    for profile in snapshot.profiles.variants:
        name = profile.name
        if name == entry or name not in snapshot.ready_replicas:
            continue
        asked = before.get(name, kept.get(name, 0))
        waiting = max(0, min(asked, kept.get(name, 0)) - snapshot.ready_replicas[name])
        if profile.startup_seconds > 0:
            waiting += max(0, kept.get(name, 0) - asked)
        if waiting:
            out[name] = min(waiting, kept.get(name, 0))
    return out


# --- the policy --------------------------------------------------------------------------------


def decide(snapshot: Snapshot, previous: Plan | None) -> Plan:
    """The plan for this instant. Pure and deterministic; see the module docstring.

    Never raises: inputs it cannot use (a time or latency no clock or worker could produce,
    an error anywhere in the solve) hold the previous plan with status Failed and the reason.
    """
    if not math.isfinite(snapshot.now):
        return _held(snapshot, previous, "cannot plan: the time is not finite", SolverStatus.FAILED)
    problem = unusable_profiles(snapshot.profiles)
    if problem is not None:
        return _held(snapshot, previous, f"cannot plan: {problem}", SolverStatus.FAILED)
    try:
        return _decide(snapshot, previous)
    except Exception as exc:  # a plan that cannot be solved is a status, never a crash
        return _held(snapshot, previous, f"cannot plan: {_error_text(exc)}", SolverStatus.FAILED)


def _decide(snapshot: Snapshot, previous: Plan | None) -> Plan:
    spec = snapshot.spec
    control = spec.control
    if control.paused:
        return _held(snapshot, previous, "paused (spec.control.paused)")
    if not snapshot.metrics_available:
        return _held(snapshot, previous, "metrics unavailable")
    estimate = estimate_demand(
        snapshot.demand,
        now=snapshot.now,
        alpha=control.ewma_alpha,
        headroom=control.headroom,
        trend_horizon_s=control.trend_horizon_seconds,
    )
    if estimate.empty:
        return _held(snapshot, previous, "no demand samples yet")
    # the entry stage is the one the plan in force sends arrivals to
    queue_s, backlog = queue_inputs(
        snapshot, previous.entry() if previous is not None else None, previous=previous
    )
    previous_replicas = previous.replicas() if previous is not None else {}
    problem = _cascade_problem(
        spec,
        snapshot.profiles,
        demand_qps=estimate.qps,
        queue_s=queue_s,
        previous=previous_replicas,
        backlog=backlog,
        dispatch=snapshot.dispatch,
    )
    try:
        result = solve_cascade(problem)
    except AllocatorError as exc:
        return _held(snapshot, previous, f"allocator error: {exc}")
    target_alloc = result.best
    solve_ms = result.solve_ms
    target = _with_minimums(spec, target_alloc.replicas())
    kept, since = apply_hysteresis(
        target=target,
        previous=previous,
        now=snapshot.now,
        window_s=control.scale_down_stabilization_seconds,
        spec=spec,
    )
    final = target_alloc
    notes: list[str] = []
    if kept != target and target_alloc.status is SolverStatus.OPTIMAL:
        resolved = _resolve_with_replicas(problem, target_alloc, kept)
        if resolved is not None:
            final = resolved
            solve_ms += resolved.solve_ms
    deferred_to = final.heavy.name if final.heavy is not None else None
    starting = {
        name: n
        for name, n in starting_replicas(snapshot, previous, kept).items()
        if name == deferred_to and previous is not None
    }
    if starting and final.status is SolverStatus.OPTIMAL:
        # The threshold acts at once, new replicas only once ready: defer what serves now.
        serving = {n: k - starting.get(n, 0) for n, k in kept.items()}
        resolved = _resolve_with_replicas(problem, final, serving)
        if resolved is not None:
            final = resolved
            solve_ms += resolved.solve_ms
            notes.append(
                "threshold for ready replicas ("
                + ", ".join(f"{n} {k} starting" for n, k in sorted(starting.items()))
                + ")"
            )
    for name, started in sorted(since.items()):
        wait = max(0.0, control.scale_down_stabilization_seconds - (snapshot.now - started))
        notes.append(f"holding {name} at {kept[name]} (wants {target[name]}, in {wait:.0f} s)")
    if final.objective is not spec.objective:
        notes.append(f"no quality curve: {final.objective} instead of {spec.objective}")
    if any(q > 0 for q in queue_s.values()):
        notes.append(
            "queueing " + ", ".join(f"{n} {q:.2f} s" for n, q in sorted(queue_s.items()) if q > 0)
        )
    if any(q > 0 for q in backlog.values()):
        notes.append(
            "backlog " + ", ".join(f"{n} {q:.0f}" for n, q in sorted(backlog.items()) if q > 0)
        )
    return _plan(
        profiles=snapshot.profiles,
        allocation=final,
        replicas=kept,
        status=final.status,
        solve_ms=solve_ms,
        estimate=estimate,
        demand_qps=estimate.qps,
        now=snapshot.now,
        previous=previous,
        scale_down_since=since,
        notes=tuple(notes),
    )


def step_due(plan: Plan | None, *, since_last_s: float, interval_s: float) -> bool | None:
    """The drivers' cadence, in one place: True when the regular step is due (every
    `interval_s` since the last regular one), None for an early step (every
    `FIRST_READING_POLL_S` while the plan in force was made before any reading; it leaves
    the regular cadence where it was), False otherwise."""
    slack = 0.05  # a timer that fires a hair early still counts
    if since_last_s >= interval_s - slack:
        return True
    initial = plan is None or plan.solver.status is SolverStatus.INITIAL
    if initial and since_last_s >= FIRST_READING_POLL_S - slack:
        return None
    return False


def same_decision(a: Plan, b: Plan) -> bool:
    """Equal plans apart from wall-clock measurements (solve time, and the reason quoting it)."""

    def key(p: Plan) -> Plan:
        return replace(
            p,
            solver=replace(p.solver, solve_ms=0.0),
            reason=p.reason.rsplit(" in ", 1)[0] if p.reason.endswith(" ms") else p.reason,
        )

    return key(a) == key(b)


__all__ = [
    "apply_hysteresis",
    "decide",
    "fallback_plan",
    "initial_plan",
    "queue_inputs",
    "queue_terms",
    "replica_bounds",
    "same_decision",
    "starting_replicas",
    "step_due",
    "unusable_profiles",
]
