"""`decide()` on numbers no worker or clock could produce: it never raises; a plan it makes is
usable (finite, within bounds and budget), and what it cannot use holds the previous plan."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from diffcascade_operator.control import decide, fallback_plan, initial_plan
from diffcascade_operator.plan import Plan, SolverStatus
from diffcascade_operator.profiles import CascadeProfiles, profiles_from_spec
from diffcascade_operator.snapshot import MAX_QPS, DemandSample, Snapshot, StageSample
from diffcascade_operator.spec import MAX_REPLICAS, CascadeSpec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control import HEAVY, LIGHT, make_spec

#: Any float, the awkward ones included.
WILD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e-15, 1e20, 1e300, -1.0, math.nan, math.inf, -math.inf]),
)
#: Demand as a source might report it, sane or broken.
QPS = st.one_of(st.floats(0.0, 2000.0), st.floats(0.0, 1e7), WILD)
#: Sample times: mostly a clock's, sometimes not.
AT = st.one_of(st.floats(0.0, 1e6), st.floats(0.0, 1e6), WILD)


def _with_latency(profiles: CascadeProfiles, table: dict[int, float]) -> CascadeProfiles:
    light = dataclasses.replace(profiles.variants[0], batch_latency_ms=table)
    return dataclasses.replace(profiles, variants=(light, *profiles.variants[1:]))


def _usable(plan: Plan, spec: CascadeSpec) -> None:
    """What every plan must be to reach a status document and the workers."""
    numbers = [
        plan.threshold,
        plan.defer_fraction,
        plan.demand_qps,
        plan.predicted_latency_s,
        plan.predicted_throughput_qps,
        plan.decided_at,
    ]
    if plan.predicted_fid is not None:
        numbers.append(plan.predicted_fid)
    assert all(math.isfinite(x) for x in numbers), plan
    assert 0.0 <= plan.threshold <= 1.0 and 0.0 <= plan.defer_fraction <= 1.0
    by_name = {v.name: v for v in spec.variants}
    assert [v.name for v in plan.variants] == list(by_name)
    for allocation in plan.variants:
        variant = by_name[allocation.name]
        assert 0 <= allocation.replicas <= (variant.max_replicas or MAX_REPLICAS)
        assert allocation.batch_size >= 1
    if plan.solver.status in (SolverStatus.OPTIMAL, SolverStatus.INFEASIBLE):
        gpus = {v.name: v.gpus_per_replica for v in spec.variants}
        assert plan.gpus(gpus) <= spec.gpu_budget
        for allocation in plan.variants:
            assert allocation.replicas >= by_name[allocation.name].min_replicas


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    budget=st.sampled_from([1, 2, 16, 100_000]),
    light_ms=st.one_of(st.none(), st.none(), st.floats(0.01, 3_600_000.0), WILD),
    demand=st.lists(st.tuples(AT, QPS), min_size=0, max_size=6),
    queue=st.tuples(*[st.one_of(st.floats(0.0, 100.0), WILD)] * 4),
    ready=st.tuples(st.integers(-5, 10**9), st.integers(-5, 10**9)),
    now=st.one_of(st.just(1e6), st.floats(0.0, 1e6), WILD),
    start_from=st.sampled_from(["none", "initial", "chain"]),
)
def test_decide_never_raises_and_every_plan_is_usable(
    budget: int,
    light_ms: float | None,
    demand: list[tuple[float, float]],
    queue: tuple[float, float, float, float],
    ready: tuple[int, int],
    now: float,
    start_from: str,
) -> None:
    spec = make_spec(gpuBudget=budget)
    profiles = profiles_from_spec(spec)
    if light_ms is not None:  # a table the spec refuses, as a buggy caller could pass it
        profiles = _with_latency(profiles, {1: light_ms, 4: light_ms})
    previous = None if start_from == "none" else initial_plan(spec, profiles_from_spec(spec), 0.0)
    stages = {
        LIGHT: StageSample(queue_depth=queue[0], arrival_qps=queue[1]),
        HEAVY: StageSample(queue_depth=queue[2], arrival_qps=queue[3]),
    }
    snap = Snapshot(
        spec=spec,
        profiles=profiles,
        now=now,
        demand=tuple(DemandSample(at=at, qps=qps) for at, qps in demand),
        stages=stages,
        ready_replicas={LIGHT: ready[0], HEAVY: ready[1]},
    )
    plan = decide(snap, previous)
    _usable(plan, spec)
    if start_from == "chain":
        _usable(decide(dataclasses.replace(snap, now=snap.now + 5.0), plan), spec)


# --- what cannot be used holds the previous plan and says why ---------------------------------


@pytest.mark.parametrize("light_ms", [1e-15, 0.0, -5.0, math.nan, math.inf, 1e300])
def test_a_latency_no_worker_could_have_holds_the_previous_plan(light_ms: float) -> None:
    spec = make_spec()
    previous = initial_plan(spec, profiles_from_spec(spec), 0.0)
    snap = Snapshot(
        spec=spec,
        profiles=_with_latency(profiles_from_spec(spec), {1: light_ms}),
        now=10.0,
        demand=(DemandSample(at=9.0, qps=10.0),),
    )

    plan = decide(snap, previous)

    assert plan.solver.status is SolverStatus.FAILED
    assert plan.variants == previous.variants and plan.decided_at == 10.0
    assert "cannot plan" in plan.solver.message and "batch 1 takes" in plan.solver.message


def test_without_a_previous_plan_the_fallback_serves_the_entry_stage_alone() -> None:
    spec = make_spec()
    plan = initial_plan(spec, _with_latency(profiles_from_spec(spec), {1: 1e-15}), 5.0)

    assert plan.solver.status is SolverStatus.FAILED
    assert plan.replicas() == {LIGHT: 1, HEAVY: 0}
    assert plan.threshold == 0.0 and plan.decided_at == 5.0
    assert "cannot plan" in plan.reason


def test_the_fallback_keeps_the_budget_and_the_minimums() -> None:
    spec = make_spec(gpuBudget=1)
    raw: dict[str, Any] = spec.model_dump(by_alias=True, exclude_none=True)
    raw["variants"][1]["minReplicas"] = 1
    spec = CascadeSpec.model_validate(raw)
    plan = fallback_plan(spec, math.nan, "cannot plan: test")
    assert plan.replicas() == {LIGHT: 0, HEAVY: 1}  # the budget holds no entry replica more
    assert plan.decided_at == 0.0


@pytest.mark.parametrize("qps", [1e20, 1e25, math.inf, math.nan])
def test_demand_no_source_could_measure_is_ignored(qps: float) -> None:
    spec = make_spec()
    previous = initial_plan(spec, profiles_from_spec(spec), 0.0)
    base = Snapshot(
        spec=spec,
        profiles=profiles_from_spec(spec),
        now=10.0,
        demand=(DemandSample(at=8.0, qps=10.0), DemandSample(at=9.0, qps=10.0)),
    )
    poisoned = dataclasses.replace(base, demand=(*base.demand, DemandSample(at=9.5, qps=qps)))

    assert decide(poisoned, previous).replicas() == decide(base, previous).replicas()
    assert qps > MAX_QPS or math.isnan(qps)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    budget=st.integers(1, 100_000),
    table=st.tuples(st.floats(0.01, 3_600_000.0), st.floats(0.01, 3_600_000.0)),
    qps=st.floats(0.0, MAX_QPS),
    queue=st.tuples(st.floats(0.0, 1e7), st.floats(0.0, MAX_QPS)),
)
def test_everything_the_edges_accept_is_planned(
    budget: int, table: tuple[float, float], qps: float, queue: tuple[float, float]
) -> None:
    """Latencies the spec accepts and readings `read_metrics` accepts always get a solved plan
    (Optimal, or Infeasible with a best effort), never a Failed one."""
    spec = make_spec(gpuBudget=budget)
    profiles = _with_latency(profiles_from_spec(spec), {1: table[0], 4: table[1]})
    previous = initial_plan(spec, profiles, 0.0)
    snap = Snapshot(
        spec=spec,
        profiles=profiles,
        now=100.0,
        demand=(DemandSample(at=99.0, qps=qps),),
        stages={
            LIGHT: StageSample(queue_depth=queue[0], arrival_qps=queue[1]),
            HEAVY: StageSample(queue_depth=queue[0], arrival_qps=queue[1]),
        },
    )
    assert previous.solver.status in (SolverStatus.INITIAL, SolverStatus.INFEASIBLE)
    plan = decide(snap, previous)
    assert plan.solver.status in (SolverStatus.OPTIMAL, SolverStatus.INFEASIBLE)
    _usable(plan, spec)
