"""Small hand-made cascades and scripted policies for the engine tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.profiles import CascadeProfiles, DeferCurve, VariantProfile
from diffcascade_operator.sim.engine import EngineConfig, SimResult, Simulation
from diffcascade_operator.sim.model import Directive, Routing, StageModel
from diffcascade_operator.snapshot import Snapshot
from diffcascade_operator.spec import CascadeSpec, parse_spec


def two_stage_spec(
    *, slo: float = 5.0, gpus: int = 4, router: dict[str, Any] | None = None
) -> CascadeSpec:
    raw: dict[str, Any] = {
        "sloSeconds": slo,
        "gpuBudget": gpus,
        "simulatorOnly": True,
        "variants": [
            {
                "name": "light",
                "model": "light",
                "profile": {"batchLatencyMs": {"1": 100}},
                "gate": {"deferCurve": {"thresholds": [0, 1], "deferFractions": [0, 1]}},
            },
            {"name": "heavy", "model": "heavy", "profile": {"batchLatencyMs": {"1": 1000}}},
        ],
        "quality": {
            "fidByLightShare": [{"lightShare": 0, "fid": 10}, {"lightShare": 1, "fid": 20}]
        },
    }
    if router is not None:
        raw["router"] = router
    return parse_spec(raw)


def profiles_for(stages: Sequence[StageModel]) -> CascadeProfiles:
    curve = DeferCurve(thresholds=(0.0, 1.0), fractions=(0.0, 1.0))
    return CascadeProfiles(
        variants=tuple(
            VariantProfile(
                name=s.name,
                batch_latency_ms=s.batch_latency_ms,
                defer_curve=curve if k < len(stages) - 1 else None,
            )
            for k, s in enumerate(stages)
        ),
        quality=None,
    )


def plan(
    replicas: Sequence[int], batches: Sequence[int], threshold: float, names: Sequence[str]
) -> Plan:
    return Plan(
        variants=tuple(
            VariantAllocation(
                name=n,
                replicas=r,
                batch_size=b,
                threshold=threshold if k < len(names) - 1 else None,
            )
            for k, (n, r, b) in enumerate(zip(names, replicas, batches, strict=True))
        ),
        threshold=threshold,
        defer_fraction=0.0,
        demand_qps=0.0,
        predicted_latency_s=0.0,
        predicted_throughput_qps=0.0,
        predicted_fid=None,
        solver=SolverOutcome(status=SolverStatus.HELD, solve_ms=0.0),
        reason="scripted",
        decided_at=0.0,
    )


class Scripted:
    """Returns the i-th plan at the i-th call (the last one thereafter)."""

    name = "scripted"

    def __init__(self, plans: Sequence[Plan], *, degrade: bool = False) -> None:
        self.plans = list(plans)
        self.degrade = degrade
        self.calls: list[Snapshot] = []

    def decide(self, snapshot: Snapshot, previous: Plan | None) -> Directive:
        self.calls.append(snapshot)
        index = min(len(self.calls) - 1, len(self.plans) - 1)
        return Directive(plan=self.plans[index], routing=Routing.GATE)


def run(
    *,
    stages: Sequence[StageModel],
    arrivals: Sequence[float],
    policy: Scripted,
    prompts: Sequence[int] | None = None,
    confidences: Sequence[float] | None = None,
    slo: float = 5.0,
    interval: float = 5.0,
    max_batch_wait_s: float = 0.0,
) -> SimResult:
    spec = two_stage_spec(slo=slo)
    confs: list[Sequence[float] | None] = [confidences] + [None] * (len(stages) - 1)
    sim = Simulation(
        spec=spec,
        profiles=profiles_for(stages),
        stages=stages,
        arrivals_s=arrivals,
        prompts=prompts if prompts is not None else [0] * len(arrivals),
        confidences=confs,
        policy=policy,
        config=EngineConfig(slo_s=slo, interval_s=interval, max_batch_wait_s=max_batch_wait_s),
    )
    return sim.run()


def run_policy(policy: Any, *, arrivals: Sequence[float], slo: float = 5.0) -> SimResult:
    """Two stages (100 ms light, 1 s heavy) under any policy, every prompt index 0."""
    stages = (StageModel("light", {1: 100.0}), StageModel("heavy", {1: 1000.0}))
    spec = two_stage_spec(slo=slo)
    sim = Simulation(
        spec=spec,
        profiles=profiles_for(stages),
        stages=stages,
        arrivals_s=arrivals,
        prompts=[0] * len(arrivals),
        confidences=[[0.5], None],
        policy=policy,
        config=EngineConfig(slo_s=slo, interval_s=5.0),
    )
    return sim.run()
