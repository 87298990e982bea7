"""The allocator on hybrid configurations: table rows with a router share, paths charged
separately, random dispatch, and the fallback when nothing fits (against a brute force)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from diffcascade_operator.allocator import (
    CAPACITY_TOLERANCE_QPS,
    Allocation,
    AllocationProblem,
    CascadeProblem,
    solve,
    solve_cascade,
)
from diffcascade_operator.plan import SolverStatus
from diffcascade_operator.profiles import (
    THRESHOLD_GRID,
    QualityCurve,
    QualityRow,
    VariantProfile,
    defer_curve_from_scores,
    defer_fraction,
    fid_at,
    threshold_for_share,
)
from diffcascade_operator.queueing import Dispatch, path_tails, stage_options

MEDIUM = VariantProfile(
    "medium",
    {1: 1300.0, 2: 2340.0, 4: 4680.0},
    defer_curve_from_scores([k / 1000 for k in range(1000)]),
)
LARGE = VariantProfile("large", {1: 2700.0, 2: 4860.0}, None)


def row(r: float, c: float, fid: float) -> QualityRow:
    return QualityRow("medium", "large", r, c, r + (1 - r) * c, fid)


def pair(demand: float, rows: tuple[QualityRow, ...], **overrides: object) -> AllocationProblem:
    base = AllocationProblem(
        light=MEDIUM,
        heavy=LARGE,
        demand_qps=demand,
        slo_s=6.0,
        gpu_budget=16,
        rows=rows,
        fid_alone=20.61,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_a_routed_share_skips_the_light_stage_and_its_latency() -> None:
    # r = 0.5, c = 0: half the demand on the light stage, the other half straight to heavy;
    # the heavy stage may run batch 2 (4.86 s), which no escalated query could afford
    # (at 3 qps, 1.5 qps of heavy work: four replicas at batch 2, five at batch 1)
    result = solve(pair(3.0, (row(0.5, 0.0, 19.30),)))
    assert result.status is SolverStatus.OPTIMAL and result.router_share == 0.5
    assert result.row == row(0.5, 0.0, 19.30) and result.threshold == 0.0
    assert result.heavy is not None and (result.heavy.batch_size, result.heavy.replicas) == (2, 4)
    assert result.predicted_latency_s == pytest.approx(4.86)


def test_an_escalating_row_charges_both_stages_on_one_path() -> None:
    result = solve(pair(3.0, (row(0.5, 0.1, 19.29),)))
    assert result.status is SolverStatus.OPTIMAL and result.row is not None
    assert result.heavy is not None and result.heavy.batch_size == 1  # 1.3 + 4.86 > 6 s
    assert result.threshold == pytest.approx(threshold_for_share(MEDIUM.defer_curve, 0.1))
    assert result.predicted_latency_s <= 6.0


def test_the_light_stage_is_charged_only_what_the_router_leaves_it() -> None:
    # HADIS charges the light stage the full demand; here 80 % skip it
    routed = solve(pair(4.0, (row(0.8, 0.0, 19.5),), fid_alone=30.0, gpu_budget=40))
    assert routed.status is SolverStatus.OPTIMAL and routed.router_share == 0.8
    per_replica = routed.light.batch_size / (MEDIUM.batch_latency_ms[routed.light.batch_size] / 1e3)
    assert routed.light.replicas * per_replica >= 0.8 - CAPACITY_TOLERANCE_QPS
    assert routed.light.replicas == 1  # the full 4 qps would take five


def brute_force(problem: AllocationProblem) -> tuple[float, float, float, float] | None:
    """(FID, GPUs, changes, latency) of the best choice, by enumerating every level (each row,
    every gate threshold of the curve), every pair of stage options and the fewest replicas."""
    light, heavy = problem.light, problem.heavy
    assert heavy is not None and light.defer_curve is not None
    lat_l = {b: ms / 1000 for b, ms in light.batch_latency_ms.items()}
    lat_h = {b: ms / 1000 for b, ms in heavy.batch_latency_ms.items()}
    slo = problem.slo_s + 1e-9
    levels: list[tuple[float, float, float, bool]] = []  # (fid, h, r, escalates)
    assert problem.quality is not None
    for t in THRESHOLD_GRID:
        f = defer_fraction(light.defer_curve, t)
        levels.append((round(fid_at(problem.quality, 1 - f), 9), f, 0.0, f > 0))
    levels += [(r.fid, r.heavy_share, r.router_share, r.escalate_share > 0) for r in problem.rows]
    best: tuple[float, float, float, float] | None = None
    prev_l = problem.previous.get(light.name, 0)
    prev_h = problem.previous.get(heavy.name, 0)
    for fid, h, r, esc in levels:
        escalated = h - r if esc else 0.0
        tails = path_tails(
            light_only=1 - r - escalated,
            routed=r if h > 0 else 0.0,
            escalated=escalated,
            total=problem.tail_probability,
        )
        ops_l = stage_options(
            lat_l,
            problem.dispatch,
            direct_tail=tails.light_only,
            direct_s=slo,
            escalated_tail=tails.escalated_light,
        )
        ops_h = stage_options(
            lat_h,
            problem.dispatch,
            direct_tail=tails.routed,
            direct_s=slo,
            escalated_tail=tails.escalated_heavy,
        )
        for o_l in ops_l:
            if o_l.batch_s > slo:
                continue
            x_l = max(
                1, math.ceil(((1 - r) * problem.demand_qps - 1e-6) / o_l.capacity_qps - 1e-12)
            )
            choices = [None] if h == 0 else list(ops_h)
            for o_h in choices:
                x_h, latency = 0, o_l.latency_s
                if o_h is not None:
                    if o_h.batch_s > slo or (esc and o_l.latency_s + o_h.latency_s > slo):
                        continue
                    x_h = max(
                        1, math.ceil((h * problem.demand_qps - 1e-6) / o_h.capacity_qps - 1e-12)
                    )
                    latency += o_h.latency_s
                if x_l + x_h > problem.gpu_budget:
                    continue
                key = (
                    fid,
                    float(x_l + x_h),
                    float(abs(x_l - prev_l) + abs(x_h - prev_h)),
                    round(latency, 9),
                )
                if best is None or key < best:
                    best = key
    return best


def result_key(problem: AllocationProblem, result: Allocation) -> tuple[float, float, float, float]:
    assert result.predicted_fid is not None and result.heavy is not None
    changes = abs(result.light.replicas - problem.previous.get(problem.light.name, 0)) + abs(
        result.heavy.replicas - problem.previous.get(LARGE.name, 0)
    )
    return (round(result.predicted_fid, 9), float(result.gpus), float(changes), 0.0)


def random_hybrid(seed: int) -> AllocationProblem:
    rng = random.Random(seed)
    shares = tuple(i / 10 for i in range(11))
    quality = QualityCurve(shares, tuple(round(20 + 3 * (s - 0.4) ** 2, 3) for s in shares))
    rows = tuple(
        row(r, c, round(rng.uniform(18.5, 21.5), 2))
        for r, c in {(rng.choice(shares[:9]), rng.choice(shares[:8])) for _ in range(12)}
    )
    return pair(
        rng.choice([0.5, 2.0, 5.0, 9.0]),
        rows,
        quality=quality,
        gpu_budget=rng.randint(4, 16),
        dispatch=rng.choice([Dispatch.LEAST_LOADED, Dispatch.RANDOM]),
        previous={"medium": rng.randint(0, 8), "large": rng.randint(0, 8)},
        fid_alone=None,
    )


@pytest.mark.parametrize("seed", range(12))
def test_hybrid_levels_match_a_brute_force(seed: int) -> None:
    problem = random_hybrid(seed)
    expected = brute_force(problem)
    result = solve(problem)
    if expected is None:
        assert result.status is SolverStatus.INFEASIBLE
        return
    assert result.status is SolverStatus.OPTIMAL
    assert result_key(problem, result)[:3] == expected[:3]
    without = solve(replace(problem, presolve=False))
    assert result_key(problem, without)[:3] == expected[:3]


def test_when_nothing_fits_the_plan_that_sheds_least_wins() -> None:
    # far beyond any capacity: every candidate is a best effort; the lightest variant at its
    # highest throughput serves the most, not the heavy variant alone with the best FID
    problem = CascadeProblem(
        variants=(MEDIUM, LARGE),
        demand_qps=500.0,
        slo_s=6.0,
        gpu_budget=16,
        entries=("medium", "large"),
        single_fid={"medium": 20.61, "large": 19.95},
    )
    best = solve_cascade(problem).best
    assert best.status is SolverStatus.INFEASIBLE
    assert best.light.name == "medium" and best.light.replicas == 16
