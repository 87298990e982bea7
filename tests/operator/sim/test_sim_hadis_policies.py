"""The HADIS artifact's controllers as ported (`sim/hadis.py`): the documented behaviours,
and the `hadis` MILP against a brute-force enumeration of the same problem."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from diffcascade_operator.control import decide
from diffcascade_operator.profiles import CascadeProfiles, profiles_from_spec
from diffcascade_operator.sim.engine import ClusterTick
from diffcascade_operator.sim.hadis import (
    Bookkeeping,
    HadisDiffServePolicy,
    HadisPolicy,
    InfaasPolicy,
    ProteusPolicy,
    _Assignment,
    assign_in_order,
    ewma_last,
    planner_latency_s,
    queue_delay,
    solve_hadis,
    table_pairs,
)
from diffcascade_operator.sim.policies import OraclePolicy, make_policy
from diffcascade_operator.sim.run import stage_models
from diffcascade_operator.sim.scenarios import load_scenario
from diffcascade_operator.snapshot import DemandSample, Snapshot

SCENARIO = load_scenario("hadis-sd35")
SPEC = SCENARIO.spec
PROFILES: CascadeProfiles = profiles_from_spec(SPEC)
TABLE = PROFILES.table
assert TABLE is not None
NAMES = [v.name for v in SPEC.variants]
LATENCY = [planner_latency_s(v.batch_latency_ms) for v in PROFILES.variants]


def snapshot(now: float = 0.0) -> Snapshot:
    return Snapshot(spec=SPEC, profiles=PROFILES, now=now, demand=())


def test_the_planner_rounds_the_e1_profile_to_a_tenth_of_a_second() -> None:
    assert list(LATENCY[0].values()) == [0.1, 0.1, 0.2, 0.4, 0.7, 1.4]
    assert list(LATENCY[1].values()) == [0.1, 0.2, 0.5, 0.9, 1.9, 3.7]
    assert list(LATENCY[2].values()) == [1.3, 2.3, 4.7, 9.4, 18.7, 37.4]
    assert list(LATENCY[3].values()) == [2.7, 4.9, 9.7, 19.4, 38.9, 77.8]


def brute_force(demand: float, queue_s: float = 0.0) -> tuple[Any, int, int] | None:
    """Every row x batch pair x minimal workers, per pair by (FID, table order, workers,
    latency); across pairs the first strictly lower FID in solve_milp_loop's pair order."""
    best: tuple[Any, int, int] | None = None
    for light, heavy in [(2, 3), (1, 2), (0, 1)]:
        found: tuple[tuple[float, int, int, float], tuple[Any, int, int]] | None = None
        for k, row in enumerate(TABLE.rows):
            if row.pair != (NAMES[light], NAMES[heavy]):
                continue
            for (bl, ll), (bh, lh) in itertools.product(
                LATENCY[light].items(), LATENCY[heavy].items()
            ):
                if ll + lh + queue_s > 6.0 + 1e-9:
                    continue
                xl = math.ceil(demand * ll / bl - 1e-9)
                xh = math.ceil(demand * row.heavy_share * lh / bh - 1e-9)
                if xl + xh <= 16 and (found is None or (row.fid, k, xl + xh, ll + lh) < found[0]):
                    found = ((row.fid, k, xl + xh, ll + lh), (row, xl, xh))
        if found is not None and (best is None or found[1][0].fid < best[0].fid):
            best = found[1]
    return best


def milp(demand: float, queue_s: float = 0.0) -> tuple[Any, int, int] | None:
    solution = solve_hadis(
        TABLE,
        NAMES,
        LATENCY,
        demand=demand,
        queue_s=[0.0, 0.0, queue_s, 0.0],
        workers=16,
        slo_s=6.0,
    )
    if solution is None:
        return None
    return solution.row, solution.light_workers, solution.heavy_workers


def test_the_hadis_milp_equals_a_brute_force_enumeration_from_1_to_80_qps() -> None:
    differ = [d for d in range(1, 81) if milp(d) != brute_force(d)]
    assert differ == []
    assert milp(30.0, queue_s=1.5) == brute_force(30.0, queue_s=1.5)  # queue terms count


@pytest.mark.parametrize(
    ("demand", "pair", "r", "c", "fid"),
    [
        (4, ("sd35-medium", "sd35-large"), 0.2, 0.5, 19.29),
        (8, ("sd35-medium", "sd35-large"), 0.2, 0.0, 19.77),
        (12, ("sd35-large-turbo", "sd35-medium"), 0.8, 0.6, 20.50),
        (24, ("sd35-large-turbo", "sd35-medium"), 0.1, 0.4, 21.52),
        (64, ("sd35-large-turbo", "sd35-medium"), 0.0, 0.1, 23.85),
        (72, ("sdxl-lightning", "sd35-large-turbo"), 0.7, 0.1, 24.88),
    ],
)
def test_hadis_picks_2_3_at_low_demand_1_2_in_the_middle_and_0_1_near_the_top(
    demand: float, pair: tuple[str, str], r: float, c: float, fid: float
) -> None:
    found = milp(demand)
    assert found is not None
    row = found[0]
    assert (row.pair, row.router_share, row.escalate_share, row.fid) == (pair, r, c, fid)


