"""`diffserve` behaves as the DiffServe artifact's controller is documented to behave."""

from __future__ import annotations

import pytest
from diffcascade_operator.metrics_source import MetricsReading
from diffcascade_operator.plan import SolverStatus
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.sim.diffserve import DiffServeArtifactPolicy, ewm_last
from diffcascade_operator.sim.run import simulate
from diffcascade_operator.sim.scenarios import load_scenario
from diffcascade_operator.sim.traces import load_trace
from diffcascade_operator.snapshot import Snapshot, StageSample


def policy(gpus: int = 16) -> DiffServeArtifactPolicy:
    spec = load_scenario("sdturbo-sdv15", gpus=gpus).spec
    return DiffServeArtifactPolicy(spec=spec, profiles=profiles_from_spec(spec))


def reading(
    inflight: float, *, light_queue: float = 0.0, heavy_queue: float = 0.0
) -> MetricsReading:
    return MetricsReading(
        demand_qps=0.0,
        stages={
            "sd-turbo": StageSample(queue_depth=light_queue, arrival_qps=0.0, inflight=inflight),
            "sd-v1-5": StageSample(queue_depth=heavy_queue, arrival_qps=0.0, inflight=0.0),
        },
        source="Prometheus",
        at=0.0,
    )


def snapshot(p: DiffServeArtifactPolicy, now: float) -> Snapshot:
    return Snapshot(spec=p.spec, profiles=p.profiles, now=now, demand=())


def feed(p: DiffServeArtifactPolicy, inflight: float, times: int = 20) -> None:
    for _ in range(times):
        p.observe(reading(inflight))


def test_ewm_matches_pandas_adjusted_ewm_with_com_2_1() -> None:
    # pandas.Series([1, 2, 3]).ewm(com=2.1).mean().iloc[-1]
    decay = 1 - 1 / 3.1
    expected = (3 + 2 * decay + 1 * decay**2) / (1 + decay + decay**2)
    assert ewm_last([1.0, 2.0, 3.0]) == pytest.approx(expected)


def test_demand_is_1_2_times_the_queries_in_flight_over_nonzero_samples() -> None:
    p = policy()
    feed(p, 10.0)
    p.observe(reading(0.0))  # an idle second is not a sample
    assert p.demand_qps() == pytest.approx(12.0)
    feed(p, 30.0, times=5)  # queues build: in flight rises, so does the estimate
    assert p.demand_qps() > 12.0 * 2


def test_queue_terms_are_stage_queue_over_in_flight() -> None:
    p = policy()
    for _ in range(20):
        p.observe(reading(20.0, light_queue=1.0, heavy_queue=5.0))
    assert p.queue_terms() == pytest.approx({"sd-turbo": 0.05, "sd-v1-5": 0.25})


def test_start_splits_the_gpus_and_defers_everything() -> None:
    start = policy(gpus=16).decide(snapshot(policy(), 0.0), None).plan
    assert start.replicas() == {"sd-turbo": 8, "sd-v1-5": 8}
    assert start.threshold == 1.0
    assert [v.batch_size for v in start.variants] == [8, 8]


def test_stages_grow_when_short_of_the_solver_and_never_shrink() -> None:
    p = policy(gpus=16)
    plan = p.decide(snapshot(p, 0.0), None).plan
    feed(p, 4.0 / 1.2)  # 4 qps: the solver wants t=1 with 1 light / 4 heavy
    plan = p.decide(snapshot(p, 5.0), plan).plan
    assert plan.replicas() == {"sd-turbo": 8, "sd-v1-5": 8}  # nobody short: roles kept
    assert plan.threshold == 1.0
    feed(p, 64.0 / 1.2, times=40)  # 64 qps: the solver wants 4 light / 12 heavy
    plan = p.decide(snapshot(p, 10.0), plan).plan
    assert plan.replicas() == {"sd-turbo": 4, "sd-v1-5": 12}  # heavy was short: it grew
    assert sum(plan.replicas().values()) == 16  # every GPU keeps a role
    feed(p, 4.0 / 1.2, times=40)
    plan = p.decide(snapshot(p, 15.0), plan).plan
    assert plan.replicas() == {"sd-turbo": 4, "sd-v1-5": 12}  # and did not shrink back


def test_an_infeasible_solve_holds_the_last_plan() -> None:
    p = policy(gpus=4)
    start = p.decide(snapshot(p, 0.0), None).plan
    feed(p, 400.0, times=40)  # far beyond 4 GPUs
    held = p.decide(snapshot(p, 5.0), start).plan
    assert held.solver.status is SolverStatus.HELD
    assert held.variants == start.variants and held.threshold == start.threshold
    assert "infeasible" in held.reason


def test_diffserve_never_answers_with_a_degraded_image() -> None:
    run = simulate(
        scenario=load_scenario("sdturbo-sdv15", gpus=4),
        trace=load_trace("maf_1to8qps"),
        policy_name="diffserve",
    )
    assert run.summary.degraded == 0
    assert run.summary.decisions > 60  # one allocation every 5 s of the 347-s trace
