"""The policies a simulation can run: ours, the paper's, and the paper's baselines.

- `diffcascade`: the shipped controller: `decide()` with the scenario's objective
  (MinExpectedFID), degraded answers on, planning with live profiles re-learnt from the
  simulated workers' histograms as the operator does.
- `diffcascade-static`: an ablation, the same with the offline profiles only.
- `diffserve`: the DiffServe artifact's controller as its code runs it (`sim/diffserve.py`:
  1.2 x in-flight demand, every GPU in a role, hold on infeasible, no degraded answers).
- `max-threshold`: an ablation, our `decide()` with the paper's objective (MaxThreshold) and
  estimator settings (headroom 1.05, no trend term, no scale-down stabilisation), no degraded
  answers: what `diffserve` was before it followed the artifact, so each effect shows alone.
- `clipper-light` / `clipper-heavy`: every GPU on the light / heavy model, the batch with the
  best throughput whose latency fits the SLO; nothing deferred / every query straight to heavy.
- `proteus`: query-agnostic: the same controller plans with a random-split deferral curve
  f(p) = p and the random-mix FID line; each query is deferred by a coin flip with
  probability p after the light stage.
- `static`: the paper's fixed allocation (DiffServe artifact `static_alloc`), scaled to the
  GPU budget.
- `oracle`: `decide()` told the true arrival rate of the next control interval (from the
  trace), with the offline profiles and no replica start-up delay: the best this planner can
  do, the reference every other policy's FID gap is measured against (every scenario).

On a scenario with a quality table (HADIS's benchmark, `hadis-sd35`) `clipper-light`,
`clipper-heavy` and `proteus` are the HADIS artifact's versions of those baselines, beside
its `hadis`, `hadis-diffserve` and `infaas-acc` (`sim/hadis.py`).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.profiles import THRESHOLD_GRID, CascadeProfiles, DeferCurve, QualityCurve
from diffcascade_operator.sim.diffserve import DiffServeArtifactPolicy
from diffcascade_operator.sim.hadis import HADIS_POLICIES, make_hadis_policy
from diffcascade_operator.sim.model import Directive, Routing, StageModel, random_mix_quality
from diffcascade_operator.sim.scenarios import override
from diffcascade_operator.snapshot import DemandSample, Snapshot
from diffcascade_operator.spec import CascadeSpec, Objective

POLICIES = (
    "diffcascade",
    "diffcascade-static",
    "diffserve",
    "max-threshold",
    "clipper-light",
    "clipper-heavy",
    "proteus",
    "static",
    "oracle",
    "hadis",
    "hadis-diffserve",
    "infaas-acc",
)
#: Policies that run only on a scenario with a quality table (HADIS's benchmark).
HADIS_ONLY = ("hadis", "hadis-diffserve", "infaas-acc")

#: DiffServe artifact `static_alloc` for 16 GPUs: threshold, light GPUs, heavy GPUs, batches.
STATIC_16: dict[str, tuple[float, int, int, int, int]] = {
    "c1": (0.02, 4, 12, 16, 4),
    "c2": (0.12, 2, 14, 32, 4),
    "c3": (0.02, 9, 7, 4, 2),
}
_CASCADE_BY_CURVE = {"sd-turbo": "c1", "sdxs": "c2", "sdxl-lightning": "c3"}

Decider = Callable[[Snapshot, Plan | None], Plan]


class PolicyError(ValueError):
    """A policy that cannot run on this scenario."""


class DecidePolicy:
    """A policy driven by the controller's `decide()` on a (possibly adjusted) spec."""

    def __init__(
        self,
        *,
        name: str,
        spec: CascadeSpec,
        decider: Decider,
        degrade: bool,
        profiles: CascadeProfiles | None = None,
        routing: Routing = Routing.GATE,
        quality: QualityCurve | None = None,
        live_profiles: bool = False,
    ) -> None:
        self.name = name
        self.degrade = degrade
        self.live_profiles = live_profiles  # the engine derives live profiles for this policy
        self.spec = spec
        self.decider = decider
        self.profiles = profiles  # replaces the snapshot's profiles when set
        self.routing = routing
        self.quality = quality
        #: steps as the operator does (`control.step_due`), not only every interval
        self.product_cadence = True

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        changes: dict[str, Any] = {"spec": self.spec}
        if self.profiles is not None:
            changes["profiles"] = self.profiles
        plan = self.decider(dataclasses.replace(snapshot, **changes), previous)
        solved = plan is not previous and plan.solver.status in (
            SolverStatus.OPTIMAL,
            SolverStatus.INFEASIBLE,
        )
        probability = min(1.0, max(0.0, plan.defer_fraction))
        return Directive(
            plan=plan, routing=self.routing, defer_probability=probability, solved=solved
        )


