"""The simulator replays drift through the operator's live-profile path."""

from __future__ import annotations

import pytest
from diffcascade_operator.sim.run import Run, simulate
from diffcascade_operator.sim.scenarios import load_scenario
from diffcascade_operator.sim.traces import load_trace


def _run(trace: str, policy: str) -> Run:
    return simulate(
        scenario=load_scenario("sdturbo-sdv15", gpus=12),
        trace=load_trace(trace),
        policy_name=policy,
    )


@pytest.mark.parametrize("trace", ["drift_harder_2to16qps", "drift_easier_2to16qps"])
def test_live_profiles_see_the_drift_the_static_profile_misses(trace: str) -> None:
    live = _run(trace, "diffcascade")
    results = [(d.at, d.profiles) for d in live.result.decisions if d.profiles is not None]
    assert results, "the live policy planned with live profiles"
    before = [r for at, r in results if 60 <= at < 150]
    after = [r for at, r in results if at >= 200]
    assert before and after
    assert all(r.drift is not True for r in before)  # no false alarm on the undrifted part
    assert all(r.drift is True for r in after)  # ProfileDrift once the prompts changed
    assert max(r.max_distance or 0.0 for r in after) > 0.3


@pytest.mark.parametrize("trace", ["drift_harder_2to16qps", "drift_easier_2to16qps"])
def test_live_profiles_keep_the_slo_and_beat_static_profiles_on_drift(trace: str) -> None:
    live, static = _run(trace, "diffcascade").summary, _run(trace, "diffcascade-static").summary
    assert live.slo_violation_ratio <= 0.01
    assert live.mean_fid is not None and static.mean_fid is not None
    assert live.mean_fid < static.mean_fid


def test_static_policy_plans_with_the_offline_profiles_only() -> None:
    static = _run("maf_1to8qps", "diffcascade-static")
    assert all(d.profiles is None and d.live is None for d in static.result.decisions)
