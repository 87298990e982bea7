"""What a stage's dispatch costs in latency: the ways to run a stage the allocator chooses from.

A stage runs as replicas behind a dispatcher. With a queue-aware dispatcher (least loaded:
`diffcascade up`'s router, the simulator's default) a query waits only when every replica is
busy, and the allocator plans as DiffServe does: the batch's latency, capacity up to the
demand. With uniformly random dispatch (a Kubernetes Service under kube-proxy's iptables
mode, HADIS's load balancer) each replica is a queue of its own: a query may land behind a
busy replica while another idles, so a replica planned near full load misses the SLO
however the stage as a whole is sized (on HADIS's E1 an oracle planning 1.05 x the true
rate misses 5-20 % of its queries).

Under random dispatch each replica sees Poisson arrivals at its share of the rate and serves
them at c = s(b)/b seconds each (its batch's per-image cost): an M/D/1 queue. A query's time
at the stage is at most its wait for the work ahead (the queue's virtual waiting time V) plus
its own batch s(b). Cramér-Lundberg gives the tail of V: P(V > w) ~ C exp(-x w / c), x the
positive root of rho (e^x - 1) = x, C = (1 - rho) / (rho e^x - 1) (checked against a direct
M/D/1 simulation in the tests).

Paths share a budget: at most `TAIL_PROBABILITY` of all queries may be late (`path_tails`).
A query that runs one stage (the light stage alone, or routed straight to the heavy one)
may wait up to the SLO minus its batch; an escalated query runs two stages and splits its
time between them by the options the allocator picks. A stage option is therefore (batch b,
waiting allowance w on the escalated path) with the highest utilisation that meets both
tails; the allocator picks one option per stage, so a larger allowance (fewer replicas)
competes with a larger batch or a heavier pair for the same SLO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache


class Dispatch(StrEnum):
    """How a stage's replicas share its queries (what the cluster really runs)."""

    LEAST_LOADED = "least-loaded"  # queue-aware: `diffcascade up`'s router
    ROUND_ROBIN = "round-robin"  # kube-proxy in IPVS mode
    RANDOM = "random"  # uniform: a Kubernetes Service (kube-proxy iptables), HADIS's balancer


#: The share of all queries a plan may let finish after the SLO for waiting (random dispatch).
TAIL_PROBABILITY = 0.03
#: Of that budget, the share given to queries the light stage answers alone: its waits are
#: cheap to bound (small per-image cost, the whole SLO to wait in), the heavy stage's are not.
LIGHT_ONLY_BUDGET = 0.1
#: Of an escalated query's budget, the share its light stage may use: a light stage's waits
#: are short in seconds, so a small tail there costs few replicas; the heavy stage's are not.
ESCALATED_LIGHT_SHARE = 0.125
#: Waiting allowances tried on the escalated path, in multiples of the per-image cost.
WAIT_MULTIPLES = (
    *(0.5 * k for k in range(1, 9)),  # 0.5 .. 4
    5.0,
    6.0,
    7.0,
    8.0,
    10.0,
    12.0,
    14.0,
    16.0,
    20.0,
    24.0,
    32.0,
    40.0,
    48.0,
    64.0,
    96.0,
    128.0,
)


@dataclass(frozen=True)
class StageOption:
    """One way to run a stage: a batch size, the time an escalated query spends at the stage
    (batch plus waiting allowance) and the rate one replica may take."""

    batch: int
    batch_s: float  # latency of one batch
    latency_s: float  # what the escalated path is charged: batch_s + waiting allowance
    capacity_qps: float  # per replica: utilisation cap x b / batch_s


@dataclass(frozen=True)
class PathTails:
    """Per path, the probability a query on it may wait past its time (None: no such path)."""

    light_only: float | None  # the light stage answers it
    routed: float | None  # the router sent it straight to the heavy stage
    escalated_light: float | None  # a query that runs both stages: at its light stage
    escalated_heavy: float | None  # ... and at its heavy stage


def _lundberg_root(rho: float) -> float:
    """The positive root x of rho (e^x - 1) = x, for 0 < rho < 1."""
    lo, hi = 1e-12, 1.0
    while rho * math.expm1(hi) <= hi:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if rho * math.expm1(mid) > mid:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def wait_tail(rho: float, wait_in_services: float) -> float:
    """P(V > w) of an M/D/1 queue at utilisation rho, w in units of the service time."""
    if rho <= 0.0:
        return 0.0
    if rho >= 1.0:
        return 1.0
    x = _lundberg_root(rho)
    constant = (1.0 - rho) / (rho * math.exp(x) - 1.0)
    return min(1.0, constant * math.exp(-x * wait_in_services))


@lru_cache(maxsize=4096)
def utilisation_cap(wait_in_services: float, tail: float = TAIL_PROBABILITY) -> float:
    """The highest utilisation whose waiting time exceeds `wait_in_services` (in service
    times) with probability at most `tail` (bisection on the monotone tail)."""
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail probability must lie in (0, 1), got {tail}")
    if wait_in_services <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if wait_tail(mid, wait_in_services) <= tail:
            lo = mid
        else:
            hi = mid
    return lo