class OraclePolicy(DecidePolicy):
    """`decide()` told the true arrival rate of the next interval (see the module doc)."""

    def __init__(self, *, arrivals_s: Sequence[float], interval_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arrivals = sorted(arrivals_s)
        self.interval = interval_s

    def true_rate(self, now: float) -> float:
        lo = bisect.bisect_left(self.arrivals, now)
        hi = bisect.bisect_left(self.arrivals, now + self.interval)
        return (hi - lo) / self.interval

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        told = (DemandSample(at=snapshot.now, qps=self.true_rate(snapshot.now)),)
        return super().decide(dataclasses.replace(snapshot, demand=told), previous)


class FixedPolicy:
    """The same plan at every tick (no controller)."""

    def __init__(
        self,
        *,
        name: str,
        plan: Plan,
        routing: Routing = Routing.GATE,
        quality: QualityCurve | None = None,
    ) -> None:
        self.name = name
        self.degrade = False
        self.plan = plan
        self.routing = routing
        self.quality = quality

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        return Directive(plan=self.plan, routing=self.routing)


def _fixed_plan(
    spec: CascadeSpec,
    *,
    replicas: dict[str, int],
    batches: dict[str, int],
    threshold: float,
    defer_fraction: float,
    reason: str,
) -> Plan:
    last = spec.variants[-1].name
    variants = tuple(
        VariantAllocation(
            name=v.name,
            replicas=replicas.get(v.name, 0),
            batch_size=batches.get(v.name, 1),
            threshold=None if v.name == last else threshold,
        )
        for v in spec.variants
    )
    return Plan(
        variants=variants,
        threshold=threshold,
        defer_fraction=defer_fraction,
        demand_qps=0.0,
        predicted_latency_s=0.0,
        predicted_throughput_qps=0.0,
        predicted_fid=None,
        solver=SolverOutcome(status=SolverStatus.HELD, solve_ms=0.0, message="fixed allocation"),
        reason=reason,
        decided_at=0.0,
    )


def best_batch(stage: StageModel, *, slo_s: float, max_batch: int) -> int:
    """The profiled batch with the highest throughput whose latency fits the SLO."""
    sizes = [b for b in sorted(stage.batch_latency_ms) if b <= max_batch]
    if not sizes:
        return 1
    fitting = [b for b in sizes if stage.latency(b) <= slo_s] or sizes[:1]
    return max(fitting, key=lambda b: (b / stage.latency(b), -b))


def _replica_cap(spec: CascadeSpec, index: int) -> int:
    variant = spec.variants[index]
    count = spec.gpu_budget // max(1, variant.gpus_per_replica)
    return min(count, variant.max_replicas) if variant.max_replicas is not None else count


def cascade_key(spec: CascadeSpec) -> str | None:
    """c1/c2/c3 when the scenario is one of the paper's cascades."""
    gate = spec.variants[0].gate
    curve = gate.defer_curve if gate is not None else None
    if curve is not None and curve.reference in _CASCADE_BY_CURVE:
        return _CASCADE_BY_CURVE[curve.reference]
    if spec.quality is not None and spec.quality.reference in STATIC_16:
        return spec.quality.reference
    return None


def static_allocation(spec: CascadeSpec) -> tuple[float, int, int, int, int]:
    """The paper's fixed allocation scaled to the budget: light GPUs in the same proportion
    (rounded, at least one), the rest heavy; same threshold and batch sizes."""
    key = cascade_key(spec)
    if key is None:
        raise PolicyError(
            "the static policy knows the paper's fixed allocations only for its three cascades "
            "(gate curves sd-turbo, sdxs, sdxl-lightning)"
        )
    threshold, light16, heavy16, b_light, b_heavy = STATIC_16[key]
    gpus = spec.gpu_budget
    if gpus < 2:
        raise PolicyError("the static policy needs gpuBudget >= 2 (one light, one heavy)")
    light = min(gpus - 1, max(1, round(light16 * gpus / (light16 + heavy16))))
    return threshold, light, gpus - light, b_light, b_heavy


def make_policy(
    name: str,
    *,
    spec: CascadeSpec,
    profiles: CascadeProfiles,
    stages: tuple[StageModel, ...],
    decider: Decider | None = None,
    arrivals_s: Sequence[float] = (),
) -> Any:
    """Build a policy by name; `decider` defaults to `diffcascade_operator.control.decide`.

    `arrivals_s` (the trace) is what the oracle is told.
    """
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    hadis_scenario = profiles.table is not None
    if hadis_scenario and name in HADIS_POLICIES:
        try:
            return make_hadis_policy(name, spec=spec, profiles=profiles)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
    if name in HADIS_ONLY:
        raise PolicyError(f"policy {name} runs on a scenario with a quality table (hadis-sd35)")
    if decider is None:
        from diffcascade_operator.control import decide

        decider = decide
    if name == "oracle":
        return OraclePolicy(
            name=name,
            spec=spec,
            decider=decider,
            degrade=True,
            quality=profiles.quality,
            arrivals_s=arrivals_s,
            interval_s=spec.control.interval_seconds,
        )
    if len(spec.variants) != 2 and name not in ("diffcascade", "diffcascade-static"):
        raise PolicyError(f"policy {name} needs a two-stage cascade (light -> heavy)")
    quality = profiles.quality
    light, heavy = spec.variants[0].name, spec.variants[-1].name
    slo = spec.slo_seconds
    if name == "clipper-light":
        batch = best_batch(stages[0], slo_s=slo, max_batch=spec.variants[0].max_batch_size)
        plan = _fixed_plan(
            spec,
            replicas={light: _replica_cap(spec, 0)},
            batches={light: batch, heavy: 1},
            threshold=0.0,
            defer_fraction=0.0,
            reason="clipper-light: every GPU on the light model",
        )
        return FixedPolicy(name=name, plan=plan, quality=quality)
    if name == "clipper-heavy":
        batch = best_batch(stages[-1], slo_s=slo, max_batch=spec.variants[-1].max_batch_size)
        plan = _fixed_plan(
            spec,
            replicas={heavy: _replica_cap(spec, len(stages) - 1)},
            batches={light: 1, heavy: batch},
            threshold=1.0,
            defer_fraction=1.0,
            reason="clipper-heavy: every GPU on the heavy model",
        )
        return FixedPolicy(name=name, plan=plan, routing=Routing.LAST_ONLY, quality=quality)
    if name == "static":
        threshold, x_light, x_heavy, b_light, b_heavy = static_allocation(spec)
        plan = _fixed_plan(
            spec,
            replicas={light: x_light, heavy: x_heavy},
            batches={light: b_light, heavy: b_heavy},
            threshold=threshold,
            defer_fraction=0.0,
            reason="static: the paper's fixed allocation",
        )
        return FixedPolicy(name=name, plan=plan, quality=quality)
    if name in ("diffcascade", "diffcascade-static"):
        return DecidePolicy(
            name=name,
            spec=spec,
            decider=decider,
            degrade=True,
            quality=quality,
            live_profiles=name == "diffcascade",
        )
    if name == "diffserve":
        return DiffServeArtifactPolicy(spec=spec, profiles=profiles)
    if name == "max-threshold":
        paper_spec = override(
            spec,
            objective=Objective.MAX_THRESHOLD.value,
            control={
                **spec.control.model_dump(by_alias=True, exclude_none=True, mode="json"),
                "headroom": 1.05,
                "trendHorizonSeconds": 0.0,
                "scaleDownStabilizationSeconds": 0.0,
            },
        )
        return DecidePolicy(
            name=name, spec=paper_spec, decider=decider, degrade=False, quality=quality
        )
    # proteus: the controller plans a query-agnostic split; quality of a random mix
    mix = random_mix_quality(quality) if quality is not None else None
    agnostic = CascadeProfiles(
        variants=tuple(
            dataclasses.replace(
                v, defer_curve=DeferCurve(thresholds=THRESHOLD_GRID, fractions=THRESHOLD_GRID)
            )
            if v.defer_curve is not None
            else v
            for v in profiles.variants
        ),
        quality=mix,
    )
    return DecidePolicy(
        name=name,
        spec=spec,
        decider=decider,
        degrade=False,
        profiles=agnostic,
        routing=Routing.RANDOM,
        quality=mix,
    )
