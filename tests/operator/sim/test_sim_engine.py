"""Engine rules on hand-made traces whose outcome can be worked out on paper."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from deadline_cases import SHARED
from diffcascade_operator.sim.engine import NOT_SERVED
from diffcascade_operator.sim.model import StageModel
from sim_helpers import Scripted, plan, run, run_policy

NAMES = ("light", "heavy")


def light(table: dict[int, float] | None = None, startup: float = 0.0) -> StageModel:
    return StageModel(name="light", batch_latency_ms=table or {1: 100.0}, startup_s=startup)


def heavy(table: dict[int, float] | None = None, startup: float = 0.0) -> StageModel:
    return StageModel(name="heavy", batch_latency_ms=table or {1: 1000.0}, startup_s=startup)


def test_idle_worker_takes_what_is_queued_up_to_the_batch_size() -> None:
    # q0 finds the worker idle and runs alone (0 -> 0.1); q1..q4 queue behind it and run as
    # one batch of 4 (0.1 -> 0.3): no waiting to fill a batch.
    stages = (light({1: 100.0, 2: 150.0, 4: 200.0}), heavy())
    policy = Scripted([plan([1, 0], [4, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[0.0] * 5, policy=policy)
    assert result.finish_s == pytest.approx([0.1, 0.3, 0.3, 0.3, 0.3])
    assert list(result.served_by) == [0] * 5


def test_unprofiled_batch_size_uses_the_interpolated_latency() -> None:
    # batch of 3 between profiled 2 (150 ms) and 4 (250 ms): 200 ms
    stages = (light({1: 100.0, 2: 150.0, 4: 250.0}), heavy())
    policy = Scripted([plan([1, 0], [4, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[0.0] * 4, policy=policy)
    assert math.isclose(result.finish_s[-1], 0.1 + 0.2)


def test_query_that_cannot_finish_by_its_deadline_is_dropped_at_dequeue() -> None:
    # SLO 2 s, one 1-s slot (the worker's rule: drop when the batch would end past the
    # deadline). q0 runs 0 -> 1. At t=1 q1 (arrived 0.4) has 1.4 s left >= 1 s: runs 1 -> 2.
    # At t=2 q2 (arrived 0.6) has 0.6 s left < 1 s: dropped.
    stages = (light({1: 1000.0}), heavy())
    policy = Scripted([plan([1, 0], [1, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[0.0, 0.4, 0.6], policy=policy, slo=2.0)
    assert result.finish_s[:2] == [1.0, 2.0]
    assert result.served_by[2] == NOT_SERVED
    assert result.dropped_s[2] == 2.0
    from diffcascade_operator.sim.metrics import summarize

    summary = summarize(
        result,
        quality=None,
        scenario="s",
        policy="p",
        trace="t",
        gpus=1,
        startup_s=0.0,
        dispatch="least-loaded",
    )
    assert (summary.late, summary.dropped, summary.served) == (0, 1, 2)
    assert math.isclose(summary.slo_violation_ratio, 1 / 3)


@pytest.mark.parametrize(("remaining", "expected", "dropped"), SHARED)
def test_simulated_worker_drops_by_the_workers_rule_on_the_shared_cases(
    remaining: float, expected: float, dropped: bool
) -> None:
    # q0 occupies the only replica for `expected` s; q1, queued at t=0, is dequeued at
    # t=expected with SLO - expected = `remaining` s left, into a batch of `expected` s.
    stages = (light({1: expected * 1000.0}), heavy())
    policy = Scripted([plan([1, 0], [1, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[0.0, 0.0], policy=policy, slo=remaining + expected)
    assert (result.served_by[1] == NOT_SERVED) is dropped


def test_drop_check_uses_the_batch_as_taken_and_does_not_refill_it() -> None:
    # b=2, 1-s batches, SLO 1.6 s. q0 runs alone 0 -> 1. At t=1 the worker takes q1 and q2:
    # q1 (0.8 s left) is dropped, q2 (1.3 s left) runs alone. q3 is not pulled in to refill
    # the batch; at t=2 it has 0.5 s left for a 1-s batch and is dropped too.
    stages = (light({1: 1000.0, 2: 1000.0}), heavy())
    policy = Scripted([plan([1, 0], [2, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[0.0, 0.2, 0.7, 0.9], policy=policy, slo=1.6)
    assert list(result.served_by) == [0, NOT_SERVED, 0, NOT_SERVED]
    assert result.finish_s[2] == 2.0
    assert result.dropped_s[3] == 2.0


def test_max_batch_wait_holds_an_idle_worker_for_a_fuller_batch() -> None:
    # b=4, wait 0.5 s: q0 (t=0) waits for company; q1, q2 join; at 0.5 s the batch of three
    # runs (0.5 -> 0.675, 175 ms between the profiled 2 and 4). Without the wait each query
    # finds the worker idle and runs alone.
    stages = (light({1: 100.0, 2: 150.0, 4: 200.0}), heavy())
    policy = Scripted([plan([1, 0], [4, 1], 0.0, NAMES)])
    waited = run(stages=stages, arrivals=[0.0, 0.1, 0.2], policy=policy, max_batch_wait_s=0.5)
    assert waited.finish_s == pytest.approx([0.675, 0.675, 0.675])
    policy = Scripted([plan([1, 0], [4, 1], 0.0, NAMES)])
    eager = run(stages=stages, arrivals=[0.0, 0.1, 0.2], policy=policy)
    assert eager.finish_s == pytest.approx([0.1, 0.2, 0.3])


def test_max_batch_wait_ends_early_once_the_batch_is_full() -> None:
    stages = (light({1: 100.0, 2: 150.0}), heavy())
    policy = Scripted([plan([1, 0], [2, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[0.0, 0.1], policy=policy, max_batch_wait_s=1.0)
    assert result.finish_s == pytest.approx([0.25, 0.25])


def test_gate_defers_prompts_whose_confidence_is_below_the_threshold() -> None:
    confidences = [0.9, 0.1, 0.5, 0.05]
    stages = (light(), heavy())
    policy = Scripted([plan([1, 1], [1, 1], 0.3, NAMES)])
    result = run(
        stages=stages,
        arrivals=[0.0, 2.0, 4.0, 6.0],
        prompts=[0, 1, 2, 3],
        confidences=confidences,
        policy=policy,
    )
    assert list(result.served_by) == [0, 1, 0, 1]
    assert list(result.deferred) == [False, True, False, True]
    # deferred: light 0.1 s, then the heavy model generates from scratch (1 s)
    assert math.isclose(result.finish_s[1], 2.0 + 0.1 + 1.0)
    assert math.isclose(result.finish_s[0], 0.1)


def test_threshold_of_one_defers_every_query_even_fully_confident_ones() -> None:
    stages = (light(), heavy())
    policy = Scripted([plan([1, 1], [1, 1], 1.0, NAMES)])
    result = run(
        stages=stages,
        arrivals=[0.0, 3.0],
        prompts=[0, 1],
        confidences=[1.0, 0.99],
        policy=policy,
    )
    assert list(result.served_by) == [1, 1]


def test_trace_prompt_indices_wrap_around_the_confidence_table() -> None:
    stages = (light(), heavy())
    policy = Scripted([plan([1, 1], [1, 1], 0.3, NAMES)])
    result = run(stages=stages, arrivals=[0.0], prompts=[5], confidences=[0.9, 0.1], policy=policy)
    assert result.served_by[0] == 1  # prompt 5 -> entry 5 % 2 = 1 (confidence 0.1)


def test_new_replica_serves_only_after_its_startup_delay() -> None:
    # No replica at first; the tick at t=5 asks for one that takes 2 s to start. Both queries
    # wait for it: q0 runs 7.0 -> 7.5, q1 7.5 -> 8.0.
    stages = (light({1: 500.0}, startup=2.0), heavy())
    policy = Scripted([plan([0, 0], [1, 1], 0.0, NAMES), plan([1, 0], [1, 1], 0.0, NAMES)])
    result = run(stages=stages, arrivals=[1.0, 6.0], policy=policy, slo=10.0)
    assert result.finish_s == [7.5, 8.0]
    assert math.isclose(result.gpu_seconds, 8.0 - 5.0)  # the replica exists from t=5 to the end
    assert [row.replicas[0] for row in result.timeline if row.second in (6, 7)] == [0, 1]


def test_removed_replica_drains_its_batch_and_its_queue_moves_to_the_others() -> None:
    # Two 1-s replicas, four queries at t=0 (two each), a fifth at 0.5; the tick at 0.5 keeps
    # one replica. The removed one finishes its running query (retired at t=1) and hands its
    # queued query over: the survivor then runs three more, ending at t=4.
    stages = (light({1: 1000.0}), heavy())
    policy = Scripted([plan([2, 0], [1, 1], 0.0, NAMES), plan([1, 0], [1, 1], 0.0, NAMES)])
    result = run(
        stages=stages, arrivals=[0.0, 0.0, 0.0, 0.0, 0.5], policy=policy, slo=10.0, interval=0.5
    )
    assert all(s == 0 for s in result.served_by)
    assert sorted(result.finish_s) == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert math.isclose(result.gpu_seconds, 1.0 + 4.0)


def test_degrade_returns_the_light_image_when_the_deferral_would_miss_the_deadline() -> None:
    # SLO 1 s: light done at 0.1; at the heavy stage's dequeue 0.9 s are left for a 1-s batch,
    # so the heavy worker refuses it. With degraded answers the light image returns at 0.1;
    # without them the query is dropped there.
    stages = (light(), heavy())
    for degrade, served_by in ((True, 0), (False, NOT_SERVED)):
        policy = Scripted([plan([1, 1], [1, 1], 0.5, NAMES)], degrade=degrade)
        result = run(
            stages=stages,
            arrivals=[0.0],
            prompts=[0],
            confidences=[0.2],
            policy=policy,
            slo=1.0,
        )
        assert result.served_by[0] == served_by
        assert result.degraded[0] is degrade
        assert result.deferred[0] is True
        assert math.isclose(result.finish_s[0] if degrade else result.dropped_s[0], 0.1)


def test_degrade_keeps_deferrals_that_can_still_make_the_deadline() -> None:
    stages = (light(), heavy())
    policy = Scripted([plan([1, 1], [1, 1], 0.5, NAMES)], degrade=True)
    result = run(
        stages=stages, arrivals=[0.0], prompts=[0], confidences=[0.2], policy=policy, slo=2.0
    )
    assert result.served_by[0] == 1
    assert result.degraded[0] is False


def test_deferral_with_no_ready_heavy_replica_degrades_or_is_stranded() -> None:
    # No heavy replica at all: with degraded answers the light image comes back at once;
    # without, the deferral waits for a replica that never comes and counts as dropped.
    stages = (light(), heavy())
    for degrade in (True, False):
        policy = Scripted([plan([1, 0], [1, 1], 0.5, NAMES)], degrade=degrade)
        result = run(stages=stages, arrivals=[0.0], prompts=[0], confidences=[0.2], policy=policy)
        assert result.served_by[0] == (0 if degrade else NOT_SERVED)
        assert result.degraded[0] is degrade


def test_snapshot_reports_entry_demand_queues_and_ready_replicas() -> None:
    # 2 queries per second for 10 s into one slow replica: the tick at t=10 sees 2 qps.
    stages = (light({1: 2000.0}), heavy())
    policy = Scripted([plan([1, 0], [1, 1], 0.0, NAMES)])
    arrivals = [k * 0.5 for k in range(21)]
    run(stages=stages, arrivals=arrivals, policy=policy, slo=100.0)
    first, _, at_ten = policy.calls
    assert first.demand == ()
    assert at_ten.now == 10.0
    assert at_ten.demand[-1].qps == 2.0
    assert at_ten.ready_replicas == {"light": 1, "heavy": 0}
    assert at_ten.stages["light"].queue_depth > 0


def test_deferrals_follow_the_plans_next_stage_past_an_unused_middle_variant() -> None:
    # light -> heavy over light/middle/heavy with no middle replica: deferred queries go to
    # heavy as the plan routes them (they used to queue at the empty middle stage forever).
    names = ("light", "middle", "heavy")
    stages = (
        light(),
        StageModel(name="middle", batch_latency_ms={1: 500.0}),
        heavy(),
    )
    routed = plan([1, 0, 1], [1, 1, 1], 0.5, names)
    routed = replace(
        routed,
        variants=(
            replace(routed.variants[0], next_stage="heavy"),
            replace(routed.variants[1], threshold=0.0),
            routed.variants[2],
        ),
    )
    result = run(
        stages=stages,
        arrivals=[0.0, 2.0],
        prompts=[0, 1],
        confidences=[0.9, 0.1],
        policy=Scripted([routed]),
    )
    assert list(result.served_by) == [0, 2]
    assert list(result.deferred) == [False, True]
    assert math.isclose(result.finish_s[1], 2.0 + 0.1 + 1.0)


def test_demand_counts_every_arrival_of_the_interval_and_the_scrape_rate_for_steps() -> None:
    # 10 arrivals in (0, 4), then 3 per second in (4, 5): the tick at t=5 counts all 13 over
    # its 5-s interval (2.6 qps) and the last scrape's 3 qps as the instant rate
    stages = (light({1: 10.0}), heavy())
    policy = Scripted([plan([1, 0], [1, 1], 0.0, NAMES)])
    arrivals = sorted([0.2 + k * 0.38 for k in range(10)] + [4.1, 4.4, 4.7, 5.5, 6.5])
    run(stages=stages, arrivals=arrivals, policy=policy, slo=100.0)
    at_five = next(s for s in policy.calls if s.now == 5.0)
    sample = at_five.demand[-1]
    assert sample.qps == pytest.approx(13 / 5) and sample.instant_qps == pytest.approx(3.0)
    assert sample.span_s == 5.0


def test_decide_replaces_the_plan_made_before_any_reading_at_the_first_reading() -> None:
    from diffcascade_operator.control import decide
    from diffcascade_operator.sim.policies import DecidePolicy
    from sim_helpers import two_stage_spec

    # a decide()-driven policy steps at t=1 (the first reading), then every 5 s from t=0
    spec = two_stage_spec(slo=5.0, gpus=4)
    policy = DecidePolicy(name="diffcascade", spec=spec, decider=decide, degrade=True)
    result = run_policy(policy, arrivals=[k * 0.1 for k in range(120)])
    assert [d.at for d in result.decisions][:4] == [0.0, 1.0, 5.0, 10.0]
    assert result.decisions[1].plan.demand_qps > 0
