"""What the simulator learnt for hybrid cascades: a router before generation, an entry stage
per plan, roles per worker, and HADIS's worker rules (admission, drops, random dispatch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from diffcascade_operator.plan import Plan
from diffcascade_operator.sim.engine import (
    NOT_SERVED,
    ClusterTick,
    Dispatch,
    EngineConfig,
    SimResult,
    Simulation,
)
from diffcascade_operator.sim.metrics import summarize
from diffcascade_operator.sim.model import Directive, StageModel, WorkerRole
from diffcascade_operator.snapshot import Snapshot
from diffcascade_operator.spec import CascadeSpec
from sim_helpers import plan, profiles_for, two_stage_spec

LIGHT = StageModel("light", {1: 100.0})
HEAVY = StageModel("heavy", {1: 1000.0})
NAMES = ("light", "heavy")


class Fixed:
    name = "fixed"
    degrade = False

    def __init__(self, directive: Directive) -> None:
        self.directive = directive
        self.ticks: list[ClusterTick] = []

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        return self.directive

    def observe_cluster(self, tick: ClusterTick) -> None:
        self.ticks.append(tick)


def run(
    directive: Directive,
    arrivals: Sequence[float],
    *,
    prompts: Sequence[int] | None = None,
    confidences: Sequence[float] | None = None,
    router: Sequence[float] | None = None,
    config: EngineConfig | None = None,
    policy: Fixed | None = None,
    spec: CascadeSpec | None = None,
) -> SimResult:
    stages = (LIGHT, HEAVY)
    sim = Simulation(
        spec=spec or two_stage_spec(gpus=8),
        profiles=profiles_for(stages),
        stages=stages,
        arrivals_s=arrivals,
        prompts=prompts if prompts is not None else list(range(len(arrivals))),
        confidences=[confidences, None],
        policy=policy or Fixed(directive),
        config=config or EngineConfig(slo_s=5.0),
        router_scores=router,
    )
    return sim.run()


def test_hadis_router_in_the_light_worker_routes_by_its_index_rule() -> None:
    """`hadis` roles: the router runs in the light worker (`sim.routing`, HADIS's rule)."""
    roles = (
        WorkerRole("light", 1, router_share=0.3, next_stage="heavy"),
        WorkerRole("light", 1, router_share=0.3, next_stage="heavy"),
        WorkerRole("heavy", 1),
        WorkerRole("heavy", 1),
    )
    start = dataclasses.replace(plan([2, 2], [1, 1], 0.0, NAMES), entry_stage="light")
    # prompt k scores k; HADIS's index rule cuts at sorted[int(10 x 0.7) - 1] = 6, so the
    # top 30 % routes four prompts of ten (r x N, plus the one at the cut)
    arrivals = [0.1 * k for k in range(10)]
    scores = [float(k) for k in range(10)]
    result = run(
        Directive(plan=start, roles=roles), arrivals, router=scores, confidences=[1.0] * 10
    )
    assert [k for k in range(10) if result.routed[k]] == [6, 7, 8, 9]
    assert [result.served_by[k] for k in range(10)] == [0] * 6 + [1] * 4
    # a routed query registers at the entry worker, then at the heavy stage; no image first
    assert sum(1 for _, s in result.registrations if s == 0) == 10
    assert not any(result.deferred)
    # r = 0 still marks the top prompt hard under HADIS's rule
    zero = tuple(dataclasses.replace(r, router_share=0.0) if r.router_share else r for r in roles)
    result = run(Directive(plan=start, roles=zero), arrivals, router=scores, confidences=[1.0] * 10)
    assert [k for k in range(10) if result.routed[k]] == [9]


def test_a_plans_router_share_goes_through_the_products_routing_rule() -> None:
    """`decide()`'s plans: the `<cascade>` router runs the worker package's own rule
    (`routing.rule.route`) before any worker: the same cut, but r = 0 routes nothing, a
    routed query never registers at the entry stage, and the exploration share of the
    spec's router sends some would-be-heavy prompts through the entry stage anyway."""
    base = plan([2, 2], [1, 1], 0.0, NAMES)
    light = dataclasses.replace(base.variants[0], next_stage="heavy")
    routed_plan = dataclasses.replace(
        base, variants=(light, base.variants[1]), router_share=0.3, entry_stage="light"
    )
    arrivals = [0.1 * k for k in range(10)]
    scores = [float(k) for k in range(10)]
    spec = two_stage_spec(gpus=8, router={"scorer": "rule", "reference": "hadis-rule"})
    result = run(
        Directive(plan=routed_plan), arrivals, router=scores, confidences=[1.0] * 10, spec=spec
    )
    assert [k for k in range(10) if result.routed[k]] == [6, 7, 8, 9]
    assert sum(1 for _, s in result.registrations if s == 0) == 6
    assert sum(1 for _, s in result.registrations if s == 1) == 4
    zero = dataclasses.replace(routed_plan, router_share=0.0)
    result = run(Directive(plan=zero), arrivals, router=scores, confidences=[1.0] * 10, spec=spec)
    assert not any(result.routed)
    # everything would go heavy at r = 1; a 0.5 exploration share keeps about half at entry
    explore = two_stage_spec(
        gpus=8, router={"scorer": "learned", "reference": "hadis-rule", "explorationShare": 0.5}
    )
    many = [0.01 * k for k in range(200)]
    result = run(
        Directive(plan=dataclasses.replace(routed_plan, router_share=1.0)),
        many,
        router=[float(k) for k in range(200)],
        confidences=[1.0] * 200,
        spec=explore,
    )
    assert 70 <= sum(result.routed) <= 130
    assert all(result.entered_at[k] == 0 for k in range(200) if not result.routed[k])


def test_a_plan_that_names_its_entry_stage_receives_every_arrival_there() -> None:
    entered_heavy = dataclasses.replace(plan([1, 2], [1, 1], 0.0, NAMES), entry_stage="heavy")
    result = run(Directive(plan=entered_heavy), [0.5 * k for k in range(6)])
    assert set(result.entered_at) == {1}
    assert set(result.served_by) == {1}
    assert all(stage == 1 for _, stage in result.registrations)


def test_workers_take_roles_in_order_and_keep_their_queue_when_the_model_changes() -> None:
    roles = (
        WorkerRole("light", 1, escalate_share=0.5, router_share=None, next_stage="heavy"),
        WorkerRole("heavy", 1),
    )
    start = dataclasses.replace(plan([1, 1], [1, 1], 0.0, NAMES), entry_stage="light")
    confidences = [k / 10 for k in range(10)]  # the lowest half escalates (c = 0.5)
    result = run(
        Directive(plan=start, roles=roles),
        [0.2 * k for k in range(10)],
        confidences=confidences,
    )
    # escalation_cut(c=0.5) on 10 values is sorted[4] = 0.4: prompts 0..3 go to heavy
    assert [k for k in range(10) if result.deferred[k]] == [0, 1, 2, 3]
    assert [result.served_by[k] for k in range(4)] == [1, 1, 1, 1]


def test_hadis_admission_starts_a_query_until_one_and_a_half_slos() -> None:
    # one heavy worker (1 s a query), 8 queries at once, SLO 5 s: our rule drops those whose
    # batch would end after 5 s, HADIS's workers run them until 7.5 s (late answers)
    only_heavy = dataclasses.replace(plan([0, 1], [1, 1], 0.0, NAMES), entry_stage="heavy")
    ours = run(Directive(plan=only_heavy), [0.0] * 8)
    hadis = run(
        Directive(plan=only_heavy),
        [0.0] * 8,
        config=EngineConfig(slo_s=5.0, admission_factor=1.5),
    )
    assert sum(1 for s in ours.served_by if s == NOT_SERVED) == 3
    assert sum(1 for s in hadis.served_by if s == NOT_SERVED) == 1
    # unfinished at 2 x SLO counts as dropped (HADIS's controller expires it there)
    summary = summarize(
        hadis,
        quality=None,
        scenario="s",
        policy="p",
        trace="t",
        gpus=1,
        startup_s=0.0,
        dispatch="random",
        drop_after_slo=1.2,
    )
    assert (summary.late, summary.dropped) == (1, 2)  # 6 s and 7 s answers: 7 s > 1.2 x 5


def test_random_dispatch_spreads_queries_without_looking_at_queues() -> None:
    two_light = plan([2, 0], [1, 1], 0.0, NAMES)
    arrivals = [0.08 * k for k in range(250)]  # 12.5 qps on 20 qps of capacity
    least = run(Directive(plan=two_light), arrivals)
    random = run(
        Directive(plan=two_light),
        arrivals,
        config=EngineConfig(slo_s=5.0, dispatch=Dispatch.RANDOM),
    )
    assert NOT_SERVED not in least.served_by and NOT_SERVED not in random.served_by

    def waited(result: SimResult) -> float:
        return sum(f - a for f, a in zip(result.finish_s, result.arrival_s, strict=True))

    # least-loaded never queues behind a busy worker while the other idles; a coin flip does
    assert waited(least) == sum([0.1] * 250)
    assert waited(random) > waited(least) + 1.0


def test_the_cluster_tick_counts_dropped_queries_until_two_slos() -> None:
    only_heavy = dataclasses.replace(plan([0, 1], [1, 1], 0.0, NAMES), entry_stage="heavy")
    policy = Fixed(Directive(plan=only_heavy))
    run(Directive(plan=only_heavy), [0.0] * 8 + [16.0], policy=policy)
    # 3 dropped at dequeue stay in the system until 10 s (2 x SLO), the rest until answered
    by_second = {round(t.at): t.in_system for t in policy.ticks}
    assert by_second[1] == 7  # the first answered at 1 s
    assert by_second[6] == 3
    assert by_second[11] == 0