def test_pairs_are_solved_in_solve_milp_loops_order() -> None:
    assert table_pairs(TABLE, NAMES) == [(2, 3), (1, 2), (0, 1)]


def test_no_demand_or_no_feasible_pair_puts_every_worker_on_the_lightest_model() -> None:
    policy = HadisPolicy(name="hadis", spec=SPEC, profiles=PROFILES)
    directive = policy.decide(snapshot(), None)
    assert directive.roles is not None
    assert {r.stage for r in directive.roles} == {"sdxl-lightning"}
    assert {r.batch_size for r in directive.roles} == {1}
    assert {(r.escalate_share, r.router_share) for r in directive.roles} == {(0.0, 0.0)}
    assert directive.plan.row is None  # scored as the table's worst row
    assert milp(500.0) is None


def test_demand_is_the_in_system_count_times_1_05_with_a_halflife_of_3_ticks() -> None:
    book = Bookkeeping(4)
    tick = ClusterTick(at=1.0, in_system=10, arrivals=(0, 3, 0, 0), queue=(0, 2, 0, 0))
    book.observe(tick)
    assert book.system_ewma == pytest.approx(10.5)
    book.observe(ClusterTick(at=2.0, in_system=0, arrivals=(0, 0, 0, 0), queue=(0, 0, 0, 0)))
    assert book.system_ewma == pytest.approx(10.5)  # zero samples are not appended
    book.observe(ClusterTick(at=3.0, in_system=20, arrivals=(0, 1, 0, 0), queue=(0, 0, 0, 0)))
    alpha = 1 - 0.5 ** (1 / 3)
    assert book.system_ewma == pytest.approx(10.5 * (1 - alpha) + 21.0 * alpha)
    # per-variant histories start at one 0 and keep the last 20
    assert book.arrival_ewma[1] == pytest.approx(ewma_last([0.0, 3.0, 1.0]))
    for _ in range(30):
        book.observe(tick)
    assert len(book.total) == 20


def test_the_queue_term_is_1_2_queue_over_arrivals_and_0_under_one_queued() -> None:
    assert queue_delay(6.0, 4.0) == pytest.approx(1.8)
    assert queue_delay(0.9, 4.0) == 0.0
    assert queue_delay(0.9, 4.0, guard=False) == pytest.approx(0.27)  # the DiffServe port
    assert queue_delay(5.0, 0.0) == 0.0


def test_roles_are_filled_in_worker_order_and_leftover_workers_keep_theirs() -> None:
    old = [_Assignment(0, 1, True)] * 4
    new = assign_in_order(old, [(2, 1, 1), (3, 2, 2)])
    assert new == [
        _Assignment(2, 1, True),
        _Assignment(3, 2, False),
        _Assignment(3, 2, False),
        _Assignment(0, 1, True),  # untouched: still a light-role SDXL-Lightning worker
    ]


def test_a_leftover_lower_level_worker_receives_all_client_traffic() -> None:
    policy = HadisPolicy(name="hadis", spec=SPEC, profiles=PROFILES)
    policy.decide(snapshot(), None)  # no demand: 16 x SDXL-Lightning
    policy.book.system_ewma = 2.0
    directive = policy.decide(snapshot(5.0), None)
    assert directive.plan.row is not None
    assert directive.plan.row.pair == ("sd35-medium", "sd35-large")
    assert directive.plan.entry_stage == "sdxl-lightning"  # the leftovers sit at level 0


def test_the_diffserve_port_starts_9_7_and_sheds_to_all_light_when_infeasible() -> None:
    policy = HadisDiffServePolicy(name="hadis-diffserve", spec=SPEC, profiles=PROFILES)
    start = policy.decide(snapshot(), None)
    assert start.roles is not None
    stages = [r.stage for r in start.roles]
    assert stages == ["sd35-large-turbo"] * 9 + ["sd35-large"] * 7
    assert {r.batch_size for r in start.roles} == {8}
    assert start.plan.threshold == 1.0 and start.plan.router_share == 0.0
    assert policy.solve(500.0, 0.0) is None
    policy.book.system_ewma = 500.0
    shed = policy.decide(snapshot(5.0), start.plan)
    assert shed.roles is not None
    assert [r.stage for r in shed.roles] == ["sd35-large-turbo"] * 16
    assert shed.plan.threshold == 0.0


