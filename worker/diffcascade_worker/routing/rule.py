"""The routing rule, one function shared by the router service and the simulator.

A prompt goes straight to the heavy stage when its router score is at or above the score that
cuts off the top share r of the distribution the router was calibrated on; HADIS's
`isHardByRouter` cuts at `sorted[max(int(N * (1 - r)) - 1, 0)]`, and so does this module. One
difference, named: HADIS routes the single highest-scoring prompt even at r = 0 (the cut is then
the maximum itself); here r = 0 routes nothing, so a plan without a router share is exactly the
plain cascade.

Exploration: of the prompts the rule sends to heavy, a share goes through the gated entry stage
instead. Those prompts yield a label (the gate's confidence) from the region the learner would
otherwise never see again once it routes it away. The draw is an argument, so the rule stays
a pure function and each driver brings its own random numbers.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Target(StrEnum):
    ENTRY = "entry"  # the plan's entry stage (gated): the cascade as it would run anyway
    HEAVY = "heavy"  # straight to the heavy stage, no light image made


@dataclass(frozen=True)
class RouteDecision:
    target: Target
    score: float
    explored: bool = False  # the rule said heavy; exploration sent it to the entry stage


def cut_score(sorted_scores: Sequence[float], share: float) -> float:
    """The score at HADIS's percentile index for share r: `sorted[max(int(N*(1-r)) - 1, 0)]`."""
    if not sorted_scores:
        raise ValueError("no calibration scores: the cut needs a distribution")
    index = max(int(len(sorted_scores) * (1.0 - share)) - 1, 0)
    return float(sorted_scores[index])


def goes_heavy(
    score: float, *, share: float, sorted_scores: Sequence[float], tie_draw: float = 0.0
) -> bool:
    """The rule without exploration: top share r of the calibration distribution -> heavy.

    A score above the cut goes heavy, as in HADIS. Scores equal to the cut go heavy with the
    probability that keeps the expected share at HADIS's count (`tie_draw` uniform in [0, 1));
    with distinct scores that probability is 1 (HADIS exactly), but a scorer that gives many
    prompts one score (a learner before its first labels: all 0.5) would otherwise send all of
    them to heavy and overload the stage the plan sized for r."""
    if share >= 1.0:  # every prompt, from the first one on (no distribution needed)
        return True
    if share <= 0.0 or not sorted_scores:
        return False
    n = len(sorted_scores)
    index = max(int(n * (1.0 - share)) - 1, 0)
    cut = float(sorted_scores[index])
    if score != cut:
        return score > cut
    low = bisect.bisect_left(sorted_scores, cut)
    high = bisect.bisect_right(sorted_scores, cut)
    above, ties = n - high, high - low
    return tie_draw < (n - index - above) / ties


def route(
    score: float,
    *,
    share: float,
    sorted_scores: Sequence[float],
    exploration: float = 0.0,
    draw: float = 1.0,
    tie_draw: float = 0.0,
) -> RouteDecision:
    """Where one prompt goes. `draw` is uniform in [0, 1); below `exploration` a prompt the
    rule sends to heavy goes through the entry stage instead (and is marked explored).
    `tie_draw` (uniform in [0, 1)) settles a score equal to the cut (see `goes_heavy`)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"router share must lie in [0, 1], got {share!r}")
    if not 0.0 <= exploration <= 1.0:
        raise ValueError(f"exploration share must lie in [0, 1], got {exploration!r}")
    if not goes_heavy(score, share=share, sorted_scores=sorted_scores, tie_draw=tie_draw):
        return RouteDecision(Target.ENTRY, score)
    if draw < exploration:
        return RouteDecision(Target.ENTRY, score, explored=True)
    return RouteDecision(Target.HEAVY, score)


def effective_heavy_share(share: float, exploration: float) -> float:
    """The share of prompts that skip the entry stage: r x (1 - exploration)."""
    return share * (1.0 - exploration)


class ScoreWindow:
    """The distribution the cut is taken from: the scores of the last `size` prompts seen.

    A learned scorer changes as it trains, so its cut must follow its own recent scores;
    seeded (e.g. with a reference prompt set's scores) it routes from the first prompt on.
    """

    def __init__(self, size: int = 2000, seed: Iterable[float] = ()) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []
        for value in seed:
            self.add(value)

    def add(self, score: float) -> None:
        if len(self._order) == self.size:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(score)
        bisect.insort(self._sorted, score)

    def clear(self) -> None:
        self._order.clear()
        self._sorted.clear()

    @property
    def sorted_scores(self) -> Sequence[float]:
        return self._sorted

    def __len__(self) -> int:
        return len(self._sorted)