def steady_queue(rho: float, replicas: int) -> float:
    """Queries waiting at a stage of `replicas` random-dispatch replicas at utilisation rho in
    steady state: replicas x the M/D/1 mean queue rho^2 / (2 (1 - rho)); inf at rho >= 1."""
    if rho <= 0.0 or replicas <= 0:
        return 0.0
    if rho >= 1.0:
        return math.inf
    return replicas * rho * rho / (2.0 * (1.0 - rho))


def _down(value: float, base: float) -> float:
    """`value` rounded down to base x 2^(k/4) (fewer distinct caps to compute; conservative)."""
    if value <= 0.0:
        return 0.0
    return float(base * 2.0 ** (math.floor(4.0 * math.log2(value / base) + 1e-9) / 4.0))


def path_tails(
    *, light_only: float, routed: float, escalated: float, total: float = TAIL_PROBABILITY
) -> PathTails:
    """How a configuration spends the budget `total` over its paths (shares of all queries).

    `LIGHT_ONLY_BUDGET` of it to the light-only path (all of it when no query reaches the
    heavy stage), the rest to the paths through the heavy stage in proportion to their
    shares, so each query that reaches it may be late with the same probability; an
    escalated query gives `ESCALATED_LIGHT_SHARE` of its tail to its light stage and the rest
    to its heavy stage. Conditional tails are rounded down (`_down`) and capped at 1/2.
    """
    heavy = routed + escalated
    light_budget = total if heavy <= 0.0 else total * LIGHT_ONLY_BUDGET

    def tail(budget: float, share: float) -> float | None:
        if share <= 0.0:
            return None
        return min(0.5, _down(budget / share, total / 64.0))

    heavy_tail = tail(total - light_budget, heavy) if heavy > 0.0 else None
    both = heavy_tail if heavy_tail is not None and escalated > 0.0 else None
    return PathTails(
        light_only=tail(light_budget, light_only),
        routed=heavy_tail if routed > 0.0 else None,
        escalated_light=None if both is None else both * ESCALATED_LIGHT_SHARE,
        escalated_heavy=None if both is None else both * (1.0 - ESCALATED_LIGHT_SHARE),
    )


def stage_options(
    batch_latency_s: Mapping[int, float],
    dispatch: Dispatch,
    *,
    direct_tail: float | None = None,
    direct_s: float = math.inf,
    escalated_tail: float | None = None,
) -> tuple[StageOption, ...]:
    """The options the allocator may choose for one stage, ordered by batch then latency.

    Queue-aware dispatch: one per batch (latency s(b), capacity b / s(b)), the model DiffServe
    plans with. Random dispatch: per batch, the utilisation cap of the stage's one-stage path
    (`direct_tail` of waiting past `direct_s` minus the batch; None: no such path) and, when
    escalated queries pass the stage (`escalated_tail`), one option per waiting allowance.
    An option that is no faster than another and takes no more load is dropped (exact: the
    allocator would never prefer it; between equal ones the smaller batch stays).
    Round-robin counts as queue-aware: each replica's arrivals are regular.
    """
    table = tuple(sorted(batch_latency_s.items()))
    if dispatch is not Dispatch.RANDOM:
        return tuple(StageOption(b, s, s, b / s) for b, s in table)
    return _random_options(table, direct_tail, round(direct_s, 6), escalated_tail)


@lru_cache(maxsize=4096)
def _random_options(
    table: tuple[tuple[int, float], ...],
    direct_tail: float | None,
    direct_s: float,
    escalated_tail: float | None,
) -> tuple[StageOption, ...]:
    options = []
    for b, s in table:
        per_image = s / b
        direct = 1.0
        if direct_tail is not None:
            direct = utilisation_cap(_down((direct_s - s) / per_image, 0.5), direct_tail)
        if escalated_tail is None:
            options.append(StageOption(b, s, s, direct * b / s))
            continue
        for k in WAIT_MULTIPLES:
            cap = min(direct, utilisation_cap(k, escalated_tail))
            options.append(StageOption(b, s, s + k * per_image, cap * b / s))
    options = [o for o in options if o.capacity_qps > 0.0]
    # Pareto front: by latency (then more capacity, then smaller batch), keep an option only
    # when it takes strictly more load than every faster or equally fast one
    options.sort(key=lambda o: (o.latency_s, -o.capacity_qps, o.batch))
    kept: list[StageOption] = []
    best = 0.0
    for option in options:
        if option.capacity_qps > best:
            kept.append(option)
            best = option.capacity_qps
    return tuple(sorted(kept, key=lambda o: (o.batch, o.latency_s)))


__all__ = [
    "ESCALATED_LIGHT_SHARE",
    "LIGHT_ONLY_BUDGET",
    "TAIL_PROBABILITY",
    "WAIT_MULTIPLES",
    "Dispatch",
    "PathTails",
    "StageOption",
    "path_tails",
    "stage_options",
    "steady_queue",
    "utilisation_cap",
    "wait_tail",
]
