"""The simulated cluster's static inputs: stages, batch latency, gate confidences, directives."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from diffcascade_operator.plan import Plan
from diffcascade_operator.profiles import DeferCurve, QualityCurve, batch_latency_ms, fid_at

#: Prompts in the reference gate data; trace prompt indices wrap around it.
REFERENCE_PROMPTS = 5000


class Routing(StrEnum):
    """How a stage's output is routed to the next stage."""

    GATE = "gate"  # query-aware: defer when the prompt's gate confidence < threshold
    RANDOM = "random"  # query-agnostic: defer with probability p (a coin flip per query)
    LAST_ONLY = "last-only"  # no cascade: every query enters the last stage directly


@dataclass(frozen=True)
class WorkerRole:
    """What one GPU worker runs, for controllers that assign workers one by one (HADIS).

    Shares are percentiles of the reference distributions (`sim.routing`): `escalate_share`
    c of the stage's own gate confidences, `router_share` r of the router scores (None: the
    worker runs no router). `next_stage` receives its routed and escalated queries (None:
    it answers everything itself).
    """

    stage: str
    batch_size: int
    escalate_share: float = 0.0
    router_share: float | None = None
    next_stage: str | None = None


@dataclass(frozen=True)
class Directive:
    """What a policy tells the simulated cluster: a Plan plus how queries are routed."""

    plan: Plan
    routing: Routing = Routing.GATE
    defer_probability: float = 0.0  # used by Routing.RANDOM
    solved: bool = False  # this decision ran the allocator (counted in solve_ms percentiles)
    #: One role per GPU worker in registration order, replacing the plan's replica counts
    #: (a worker keeps its queue when its model changes, as HADIS's workers do); queries
    #: enter at the plan's entry stage.
    roles: tuple[WorkerRole, ...] | None = None
    #: Several stages share client traffic evenly per worker (HADIS's load balancer when
    #: every worker sits at the first level: INFaaS, Proteus); None: the plan's entry stage.
    entry_stages: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StageModel:
    name: str
    batch_latency_ms: Mapping[int, float]  # profiled batch sizes -> mean latency of one batch
    gpus_per_replica: int = 1
    startup_s: float = 0.0  # a new replica is ready this long after it is asked for
    _seconds: dict[int, float] = field(default_factory=dict, compare=False, repr=False)

    def latency(self, n: int) -> float:
        """Seconds for a batch of n, by the profile rule the allocator plans with
        (`profiles.batch_latency_ms`: linear between profiled sizes, like the DiffServe
        worker's neighbour mean at the midpoints). Memoised: the engine asks often."""
        cached = self._seconds.get(n)
        if cached is None:
            cached = batch_latency_ms(self.batch_latency_ms, n) / 1000.0
            self._seconds[n] = cached
        return cached


def confidences_from_curve(curve: DeferCurve, *, count: int = REFERENCE_PROMPTS) -> list[float]:
    """Per-prompt confidences whose empirical CDF is the curve f(t) (inverse-CDF sampling).

    Used when no per-prompt reference data exists for a gate (an inline or calibrated
    curve): prompt i gets the f-quantile of a fixed hash of i, so runs are reproducible
    and `fraction(conf < t)` matches f(t) up to sampling noise.
    """
    ts, fs = curve.thresholds, curve.fractions
    out: list[float] = []
    for i in range(count):
        digest = hashlib.blake2b(str(i).encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        out.append(_inverse_cdf(ts, fs, u))
    return out


def _inverse_cdf(ts: Sequence[float], fs: Sequence[float], u: float) -> float:
    if u < fs[0]:
        return ts[0] * (u / fs[0]) if fs[0] > 0 else ts[0]
    if u >= fs[-1]:
        return 1.0 if ts[-1] < 1.0 else ts[-1]
    k = bisect.bisect_right(fs, u)  # fs[k-1] <= u < fs[k]
    lo_f, hi_f = fs[k - 1], fs[k]
    frac = (u - lo_f) / (hi_f - lo_f) if hi_f > lo_f else 0.0
    return ts[k - 1] + frac * (ts[k] - ts[k - 1])


def random_mix_quality(curve: QualityCurve) -> QualityCurve:
    """FID of a query-agnostic random split: linear between all-heavy and all-light FID.

    A random split cannot pick the easy prompts for the light model, so none of the cascade
    curve's dip is available; the mixture's FID is taken as the straight line between the
    end points (the curve at light share 0 and 1), an approximation of a mixture's FID.
    """
    heavy = fid_at(curve, 0.0)
    light = fid_at(curve, 1.0)
    return QualityCurve(light_shares=(0.0, 1.0), fids=(heavy, light))
