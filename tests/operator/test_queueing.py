"""What random dispatch costs: the M/D/1 tail, utilisation caps and the stage options."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from diffcascade_operator.queueing import (
    Dispatch,
    path_tails,
    stage_options,
    steady_queue,
    utilisation_cap,
    wait_tail,
)


def simulated_md1_tail(rho: float, wait: float, *, n: int = 60_000, seed: int = 1) -> float:
    """P(wait > w) of a FIFO queue with Poisson arrivals and service time 1, by simulation."""
    rng = random.Random(seed)
    now = free = 0.0
    late = 0
    for _ in range(n):
        now += rng.expovariate(rho)
        waited = max(0.0, free - now)
        late += waited > wait
        free = now + waited + 1.0
    return late / n


@pytest.mark.parametrize(("rho", "wait"), [(0.3, 1.0), (0.5, 2.0), (0.8, 2.0), (0.8, 4.0)])
def test_the_cramer_lundberg_tail_matches_a_simulated_md1_queue(rho: float, wait: float) -> None:
    simulated = simulated_md1_tail(rho, wait)
    assert wait_tail(rho, wait) == pytest.approx(simulated, rel=0.2, abs=0.003)


def test_the_utilisation_cap_is_the_highest_rho_whose_tail_fits() -> None:
    cap = utilisation_cap(4.0, 0.01)
    assert wait_tail(cap, 4.0) <= 0.01 < wait_tail(cap + 0.01, 4.0)
    assert utilisation_cap(2.0, 0.01) < cap < utilisation_cap(8.0, 0.01) < 1.0
    assert utilisation_cap(4.0, 0.001) < cap
    assert utilisation_cap(0.0, 0.01) == 0.0


def test_queue_aware_dispatch_keeps_one_option_per_batch_at_full_rate() -> None:
    table = {1: 1.3, 2: 2.34}
    for dispatch in (Dispatch.LEAST_LOADED, Dispatch.ROUND_ROBIN):
        options = stage_options(table, dispatch, direct_tail=0.01, escalated_tail=0.01)
        assert [(o.batch, o.latency_s, o.capacity_qps) for o in options] == [
            (1, 1.3, 1 / 1.3),
            (2, 2.34, 2 / 2.34),
        ]


def test_random_dispatch_trades_waiting_allowance_for_replica_load() -> None:
    table = {1: 1.3, 2: 2.34}
    options = stage_options(table, Dispatch.RANDOM, escalated_tail=0.01)
    assert all(o.capacity_qps < o.batch / o.batch_s for o in options)
    ordered = sorted(options, key=lambda o: o.latency_s)
    # the Pareto front: a longer allowance is only kept for more load per replica
    assert all(b.capacity_qps > a.capacity_qps for a, b in itertools.pairwise(ordered))
    # a stage that only answers single-stage queries may wait until its deadline less its
    # batch (6 s - 1.3 s: 3.6 services, rounded down), and its cap follows from that
    direct = stage_options(table, Dispatch.RANDOM, direct_tail=0.01, direct_s=6.0)
    assert all(o.latency_s == o.batch_s for o in direct)
    b1 = next(o for o in direct if o.batch == 1)
    assert utilisation_cap(3.0, 0.01) / 1.3 <= b1.capacity_qps <= utilisation_cap(3.62, 0.01) / 1.3


def test_the_budget_goes_mostly_to_the_paths_through_the_heavy_stage() -> None:
    tails = path_tails(light_only=0.9, routed=0.0, escalated=0.1, total=0.03)
    assert tails.routed is None and tails.light_only is not None
    assert tails.escalated_light is not None and tails.escalated_heavy is not None
    spent = 0.9 * tails.light_only + 0.1 * (tails.escalated_light + tails.escalated_heavy)
    assert spent <= 0.03 + 1e-12
    assert tails.escalated_heavy > tails.escalated_light
    alone = path_tails(light_only=1.0, routed=0.0, escalated=0.0, total=0.03)
    assert alone.light_only == pytest.approx(0.03) and alone.escalated_heavy is None


def test_steady_queue_is_the_md1_mean_queue_per_replica() -> None:
    assert steady_queue(0.5, 4) == pytest.approx(4 * 0.25 / 1.0)
    assert steady_queue(0.0, 4) == 0.0
    assert math.isinf(steady_queue(1.0, 2))
