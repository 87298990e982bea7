"""The output of `decide()`: what every variant should run and the threshold to push."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from diffcascade_operator.profiles import QualityRow


class SolverStatus(StrEnum):
    OPTIMAL = "Optimal"
    INFEASIBLE = "Infeasible"  # best-effort plan: all light, maximum throughput
    HELD = "Held"  # no new solve (paused, no metrics): the previous plan is kept
    INITIAL = "Initial"  # no demand seen yet
    FAILED = "Failed"  # inputs decide() cannot use: the previous plan is kept, the reason told


@dataclass(frozen=True)
class VariantAllocation:
    name: str
    replicas: int
    batch_size: int
    threshold: float | None  # gate threshold for stages that defer; None for the last stage
    #: The variant this stage forwards deferred queries to (drivers push its URL as the
    #: worker's next stage); None when it defers nothing in this plan's cascade.
    next_stage: str | None = None


@dataclass(frozen=True)
class SolverOutcome:
    status: SolverStatus
    solve_ms: float
    objective_value: float | None = None
    message: str = ""


@dataclass(frozen=True)
class Plan:
    variants: tuple[VariantAllocation, ...]  # ordered light -> heavy, every spec variant
    threshold: float  # the first stage's threshold (what `kubectl get dcas` shows)
    defer_fraction: float  # predicted f(threshold)
    demand_qps: float  # the demand estimate this plan was solved for
    predicted_latency_s: float
    predicted_throughput_qps: float
    predicted_fid: float | None
    solver: SolverOutcome
    reason: str  # one line a human can read
    decided_at: float
    # Hysteresis bookkeeping carried to the next decide(): per variant, since when a lower
    # replica count has been wanted. Not for display.
    scale_down_since: Mapping[str, float] = field(default_factory=dict)
    #: Where queries enter the cascade (a variant name); None: the first variant. A hybrid
    #: plan may start at any variant (HADIS's pairs start at 0, 1 or 2).
    entry_stage: str | None = None
    #: Router share r: the top-r share of prompts by router score skips the entry stage and
    #: goes straight to the stage it defers to (0: no pre-generation routing).
    router_share: float = 0.0
    #: The measured configuration (pair, r, c, h, FID) this plan was chosen at, when the
    #: spec has a quality table; None for plans on a 1-D curve.
    row: QualityRow | None = None

    def entry(self) -> str:
        """The variant queries enter at."""
        return self.entry_stage if self.entry_stage is not None else self.variants[0].name

    def replicas(self) -> dict[str, int]:
        return {v.name: v.replicas for v in self.variants}

    def gpus(self, gpus_per_replica: Mapping[str, int]) -> int:
        return sum(v.replicas * gpus_per_replica.get(v.name, 1) for v in self.variants)

    def same_allocation(self, other: Plan | None) -> bool:
        """True when applying `self` after `other` changes nothing on the workers."""
        return other is not None and other.variants == self.variants
