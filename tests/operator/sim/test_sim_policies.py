"""Baseline policies and metrics, checked against the paper's constants and hand arithmetic."""

from __future__ import annotations

import math

import pytest
from diffcascade_operator.profiles import QualityCurve, profiles_from_spec
from diffcascade_operator.sim.engine import SimResult
from diffcascade_operator.sim.metrics import mean_fid, window_light_shares
from diffcascade_operator.sim.model import (
    Routing,
    StageModel,
    confidences_from_curve,
    random_mix_quality,
)
from diffcascade_operator.sim.policies import (
    PolicyError,
    best_batch,
    make_policy,
    static_allocation,
)
from diffcascade_operator.sim.run import stage_models
from diffcascade_operator.sim.scenarios import load_scenario
from diffcascade_operator.snapshot import DemandSample, Snapshot
from sim_helpers import two_stage_spec


@pytest.mark.parametrize(
    ("scenario", "gpus", "expected"),
    [
        ("sdturbo-sdv15", 16, (0.02, 4, 12, 16, 4)),  # the artifact's static_alloc, verbatim
        ("sdturbo-sdv15", 8, (0.02, 2, 6, 16, 4)),
        ("sdturbo-sdv15", 4, (0.02, 1, 3, 16, 4)),
        ("sdxs-sdv15", 16, (0.12, 2, 14, 32, 4)),
        ("sdxs-sdv15", 4, (0.12, 1, 3, 32, 4)),
        ("sdxl-lightning-sdxl", 16, (0.02, 9, 7, 4, 2)),
        ("sdxl-lightning-sdxl", 4, (0.02, 2, 2, 4, 2)),
    ],
)
def test_static_allocation_is_the_papers_scaled_to_the_budget(
    scenario: str, gpus: int, expected: tuple[float, int, int, int, int]
) -> None:
    assert static_allocation(load_scenario(scenario, gpus=gpus).spec) == expected


def test_static_allocation_needs_two_gpus() -> None:
    with pytest.raises(PolicyError, match="gpuBudget >= 2"):
        static_allocation(load_scenario("sdturbo-sdv15", gpus=1).spec)


def test_best_batch_is_the_highest_throughput_within_the_slo() -> None:
    sd15 = StageModel("sd-v1-5", {1: 1780, 2: 2160, 4: 3680, 8: 6790, 16: 12880, 32: 25350})
    assert best_batch(sd15, slo_s=5.0, max_batch=32) == 4  # 8 would take 6.8 s
    assert best_batch(sd15, slo_s=30.0, max_batch=32) == 32
    assert best_batch(sd15, slo_s=30.0, max_batch=8) == 8
    turbo = StageModel("sd-turbo", {1: 100, 2: 150, 4: 220, 8: 410, 16: 770, 32: 1560})
    assert best_batch(turbo, slo_s=5.0, max_batch=32) == 16


def test_random_mix_quality_is_the_line_between_all_heavy_and_all_light() -> None:
    c1 = QualityCurve(light_shares=(0.0, 0.4, 1.0), fids=(18.55, 16.79, 22.77))
    mix = random_mix_quality(c1)
    assert mix == QualityCurve(light_shares=(0.0, 1.0), fids=(18.55, 22.77))


def test_proteus_routes_by_coin_flip_with_the_planned_defer_fraction() -> None:
    scenario = load_scenario("sdturbo-sdv15", gpus=8)
    profiles = profiles_from_spec(scenario.spec)
    stages = stage_models(scenario.spec, profiles)
    policy = make_policy("proteus", spec=scenario.spec, profiles=profiles, stages=stages)
    snap = Snapshot(
        spec=scenario.spec,
        profiles=profiles,
        now=30.0,
        demand=tuple(DemandSample(at=float(t), qps=4.0) for t in range(1, 31)),
    )
    directive = policy.decide(snap, None)
    assert directive.routing is Routing.RANDOM
    assert directive.solved
    # f(p) = p: the plan's threshold is the probability the engine flips coins with
    assert math.isclose(directive.defer_probability, directive.plan.threshold)
    assert 0.0 < directive.defer_probability <= 1.0
    assert policy.quality is not None and policy.quality.light_shares == (0.0, 1.0)


def test_clipper_heavy_sends_every_query_straight_to_the_heavy_model() -> None:
    scenario = load_scenario("sdturbo-sdv15", gpus=4)
    profiles = profiles_from_spec(scenario.spec)
    stages = stage_models(scenario.spec, profiles)
    policy = make_policy("clipper-heavy", spec=scenario.spec, profiles=profiles, stages=stages)
    snap = Snapshot(spec=scenario.spec, profiles=profiles, now=0.0, demand=())
    directive = policy.decide(snap, None)
    assert directive.routing is Routing.LAST_ONLY
    assert directive.plan.replicas() == {"sd-turbo": 0, "sd-v1-5": 4}


def test_unknown_policy_is_rejected() -> None:
    scenario = load_scenario("sdturbo-sdv15")
    profiles = profiles_from_spec(scenario.spec)
    with pytest.raises(PolicyError, match="unknown policy"):
        make_policy("nope", spec=scenario.spec, profiles=profiles, stages=())


def _result(finish: list[float], served_by: list[int]) -> SimResult:
    n = len(finish)
    return SimResult(
        stage_names=("light", "heavy"),
        slo_s=5.0,
        arrival_s=[0.0] * n,
        finish_s=finish,
        served_by=served_by,
        deferred=[False] * n,
        degraded=[False] * n,
        dropped_s=[math.nan] * n,
        decisions=(),
        timeline=(),
        gpu_seconds=0.0,
        end_s=max(f for f in finish if not math.isnan(f)),
    )


def test_mean_fid_averages_the_curve_over_5s_windows_of_completions() -> None:
    # window 0: 1 light of 2 -> share 0.5; window 1: none; window 2: all heavy -> share 0
    result = _result([1.0, 2.0, 11.0, math.nan], [0, 1, 1, -1])
    assert window_light_shares(result) == [0.5, None, 0.0]
    curve = QualityCurve(light_shares=(0.0, 1.0), fids=(10.0, 20.0))
    assert mean_fid(result, curve) == pytest.approx((15.0 + 10.0) / 2)


def test_confidences_drawn_from_a_curve_reproduce_it() -> None:
    spec = two_stage_spec()
    curve = profiles_from_spec(spec).variants[0].defer_curve
    assert curve is not None
    confs = confidences_from_curve(curve)
    assert confs == confidences_from_curve(curve)  # reproducible
    for t in (0.1, 0.5, 0.9):  # f(t) = t for this curve
        assert abs(sum(c < t for c in confs) / len(confs) - t) < 0.03
