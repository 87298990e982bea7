"""One simulation from names: scenario + trace + policy -> result, summary and files."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffcascade_operator.profiles import (
    CascadeProfiles,
    QualityCurve,
    profiles_from_spec,
    reference_confidences,
    router_scores_from_spec,
)
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.sim.diffserve import DiffServeArtifactPolicy
from diffcascade_operator.sim.engine import EngineConfig, SimResult, Simulation
from diffcascade_operator.sim.hadis_scoring import HadisScore, hadis_score
from diffcascade_operator.sim.metrics import Summary, summarize
from diffcascade_operator.sim.model import StageModel, confidences_from_curve
from diffcascade_operator.sim.policies import DecidePolicy, Decider, FixedPolicy, make_policy
from diffcascade_operator.sim.scenarios import Scenario
from diffcascade_operator.sim.traces import Trace, compress_idle
from diffcascade_operator.spec import CascadeSpec


@dataclass(frozen=True)
class Run:
    result: SimResult
    summary: Summary
    profiles: CascadeProfiles
    quality: QualityCurve | None  # the curve FID was read from (random-mix for proteus)
    hadis: HadisScore | None = None  # HADIS's own scoring (scenarios with a quality table)
    idle_skipped_s: float = 0.0  # idle time of the trace not replayed (`idle_horizon_s`)


def stage_models(
    spec: CascadeSpec, profiles: CascadeProfiles, *, startup_s: float | None = None
) -> tuple[StageModel, ...]:
    return tuple(
        StageModel(
            name=v.name,
            batch_latency_ms=dict(v.batch_latency_ms),
            gpus_per_replica=v.gpus_per_replica,
            startup_s=v.startup_seconds if startup_s is None else startup_s,
        )
        for v in profiles.variants
    )


def gate_confidences(
    spec: CascadeSpec, profiles: CascadeProfiles, *, base_dir: Path | None
) -> list[Sequence[float] | None]:
    """Per stage, each prompt's gate confidence (None for the last stage).

    A bundled reference curve comes with the real per-prompt confidences; a calibration file
    with a `confidences` list uses them; otherwise confidences are drawn from the curve.
    """
    out: list[Sequence[float] | None] = []
    for variant, profile in zip(spec.variants, profiles.variants, strict=True):
        curve_spec = variant.gate.defer_curve if variant.gate is not None else None
        if profile.defer_curve is None or curve_spec is None:
            out.append(None)
            continue
        if curve_spec.reference is not None:
            out.append(reference_confidences(curve_spec.reference))
            continue
        if curve_spec.path is not None:
            listed = _file_confidences(Path(curve_spec.path), base_dir)
            if listed:
                out.append(listed)
                continue
        out.append(confidences_from_curve(profile.defer_curve))
    return out


def _file_confidences(path: Path, base_dir: Path | None) -> list[float]:
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        doc = json.loads(path.read_text())
        values = doc.get("confidences") if isinstance(doc, dict) else None
        return [float(c) for c in values] if isinstance(values, list) else []
    except (OSError, ValueError, TypeError):
        return []


def idle_horizon_s(spec: CascadeSpec, config: EngineConfig, stages: Sequence[StageModel]) -> float:
    """Seconds without arrivals after which the simulated cascade is idle and its control loop
    stationary: every query answered or dropped and every started replica ready (two SLOs plus
    the longest start-up), the demand history all zeros (one sample a tick), the scale-down
    window passed, the live-profile window empty; plus two intervals. Idle time beyond it
    changes no outcome, so the replay leaves it out (`traces.compress_idle`)."""
    return (
        max(
            2 * config.slo_s + max((s.startup_s for s in stages), default=0.0),
            config.demand_history * config.interval_s,
            spec.control.scale_down_stabilization_seconds + config.interval_s,
            config.live.window_s,
        )
        + 2 * config.interval_s
        + config.scrape_interval_s
    )


def simulate(
    *,
    scenario: Scenario,
    trace: Trace,
    policy_name: str,
    startup_s: float | None = None,
    dispatch: Dispatch = Dispatch.LEAST_LOADED,
    seed: int = 0,
    decider: Decider | None = None,
    scrape_interval_s: float = 1.0,
    policy: DecidePolicy | FixedPolicy | DiffServeArtifactPolicy | None = None,
) -> Run:
    """Replay `trace` against `scenario` under a policy (ProfileError / PolicyError if unusable).

    `policy` replaces the named one (for ablations); `policy_name` still labels the summary.
    The scenario's worker rules (`Scenario.rules`) apply to every policy: its dispatch
    replaces `dispatch`, its admission factor applies unless the policy has its own
    (Clipper-Heavy's 1.0 in HADIS's benchmark). The oracle runs with no start-up delay.
    """
    started = time.perf_counter()
    spec = scenario.spec
    rules = scenario.rules
    profiles = profiles_from_spec(spec, base_dir=scenario.base_dir)
    if policy_name == "oracle":
        startup_s = 0.0
    stages = stage_models(spec, profiles, startup_s=startup_s)
    if policy is None:
        policy = make_policy(
            policy_name,
            spec=spec,
            profiles=profiles,
            stages=stages,
            decider=decider,
            arrivals_s=trace.arrivals_s,
        )
    if rules.dispatch is not None:
        dispatch = Dispatch(rules.dispatch)
    config = EngineConfig(
        slo_s=spec.slo_seconds,
        interval_s=spec.control.interval_seconds,
        dispatch=dispatch,
        scrape_interval_s=scrape_interval_s,
        max_batch_wait_s=spec.control.max_batch_wait_ms / 1000.0,
        seed=seed,
        admission_factor=getattr(policy, "admission_factor", rules.admission_slo_factor),
    )
    router = router_scores_from_spec(spec.router) if spec.router is not None else None
    replayed = compress_idle(trace, horizon_s=idle_horizon_s(spec, config, stages))
    sim = Simulation(
        spec=spec,
        profiles=profiles,
        stages=stages,
        arrivals_s=replayed.arrivals_s,
        prompts=replayed.prompts,
        confidences=gate_confidences(spec, profiles, base_dir=scenario.base_dir),
        policy=policy,
        config=config,
        router_scores=router,
    )
    result = sim.run()
    summary = summarize(
        result,
        quality=policy.quality,
        scenario=scenario.name,
        policy=policy_name,
        trace=trace.name,
        gpus=spec.gpu_budget,
        startup_s=max((s.startup_s for s in stages), default=0.0),
        dispatch=dispatch.value,
        scrape_interval_s=scrape_interval_s,
        wall_s=time.perf_counter() - started,
        table=profiles.table,
        drop_after_slo=rules.drop_after_slo_factor,
    )
    score = None
    if profiles.table is not None:
        score = hadis_score(result, profiles.table, policy=policy_name)
    return Run(
        result=result,
        summary=summary,
        profiles=profiles,
        quality=policy.quality,
        hadis=score,
        idle_skipped_s=replayed.idle_skipped_s,
    )