def test_the_diffserve_port_maximises_t_with_f_of_t_equal_to_t() -> None:
    policy = HadisDiffServePolicy(name="hadis-diffserve", spec=SPEC, profiles=PROFILES)
    found = policy.solve(20.0, 0.0)
    assert found is not None
    x1, x2, b1, b2, t = found
    # the heavy stage serves t x demand: no larger t on the 0.005 grid fits the workers left
    assert x1 * b1 / LATENCY[1][b1] >= 20.0
    assert x2 * b2 / LATENCY[3][b2] >= 20.0 * t - 1e-9
    assert (16 - x1) * b2 / LATENCY[3][b2] < 20.0 * (t + 0.005)


def test_infaas_starts_heavy_steps_down_on_latency_and_jumps_on_a_long_queue() -> None:
    policy = InfaasPolicy(name="infaas-acc", spec=SPEC, profiles=PROFILES)
    policy.book.system_ewma = 10.0
    first = policy.decide(snapshot(), None)
    assert first.roles is not None
    assert {r.stage for r in first.roles} == {"sd35-large"}
    policy.book.queue_ewma = [0.0, 0.0, 0.0, 40.0]  # expected 4.9 + 0.225 x 40 / 6.5 > 6 s
    assert {r.stage for r in policy.decide(snapshot(5.0), None).roles or ()} == {"sd35-medium"}
    policy.book.queue_ewma = [0.0, 0.0, 61.0, 0.0]
    assert {r.stage for r in policy.decide(snapshot(10.0), None).roles or ()} == {"sdxl-lightning"}


def test_infaas_and_proteus_spread_clients_evenly_per_worker_with_no_cascade() -> None:
    proteus = ProteusPolicy(name="proteus", spec=SPEC, profiles=PROFILES)
    proteus.book.system_ewma = 4.0
    directive = proteus.decide(snapshot(), None)
    assert directive.roles is not None and directive.entry_stages is not None
    assert set(directive.entry_stages) == {r.stage for r in directive.roles}
    assert all(r.next_stage is None for r in directive.roles)
    assert {r.stage for r in directive.roles} == {"sd35-large"}  # the heaviest that fits
    proteus.book.system_ewma = 40.0
    busy = proteus.decide(snapshot(5.0), None)
    assert len({r.stage for r in busy.roles or ()}) > 1
    infaas = InfaasPolicy(name="infaas-acc", spec=SPEC, profiles=PROFILES)
    idle = infaas.decide(snapshot(), None)  # no demand: round-robin counts, batch 1
    stages = [r.stage for r in idle.roles or ()]
    assert stages == [n for n in NAMES for _ in range(4)]  # filled in worker order


def test_the_oracle_is_told_the_true_arrival_rate_of_the_next_interval() -> None:
    scenario = load_scenario("sdturbo-sdv15", gpus=4)
    profiles = profiles_from_spec(scenario.spec)
    oracle = make_policy(
        "oracle",
        spec=scenario.spec,
        profiles=profiles,
        stages=stage_models(scenario.spec, profiles),
        arrivals_s=[0.5 * k for k in range(100)],
    )
    assert isinstance(oracle, OraclePolicy)
    assert oracle.true_rate(10.0) == pytest.approx(2.0)
    snap = Snapshot(
        spec=scenario.spec,
        profiles=profiles,
        now=10.0,
        demand=(DemandSample(at=10.0, qps=50.0),),  # what Prometheus said: ignored
    )
    assert oracle.decide(snap, None).plan.demand_qps == pytest.approx(2.0 * 1.05)


def test_with_a_quality_table_decide_plans_an_entry_stage_past_the_first_variant() -> None:
    snap = Snapshot(spec=SPEC, profiles=PROFILES, now=5.0, demand=(DemandSample(at=5.0, qps=2.0),))
    plan = decide(snap, None)
    assert plan.entry_stage in NAMES[1:]
    assert plan.variants[NAMES.index(plan.entry_stage)].replicas >= 1


def test_clipper_runs_the_largest_fitting_batch_and_only_clipper_heavy_admits_at_one_slo() -> None:
    stages = stage_models(SPEC, PROFILES)
    light = make_policy("clipper-light", spec=SPEC, profiles=PROFILES, stages=stages)
    heavy = make_policy("clipper-heavy", spec=SPEC, profiles=PROFILES, stages=stages)
    assert {(r.stage, r.batch_size) for r in light.decide(snapshot(), None).roles} == {
        ("sdxl-lightning", 32)
    }
    assert {(r.stage, r.batch_size) for r in heavy.decide(snapshot(), None).roles} == {
        ("sd35-large", 2)
    }
    assert (light.admission_factor, heavy.admission_factor) == (1.5, 1.0)
    assert make_policy("hadis", spec=SPEC, profiles=PROFILES, stages=stages).admission_factor == 1.5
