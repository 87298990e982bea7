"""`decide()`: holding, demand, queueing, hysteresis, bounds and determinism."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from diffcascade_operator.control import (
    apply_hysteresis,
    decide,
    initial_plan,
    queue_inputs,
    queue_terms,
    same_decision,
)
from diffcascade_operator.plan import Plan, SolverStatus
from diffcascade_operator.profiles import (
    defer_fraction,
    profiles_from_spec,
    reference_defer_curve,
    reference_latency,
)
from diffcascade_operator.snapshot import DemandSample, Snapshot, StageSample
from diffcascade_operator.spec import CascadeSpec, parse_spec

LIGHT, HEAVY = "sd-turbo", "sd-v1-5"


def latency_ms(model: str) -> dict[str, float]:
    return {str(b): ms for b, ms in reference_latency(model).items()}


def make_spec(**overrides: Any) -> CascadeSpec:
    raw: dict[str, Any] = {
        "sloSeconds": 5,
        "gpuBudget": 16,
        "objective": "MaxThreshold",
        "simulatorOnly": True,  # plans with the reference gate curve, no gate runs
        "variants": [
            {
                "name": LIGHT,
                "model": "stabilityai/sd-turbo",
                "profile": {"batchLatencyMs": latency_ms("sd-turbo")},
                "gate": {"deferCurve": {"reference": "sd-turbo"}},
            },
            {
                "name": HEAVY,
                "model": "runwayml/stable-diffusion-v1-5",
                "steps": 50,
                "profile": {"batchLatencyMs": latency_ms("sd-v1.5")},
            },
        ],
        "quality": {"reference": "c1"},
        "control": {"scaleDownStabilizationSeconds": 30, "headroom": 1.0, "ewmaAlpha": 1.0},
    }
    control = overrides.pop("control", {})
    raw["control"].update(control)
    raw.update(overrides)
    return parse_spec(raw)


def snapshot(
    spec: CascadeSpec, *, now: float, qps: float, stages: dict[str, StageSample] | None = None
) -> Snapshot:
    return Snapshot(
        spec=spec,
        profiles=profiles_from_spec(spec),
        now=now,
        demand=tuple(DemandSample(at=now - i, qps=qps) for i in range(4, -1, -1)),
        stages=stages or {},
    )


def replicas(plan: Plan) -> tuple[int, int]:
    r = plan.replicas()
    return r[LIGHT], r[HEAVY]


# --- holding and the initial plan --------------------------------------------------------------


def test_no_previous_and_no_samples_gives_the_initial_plan() -> None:
    spec = make_spec(objective="MinExpectedFID")
    snap = replace(snapshot(spec, now=0, qps=0), demand=())
    plan = decide(snap, None)
    assert plan.solver.status is SolverStatus.INITIAL
    assert replicas(plan) == (1, 1)
    assert plan.predicted_fid == pytest.approx(16.79, abs=0.02)
    assert plan == replace(plan, reason=plan.reason)  # frozen, comparable
    assert "no demand samples" in plan.reason


def test_initial_plan_respects_min_replicas() -> None:
    spec = make_spec()
    raw = spec.model_dump(by_alias=True)
    raw["variants"][1]["minReplicas"] = 3
    plan = initial_plan(parse_spec(raw), profiles_from_spec(spec), now=0)
    assert replicas(plan)[1] == 3


def test_paused_holds_the_previous_plan() -> None:
    spec = make_spec()
    previous = decide(snapshot(spec, now=0, qps=24), None)
    paused = make_spec(control={"paused": True})
    plan = decide(snapshot(paused, now=5, qps=64), previous)
    assert plan.solver.status is SolverStatus.HELD
    assert plan.variants == previous.variants and plan.threshold == previous.threshold
    assert plan.decided_at == 5 and "paused" in plan.reason


def test_metrics_unavailable_holds_and_says_why() -> None:
    spec = make_spec()
    previous = decide(snapshot(spec, now=0, qps=24), None)
    snap = replace(snapshot(spec, now=5, qps=64), metrics_available=False)
    plan = decide(snap, previous)
    assert plan.solver.status is SolverStatus.HELD
    assert plan.variants == previous.variants
    assert "metrics unavailable" in plan.reason
    first = decide(snap, None)
    assert first.solver.status is SolverStatus.INITIAL and "metrics unavailable" in first.reason


# --- solving -----------------------------------------------------------------------------------


def test_decide_solves_the_papers_case_and_explains_it_in_one_line() -> None:
    plan = decide(snapshot(make_spec(), now=10, qps=32), None)
    assert plan.solver.status is SolverStatus.OPTIMAL
    assert plan.threshold == pytest.approx(0.115)
    assert replicas(plan) == (2, 14)
    assert [v.batch_size for v in plan.variants] == [4, 4]
    assert plan.variants[0].threshold == pytest.approx(0.115) and plan.variants[1].threshold is None
    assert plan.demand_qps == pytest.approx(32.0)
    assert "\n" not in plan.reason
    assert plan.reason.startswith("demand 32.0 qps → t=0.115 f=0.47 sd-turbo x2 b4, sd-v1-5 x14 b4")
    assert "solved optimal in" in plan.reason


def test_overload_gives_an_infeasible_best_effort_plan() -> None:
    plan = decide(snapshot(make_spec(), now=10, qps=1000), None)
    assert plan.solver.status is SolverStatus.INFEASIBLE
    assert replicas(plan) == (16, 0) and plan.threshold == 0.0
    assert "capacity" in plan.reason and "capacity" in plan.solver.message


def test_queue_terms_follow_littles_law_capped_at_the_slo() -> None:
    spec = make_spec()
    snap = snapshot(
        spec,
        now=0,
        qps=10,
        stages={
            LIGHT: StageSample(queue_depth=6, arrival_qps=12),
            HEAVY: StageSample(queue_depth=50, arrival_qps=1),
            "idle": StageSample(queue_depth=3, arrival_qps=0),
        },
    )
    assert queue_terms(snap) == {LIGHT: 0.5, HEAVY: 5.0, "idle": 0.0}


def test_a_heavy_backlog_is_work_to_drain_not_a_waiting_time() -> None:
    spec = make_spec()
    calm = decide(snapshot(spec, now=10, qps=24), None)
    assert calm.variants[1].batch_size == 4
    # 14 heavy replicas at batch 4 clear 12 queued images in 0.8 s: deferral is still on time
    small = decide(
        snapshot(spec, now=10, qps=24, stages={HEAVY: StageSample(queue_depth=12, arrival_qps=10)}),
        None,
    )
    assert small.threshold == calm.threshold and small.variants == calm.variants
    assert "backlog sd-v1-5 12" in small.reason and "queueing" not in small.reason
    # 20 queued images take too long at batch 4 (1.2 s left after the batch): smaller batches
    # leave more time, so the plan defers less at batch 2 instead of deferring nothing
    large = decide(
        snapshot(spec, now=10, qps=24, stages={HEAVY: StageSample(queue_depth=20, arrival_qps=10)}),
        None,
    )
    assert 0.0 < large.threshold < calm.threshold
    assert large.variants[1].batch_size == 2
    assert large.predicted_latency_s <= 5.0


def test_the_threshold_fits_the_heavy_replicas_that_are_ready() -> None:
    spec = make_spec()
    low = decide(snapshot(spec, now=0, qps=8), None)
    few = replicas(low)[1]
    ramp = decide(snapshot(spec, now=5, qps=24), low)
    assert replicas(ramp) == (2, 14)
    # five seconds on, only the replicas of the low plan serve: defer what they can take
    waiting = snapshot(spec, now=10, qps=24)
    partly = decide(replace(waiting, ready_replicas={LIGHT: 2, HEAVY: few}), ramp)
    assert replicas(partly) == (2, 14)
    assert partly.threshold < ramp.threshold
    assert f"threshold for ready replicas (sd-v1-5 {14 - few} starting)" in partly.reason
    ready = decide(replace(waiting, now=15, ready_replicas={LIGHT: 2, HEAVY: 14}), partly)
    assert ready.threshold == ramp.threshold


def test_replicas_that_need_start_up_time_do_not_count_for_the_threshold_yet() -> None:
    raw = make_spec().model_dump(by_alias=True, exclude_none=True)
    raw["variants"][1]["profile"]["startupSeconds"] = 60
    spec = parse_spec(raw)
    low = decide(snapshot(spec, now=0, qps=8), None)
    ramp = snapshot(spec, now=5, qps=24)
    instant = decide(ramp, low)
    starting = decide(replace(ramp, ready_replicas=low.replicas()), low)
    assert replicas(starting) == replicas(instant) == (2, 14)
    assert starting.threshold < instant.threshold


def test_queue_inputs_keep_littles_law_only_at_the_entry_stage() -> None:
    snap = snapshot(
        make_spec(),
        now=0,
        qps=10,
        stages={
            LIGHT: StageSample(queue_depth=6, arrival_qps=12),
            HEAVY: StageSample(queue_depth=50, arrival_qps=1),
        },
    )
    assert queue_inputs(snap) == ({LIGHT: 0.5, HEAVY: 0.0}, {HEAVY: 50.0})


def test_replica_bounds_from_the_spec_hold() -> None:
    raw = make_spec().model_dump(by_alias=True)
    raw["variants"][0]["minReplicas"] = 3
    raw["variants"][1]["maxReplicas"] = 10
    spec = parse_spec(raw)
    plan = decide(snapshot(spec, now=10, qps=24), None)
    light, heavy = replicas(plan)
    assert light >= 3 and heavy <= 10
    assert plan.solver.status is SolverStatus.OPTIMAL


def three_variant_spec(**overrides: Any) -> CascadeSpec:
    raw = make_spec(objective="MinExpectedFID", **overrides).model_dump(
        by_alias=True, exclude_none=True
    )
    middle = {
        "name": "sdxs",
        "model": "IDKiro/sdxs-512-0.9",
        "profile": {"batchLatencyMs": latency_ms("sdxs")},
        "gate": {"deferCurve": {"reference": "sdxs"}},
    }
    raw["variants"].insert(1, middle)
    raw["variants"][2]["minReplicas"] = 1
    return parse_spec(raw)


def test_a_two_variant_plan_names_the_next_stage_of_the_light_variant() -> None:
    plan = decide(snapshot(make_spec(), now=10, qps=24), None)
    assert [(v.name, v.next_stage) for v in plan.variants] == [(LIGHT, HEAVY), (HEAVY, None)]


def test_a_three_variant_cascade_defers_from_its_entry_and_parks_the_rest() -> None:
    # One quality curve for every pair: sd-turbo -> sdxs reaches the same FID as
    # sd-turbo -> sd-v1-5 on far fewer GPUs. sd-v1-5 is outside the cascade: its minReplicas.
    plan = decide(snapshot(three_variant_spec(), now=10, qps=20), None)
    assert plan.solver.status is SolverStatus.OPTIMAL
    by_name = {v.name: v for v in plan.variants}
    assert [v.name for v in plan.variants] == [LIGHT, "sdxs", HEAVY]
    assert by_name[LIGHT].next_stage == "sdxs" and by_name[LIGHT].threshold == plan.threshold
    assert plan.defer_fraction > 0 and by_name["sdxs"].replicas >= 1
    assert by_name["sdxs"].next_stage is None and by_name["sdxs"].threshold == 0.0
    assert by_name[HEAVY].replicas == 1 and by_name[HEAVY].next_stage is None
    assert by_name[HEAVY].threshold is None


def test_a_three_variant_cascade_may_skip_the_middle_variant() -> None:
    raw = three_variant_spec().model_dump(by_alias=True, exclude_none=True)
    raw["variants"][1]["maxReplicas"] = 0  # sdxs cannot run: sd-turbo defers straight to sd-v1-5
    raw["variants"][2]["minReplicas"] = 0
    plan = decide(snapshot(parse_spec(raw), now=10, qps=20), None)
    by_name = {v.name: v for v in plan.variants}
    assert by_name[LIGHT].next_stage == HEAVY and plan.defer_fraction > 0
    assert by_name["sdxs"].replicas == 0 and by_name[HEAVY].replicas > 0


def test_a_three_variant_cascade_that_cannot_defer_serves_its_entry_alone() -> None:
    plan = decide(snapshot(three_variant_spec(sloSeconds=0.12), now=10, qps=5), None)
    assert plan.solver.status is SolverStatus.OPTIMAL and plan.defer_fraction == 0
    assert all(v.next_stage is None for v in plan.variants)
    assert [v.replicas for v in plan.variants] == [1, 0, 1]


# --- hysteresis --------------------------------------------------------------------------------


def test_scale_up_is_immediate() -> None:
    spec = make_spec()
    low = decide(snapshot(spec, now=0, qps=8), None)
    high = decide(snapshot(spec, now=5, qps=64), low)
    assert replicas(high) == (4, 12)
    assert high.scale_down_since == {} or LIGHT not in high.scale_down_since


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    spec = make_spec(objective="MinExpectedFID")
    plan = decide(snapshot(spec, now=0, qps=24), None)
    busy = replicas(plan)
    assert busy == (2, 14)
    for now in (5, 15, 25):
        plan = decide(snapshot(spec, now=now, qps=6), plan)
        assert replicas(plan) == busy, now
        assert plan.scale_down_since.get(HEAVY) == 5
        assert "holding sd-v1-5 at 14" in plan.reason
    plan = decide(snapshot(spec, now=35, qps=6), plan)
    assert replicas(plan)[1] < 14
    assert plan.scale_down_since == {}


def test_a_single_busy_tick_restarts_the_window() -> None:
    spec = make_spec(objective="MinExpectedFID")
    plan = decide(snapshot(spec, now=0, qps=24), None)
    plan = decide(snapshot(spec, now=5, qps=6), plan)
    plan = decide(snapshot(spec, now=20, qps=24), plan)  # wants the 14 again
    assert plan.scale_down_since == {}
    plan = decide(snapshot(spec, now=36, qps=6), plan)  # 31 s after the first low tick
    assert replicas(plan)[1] == 14 and plan.scale_down_since[HEAVY] == 36


def test_held_replicas_get_the_batch_and_threshold_that_are_optimal_for_them() -> None:
    spec = make_spec(objective="MinExpectedFID")
    plan = decide(snapshot(spec, now=0, qps=64), None)
    assert replicas(plan) == (4, 12)
    plan = decide(snapshot(spec, now=5, qps=8), plan)
    assert replicas(plan) == (4, 12)  # both want fewer: held for the window
    # Re-solved for the replicas kept: the FID optimum fits, and the spare heavy capacity
    # buys the lowest-latency batches.
    assert plan.threshold == pytest.approx(0.215)
    assert [v.batch_size for v in plan.variants] == [1, 1]
    curve = reference_defer_curve("sd-turbo")
    heavy_capacity = 12 * 1 / (reference_latency("sd-v1.5")[1] / 1000)
    assert 8 * defer_fraction(curve, plan.threshold) <= heavy_capacity
    assert plan.predicted_latency_s == pytest.approx(0.1 + 1.78)


def test_held_light_replicas_give_way_when_the_heavy_stage_must_grow() -> None:
    spec = make_spec()  # MaxThreshold
    plan = decide(snapshot(spec, now=0, qps=24), None)
    assert replicas(plan) == (2, 14)
    plan = decide(snapshot(spec, now=5, qps=20), plan)  # wants 1 + 15
    assert replicas(plan) == (1, 15)
    assert plan.threshold == pytest.approx(0.32)


def test_held_replicas_give_way_to_scale_ups_within_the_budget() -> None:
    spec = make_spec()
    previous = decide(snapshot(spec, now=0, qps=24), None)  # 2 + 14
    kept, since = apply_hysteresis(
        target={LIGHT: 5, HEAVY: 11}, previous=previous, now=1, window_s=30, spec=spec
    )
    assert kept == {LIGHT: 5, HEAVY: 11}
    assert since == {}
    kept, since = apply_hysteresis(
        target={LIGHT: 1, HEAVY: 10}, previous=previous, now=1, window_s=30, spec=spec
    )
    assert kept == {LIGHT: 2, HEAVY: 14} and since == {LIGHT: 1, HEAVY: 1}


def test_zero_window_scales_down_at_once() -> None:
    spec = make_spec(control={"scaleDownStabilizationSeconds": 0})
    plan = decide(snapshot(spec, now=0, qps=64), None)
    plan = decide(snapshot(spec, now=5, qps=4), plan)
    assert sum(replicas(plan)) < 16


# --- determinism -------------------------------------------------------------------------------


def test_the_same_snapshot_gives_the_same_plan() -> None:
    spec = make_spec(objective="MinExpectedFID")
    previous = decide(snapshot(spec, now=0, qps=30), None)
    snap = snapshot(spec, now=7, qps=17, stages={LIGHT: StageSample(3, 17)})
    first, second = decide(snap, previous), decide(snap, previous)
    assert same_decision(first, second)
    assert first.variants == second.variants and first.threshold == second.threshold
    assert not same_decision(first, decide(snapshot(spec, now=7, qps=40), previous))


def test_min_fid_without_a_quality_curve_says_it_maximises_the_threshold() -> None:
    spec = make_spec(objective="MinExpectedFID", quality=None)
    plan = decide(snapshot(spec, now=10, qps=32), None)
    assert plan.threshold == pytest.approx(0.115) and plan.predicted_fid is None
    assert "no quality curve: MaxThreshold" in plan.reason


@pytest.mark.parametrize("seed", range(4))
def test_every_plan_of_a_random_demand_walk_fits_budget_bounds_and_capacity(seed: int) -> None:
    import random

    rng = random.Random(seed)
    raw = make_spec(objective=rng.choice(["MinExpectedFID", "MaxThreshold"])).model_dump(
        by_alias=True
    )
    raw["variants"][0]["maxReplicas"] = rng.choice([None, 8])
    raw["variants"][1]["minReplicas"] = rng.choice([0, 1])
    raw["control"]["scaleDownStabilizationSeconds"] = rng.choice([0, 10, 30])
    spec = parse_spec(raw)
    curve = reference_defer_curve("sd-turbo")
    plan: Plan | None = None
    qps = 10.0
    for step in range(40):
        qps = max(0.0, qps + rng.uniform(-12, 12))
        queue = {LIGHT: StageSample(rng.uniform(0, 5), qps), HEAVY: StageSample(0, qps / 2)}
        plan = decide(snapshot(spec, now=5.0 * step, qps=qps, stages=queue), plan)
        light, heavy = replicas(plan)
        assert light + heavy <= 16
        assert light >= 1 and heavy >= raw["variants"][1]["minReplicas"]
        assert raw["variants"][0]["maxReplicas"] is None or light <= 8
        if plan.solver.status is SolverStatus.OPTIMAL:
            b_l, b_h = (v.batch_size for v in plan.variants)
            cap_l = light * b_l / (reference_latency("sd-turbo")[b_l] / 1000)
            cap_h = heavy * b_h / (reference_latency("sd-v1.5")[b_h] / 1000)
            assert cap_l >= plan.demand_qps - 1e-6
            assert cap_h >= plan.demand_qps * defer_fraction(curve, plan.threshold) - 1e-6
            assert plan.predicted_latency_s <= 5.0 + 1e-9


# --- hybrid cascades (a quality table, a router, random dispatch) --------------------------------


def hadis_spec(**overrides: Any) -> CascadeSpec:
    from diffcascade_operator.sim.scenarios import load_scenario

    raw = load_scenario("hadis-sd35").spec.model_dump(by_alias=True, exclude_none=True)
    raw.update(overrides)
    return parse_spec({k: v for k, v in raw.items() if v is not None})


def test_with_a_table_and_a_router_the_plan_names_entry_pair_share_and_row() -> None:
    from diffcascade_operator.queueing import Dispatch

    spec = hadis_spec()
    plan = decide(replace(snapshot(spec, now=100.0, qps=10.0), dispatch=Dispatch.RANDOM), None)
    assert plan.solver.status is SolverStatus.OPTIMAL
    names = [v.name for v in spec.variants]
    assert plan.entry_stage in names and plan.entry() != names[0]
    assert plan.row is not None and plan.router_share == plan.row.router_share > 0
    entry = next(v for v in plan.variants if v.name == plan.entry())
    assert entry.next_stage == plan.row.heavy
    assert f"r={plan.router_share:.2g}" in plan.reason
    # the heavy stage is charged its routed and escalated share, the entry the rest
    assert plan.defer_fraction == pytest.approx(plan.row.heavy_share)


def test_without_a_router_a_table_plans_the_gate_alone() -> None:
    from diffcascade_operator.queueing import Dispatch

    spec = hadis_spec(router=None)
    for qps in (2.0, 10.0, 40.0):
        snap = replace(snapshot(spec, now=100.0, qps=qps), dispatch=Dispatch.RANDOM)
        assert decide(snap, None).router_share == 0.0


def test_random_dispatch_plans_fewer_queries_per_replica_than_least_loaded() -> None:
    from diffcascade_operator.queueing import Dispatch

    spec = hadis_spec()
    snap = snapshot(spec, now=100.0, qps=30.0)
    pooled = decide(snap, None)
    random_ = decide(replace(snap, dispatch=Dispatch.RANDOM), None)
    assert pooled.predicted_fid is not None and random_.predicted_fid is not None
    assert random_.predicted_fid > pooled.predicted_fid  # the same GPUs carry less
    assert sum(random_.replicas().values()) <= spec.gpu_budget


def test_the_plan_made_before_any_reading_is_replaced_at_the_first_reading() -> None:
    from diffcascade_operator.control import step_due

    spec = make_spec()
    start = initial_plan(spec, profiles_from_spec(spec), 0.0)
    assert step_due(None, since_last_s=1.0, interval_s=5.0) is None  # early, off the cadence
    assert step_due(start, since_last_s=1.0, interval_s=5.0) is None
    assert step_due(start, since_last_s=0.5, interval_s=5.0) is False
    solved = decide(snapshot(spec, now=10.0, qps=20.0), start)
    assert step_due(solved, since_last_s=1.0, interval_s=5.0) is False
    assert step_due(solved, since_last_s=4.97, interval_s=5.0) is True
