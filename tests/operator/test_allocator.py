"""The allocation MILP against the paper's reference optima and a brute-force enumeration."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import replace

import pytest
from diffcascade_operator.allocator import (
    CAPACITY_TOLERANCE_QPS,
    Allocation,
    AllocationProblem,
    CascadeProblem,
    ReplicaBounds,
    solve,
    solve_cascade,
)
from diffcascade_operator.plan import SolverStatus
from diffcascade_operator.profiles import (
    THRESHOLD_GRID,
    QualityCurve,
    VariantProfile,
    defer_curve_from_scores,
    defer_fraction,
    fid_at,
    reference_defer_curve,
    reference_latency,
    reference_quality,
)
from diffcascade_operator.spec import Objective

TURBO = VariantProfile("sd-turbo", reference_latency("sd-turbo"), reference_defer_curve("sd-turbo"))
SDXS = VariantProfile("sdxs", reference_latency("sdxs"), reference_defer_curve("sdxs"))
SD15 = VariantProfile("sd-v1.5", reference_latency("sd-v1.5"), None)


def c1_problem(demand: float, **overrides: object) -> AllocationProblem:
    base = AllocationProblem(
        light=TURBO,
        heavy=SD15,
        demand_qps=demand,
        slo_s=5.0,
        gpu_budget=16,
        objective=Objective.MAX_THRESHOLD,
        quality=reference_quality("c1"),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


# --- the paper's reference optimum (paper digest §9) ----------------------------------------


@pytest.mark.parametrize(
    ("demand", "threshold", "fraction", "replicas", "batches"),
    [
        (24, 0.230, 0.630, (2, 14), (2, 4)),
        (32, 0.115, 0.469, (2, 14), (4, 4)),
        (64, 0.010, 0.200, (4, 12), (4, 4)),
    ],
)
def test_max_threshold_reproduces_the_papers_reference_optimum(
    demand: float,
    threshold: float,
    fraction: float,
    replicas: tuple[int, int],
    batches: tuple[int, int],
) -> None:
    result = solve(c1_problem(demand))
    assert result.status is SolverStatus.OPTIMAL
    assert result.heavy is not None
    assert result.threshold == pytest.approx(threshold)
    assert result.defer_fraction == pytest.approx(fraction, abs=5e-4)
    assert (result.light.replicas, result.heavy.replicas) == replicas
    assert (result.light.batch_size, result.heavy.batch_size) == batches


@pytest.mark.parametrize(
    ("cascade", "demand", "threshold"),
    [
        ("c2", 20, 0.375),
        ("c2", 24, 0.275),
        ("c2", 32, 0.205),
        ("c2", 40, 0.145),
        ("c2", 64, 0.065),
        ("c3", 4, 0.265),
        ("c3", 8, 0.075),
        ("c3", 16, 0.015),
        ("c3", 24, 0.005),
        ("c3", 32, 0.0),
        ("c3", 40, None),  # beyond what 16 GPUs of sdxl-lightning serve
    ],
)
def test_max_threshold_matches_the_reference_thresholds_of_the_other_cascades(
    cascade: str, demand: float, threshold: float | None
) -> None:
    light_name, heavy_name, slo = {
        "c2": ("sdxs", "sd-v1.5", 5.0),
        "c3": ("sdxl-lightning", "sdxl", 15.0),
    }[cascade]
    light = VariantProfile(
        light_name, reference_latency(light_name), reference_defer_curve(light_name)
    )
    heavy = VariantProfile(heavy_name, reference_latency(heavy_name), None)
    result = solve(
        c1_problem(demand, light=light, heavy=heavy, slo_s=slo, quality=reference_quality(cascade))
    )
    if threshold is None:
        assert result.status is SolverStatus.INFEASIBLE
    else:
        assert result.status is SolverStatus.OPTIMAL
        assert result.threshold == pytest.approx(threshold)


def test_cbc_backend_finds_the_same_optimum_as_highs() -> None:
    highs = solve(c1_problem(32, solver="HiGHS"))
    cbc = solve(c1_problem(32, solver="PULP_CBC_CMD"))
    assert cbc.solver == "PULP_CBC_CMD"
    assert (cbc.threshold, cbc.light, cbc.heavy) == (highs.threshold, highs.light, highs.heavy)


def test_min_expected_fid_defers_less_than_max_threshold_at_low_load() -> None:
    paper = solve(c1_problem(8))
    ours = solve(c1_problem(8, objective=Objective.MIN_EXPECTED_FID))
    assert paper.threshold == 1.0  # everything to the heavy model
    assert ours.predicted_fid is not None and paper.predicted_fid is not None
    assert ours.predicted_fid < paper.predicted_fid - 1.0
    assert ours.gpus < paper.gpus or ours.heavy is not None
    assert ours.predicted_fid == pytest.approx(16.79, abs=0.02)  # the curve's minimum


# --- brute force -------------------------------------------------------------------------------


def brute_force(problem: AllocationProblem) -> tuple[float, int, int, float] | None:
    """Lexicographic optimum (primary, GPUs, replica changes, latency) by full enumeration.

    With GPUs per replica >= 1, fewer GPUs means the fewest replicas that meet each stage's
    demand, so replica counts follow from (light batch, heavy batch, threshold).
    """
    light, heavy = problem.light, problem.heavy
    assert heavy is not None and light.defer_curve is not None
    lat_l = {b: ms / 1000 for b, ms in light.batch_latency_ms.items()}
    lat_h = {b: ms / 1000 for b, ms in heavy.batch_latency_ms.items()}
    demand, slo = problem.demand_qps, problem.slo_s + 1e-9
    q_l, q_h = problem.queue_light_s, problem.queue_heavy_s
    backlog = problem.backlog_heavy
    fits_l = [s for s in lat_l.values() if s + q_l <= slo]
    lb, hb = problem.light_bounds, problem.heavy_bounds
    g_l, g_h = light.gpus_per_replica, heavy.gpus_per_replica
    prev_l = problem.previous.get(light.name, 0)
    prev_h = problem.previous.get(heavy.name, 0)
    use_fid = problem.objective is Objective.MIN_EXPECTED_FID and problem.quality is not None
    best: tuple[float, int, int, float] | None = None
    for t in THRESHOLD_GRID:
        f = defer_fraction(light.defer_curve, t)
        if use_fid:
            assert problem.quality is not None
            primary = round(fid_at(problem.quality, 1 - f), 9)
        else:
            primary = -t
        for b_l, s_l in lat_l.items():
            x_l = max(1, lb.minimum, math.ceil((demand - CAPACITY_TOLERANCE_QPS) * s_l / b_l))
            if lb.maximum is not None and x_l > lb.maximum:
                continue
            options: list[int | None] = [None] if f == 0 else []
            options += list(lat_h)
            for b_h in options:
                latency = s_l + q_l
                if f > 0:
                    assert b_h is not None
                    latency += lat_h[b_h] + q_h
                if latency > slo:
                    continue
                if b_h is not None and backlog > 0:
                    # a deferral waits backlog / capacity; the batch must leave time for that
                    horizon = slo - q_l - q_h - min(fits_l) - lat_h[b_h]
                    if horizon <= 1e-9:
                        continue
                if b_h is None:
                    x_h = hb.minimum
                else:
                    need = (demand * f - CAPACITY_TOLERANCE_QPS) * lat_h[b_h] / b_h
                    if f > 0 and backlog > 0:
                        drain = (backlog / horizon - CAPACITY_TOLERANCE_QPS) * lat_h[b_h] / b_h
                        need = max(need, drain)
                    x_h = max(hb.minimum, 1 if f > 0 else 0, math.ceil(need - 1e-12))
                if hb.maximum is not None and x_h > hb.maximum:
                    continue
                gpus = g_l * x_l + g_h * x_h
                if gpus > problem.gpu_budget:
                    continue
                changes = abs(x_l - prev_l) + abs(x_h - prev_h)
                tie_latency = s_l + (lat_h[b_h] if f > 0 and b_h is not None else 0.0)
                key = (primary, gpus, changes, round(tie_latency, 9))
                if best is None or key < best:
                    best = key
    return best


def result_key(problem: AllocationProblem, result: Allocation) -> tuple[float, int, int, float]:
    assert result.heavy is not None
    if problem.objective is Objective.MIN_EXPECTED_FID and problem.quality is not None:
        assert result.predicted_fid is not None
        primary = round(result.predicted_fid, 9)
    else:
        primary = -result.threshold
    changes = abs(result.light.replicas - problem.previous.get(problem.light.name, 0)) + abs(
        result.heavy.replicas - problem.previous.get(problem.heavy.name if problem.heavy else "", 0)
    )
    tie_latency = problem.light.batch_latency_ms[result.light.batch_size] / 1000
    if result.defer_fraction > 0:
        assert problem.heavy is not None
        tie_latency += problem.heavy.batch_latency_ms[result.heavy.batch_size] / 1000
    return (primary, result.gpus, changes, round(tie_latency, 9))


def assert_feasible(problem: AllocationProblem, result: Allocation) -> None:
    assert problem.heavy is not None and result.heavy is not None
    lat_l = problem.light.batch_latency_ms[result.light.batch_size] / 1000
    lat_h = problem.heavy.batch_latency_ms[result.heavy.batch_size] / 1000
    cap_l = result.light.replicas * result.light.batch_size / lat_l
    cap_h = result.heavy.replicas * result.heavy.batch_size / lat_h
    assert cap_l >= problem.demand_qps - 1e-6
    assert cap_h >= problem.demand_qps * result.defer_fraction - 1e-6
    assert result.gpus <= problem.gpu_budget
    assert result.predicted_latency_s <= problem.slo_s + 1e-9
    assert result.light.replicas >= max(1, problem.light_bounds.minimum)
    assert result.heavy.replicas >= problem.heavy_bounds.minimum


def _latency_table(rng: random.Random, base_ms: float) -> dict[int, float]:
    sizes = sorted(rng.sample([1, 2, 4, 8, 16, 32], rng.randint(2, 6)))
    slope = rng.uniform(0.1, 1.0)
    return {b: round(base_ms * (1 + slope * (b - 1)), 1) for b in sizes}


def random_problem(seed: int, objective: Objective) -> AllocationProblem:
    rng = random.Random(seed)
    confidences = [rng.betavariate(rng.uniform(0.3, 2), rng.uniform(0.5, 4)) for _ in range(300)]
    shares = tuple(i / 10 for i in range(11))
    best_share = rng.uniform(0.1, 0.8)
    quality = QualityCurve(
        light_shares=shares,
        fids=tuple(
            round(15 + rng.uniform(5, 20) * (s - best_share) ** 2 + rng.uniform(0, 0.3), 2)
            for s in shares
        ),
    )
    light = VariantProfile(
        "light",
        _latency_table(rng, rng.uniform(20, 600)),
        defer_curve_from_scores(confidences),
        gpus_per_replica=rng.choice([1, 1, 1, 2]),
    )
    heavy = VariantProfile(
        "heavy",
        _latency_table(rng, rng.uniform(500, 6000)),
        None,
        gpus_per_replica=rng.choice([1, 1, 1, 2]),
    )
    min_h = rng.choice([0, 0, 0, 1, 2])
    return AllocationProblem(
        light=light,
        heavy=heavy,
        demand_qps=rng.choice([0.0, rng.uniform(0.5, 8), rng.uniform(5, 60)]),
        slo_s=rng.uniform(1.5, 15),
        gpu_budget=rng.randint(2, 24),
        objective=objective,
        quality=quality,
        queue_light_s=rng.choice([0.0, rng.uniform(0, 0.5)]),
        queue_heavy_s=rng.choice([0.0, rng.uniform(0, 1.5)]),
        backlog_heavy=rng.choice([0.0, 0.0, rng.uniform(0, 40)]),
        light_bounds=ReplicaBounds(rng.choice([0, 0, 1, 2]), rng.choice([None, None, 6])),
        heavy_bounds=ReplicaBounds(min_h, rng.choice([None, None, min_h + 8])),
        previous={"light": rng.randint(0, 6), "heavy": rng.randint(0, 12)},
    )


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("seed", range(30))
def test_solver_matches_brute_force_on_random_instances(seed: int, objective: Objective) -> None:
    problem = random_problem(seed, objective)
    expected = brute_force(problem)
    result = solve(problem)
    if expected is None:
        assert result.status is SolverStatus.INFEASIBLE
        return
    assert result.status is SolverStatus.OPTIMAL, result.message
    assert_feasible(problem, result)
    assert result_key(problem, result) == expected


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("demand", [0, 4, 16, 20, 24, 32, 40, 64, 200])
def test_solver_matches_brute_force_on_the_reference_cascades(
    demand: float, objective: Objective
) -> None:
    for light, quality in ((TURBO, "c1"), (SDXS, "c2")):
        problem = c1_problem(
            demand, light=light, objective=objective, quality=reference_quality(quality)
        )
        expected = brute_force(problem)
        result = solve(problem)
        assert expected is not None
        assert result_key(problem, result) == expected


@pytest.mark.parametrize("seed", range(6))
def test_presolve_changes_nothing_but_speed(seed: int) -> None:
    for objective in Objective:
        problem = random_problem(100 + seed, objective)
        with_presolve = solve(problem)
        without = solve(replace(problem, presolve=False))
        assert with_presolve.status == without.status
        if with_presolve.status is SolverStatus.OPTIMAL:
            assert result_key(problem, with_presolve) == result_key(problem, without)


# --- edge cases --------------------------------------------------------------------------------


def test_overload_gives_best_effort_all_light_plan_naming_capacity() -> None:
    result = solve(c1_problem(1000))
    assert result.status is SolverStatus.INFEASIBLE
    assert result.threshold == 0.0 and result.defer_fraction == 0.0
    assert result.light.replicas == 16 and result.heavy is not None and result.heavy.replicas == 0
    assert result.light.batch_size == 16  # sd-turbo's highest throughput
    assert result.message.startswith("capacity")


def test_queueing_beyond_the_slo_gives_best_effort_naming_latency() -> None:
    result = solve(c1_problem(10, queue_light_s=5.0))
    assert result.status is SolverStatus.INFEASIBLE
    assert result.message.startswith("latency")


def test_queueing_at_the_heavy_stage_lowers_the_threshold() -> None:
    calm = solve(c1_problem(24))
    queued = solve(c1_problem(24, queue_heavy_s=1.2))
    assert queued.status is SolverStatus.OPTIMAL
    assert queued.predicted_latency_s <= 5.0
    assert queued.threshold < calm.threshold


def test_zero_demand_uses_one_replica_per_stage_at_the_fid_optimum() -> None:
    result = solve(c1_problem(0, objective=Objective.MIN_EXPECTED_FID))
    assert result.status is SolverStatus.OPTIMAL
    assert result.heavy is not None
    assert (result.light.replicas, result.heavy.replicas) == (1, 1)
    assert result.predicted_fid == pytest.approx(16.79, abs=0.02)


def test_replica_bounds_and_gpus_per_replica_are_respected() -> None:
    heavy = replace(SD15, gpus_per_replica=2)
    problem = c1_problem(
        24,
        heavy=heavy,
        light_bounds=ReplicaBounds(3, None),
        heavy_bounds=ReplicaBounds(0, 5),
        objective=Objective.MIN_EXPECTED_FID,
    )
    result = solve(problem)
    assert result.heavy is not None
    assert result.light.replicas >= 3 and result.heavy.replicas <= 5
    assert result.gpus == result.light.replicas + 2 * result.heavy.replicas <= 16
    assert_feasible(problem, result)


def test_without_a_quality_curve_min_fid_falls_back_to_max_threshold() -> None:
    result = solve(c1_problem(32, quality=None, objective=Objective.MIN_EXPECTED_FID))
    assert result.objective is Objective.MAX_THRESHOLD
    assert result.threshold == pytest.approx(0.115)
    assert result.predicted_fid is None


def test_fewer_changes_then_lower_latency_break_ties_between_equal_gpu_counts() -> None:
    # Deferring 1/8 of 20 qps: light b4 x1 + heavy b1 x3 (1.2 s) or light b1 x2 + heavy b4 x2
    # (2.1 s) both take 4 GPUs; light b4 + heavy b4 (2.2 s) breaks the 2.15 s SLO.
    from diffcascade_operator.profiles import DeferCurve

    light = VariantProfile("l", {1: 100.0, 4: 200.0}, DeferCurve((0.0, 1.0), (0.125, 0.125)))
    heavy = VariantProfile("h", {1: 1000.0, 4: 2000.0}, None)
    problem = AllocationProblem(
        light=light,
        heavy=heavy,
        demand_qps=20,
        slo_s=2.15,
        gpu_budget=10,
        objective=Objective.MAX_THRESHOLD,
    )
    fresh = solve(problem)
    assert fresh.heavy is not None
    assert (fresh.light.replicas, fresh.heavy.replicas, fresh.heavy.batch_size) == (1, 3, 1)
    keep = solve(replace(problem, previous={"l": 2, "h": 2}))
    assert keep.heavy is not None
    assert (keep.light.replicas, keep.heavy.replicas, keep.heavy.batch_size) == (2, 2, 4)


def three_variants(
    pair_quality: dict[tuple[str, str], QualityCurve] | None = None,
) -> CascadeProblem:
    return CascadeProblem(
        variants=(
            replace(TURBO, name="sd-turbo"),
            replace(SDXS, name="sdxs"),
            replace(SD15, name="sd-v1-5"),
        ),
        demand_qps=20,
        slo_s=5.0,
        gpu_budget=16,
        objective=Objective.MIN_EXPECTED_FID,
        pair_quality=pair_quality or {},
    )


def test_a_cascade_of_three_variants_tries_only_what_its_entry_can_route() -> None:
    good = reference_quality("c1")
    poor = QualityCurve(good.light_shares, tuple(f + 10 for f in good.fids))
    best = QualityCurve(good.light_shares, tuple(f - 5 for f in good.fids))
    # sdxs -> sd-v1-5 would be best, but queries enter at sd-turbo: it is never a candidate
    result = solve_cascade(
        three_variants(
            {("sd-turbo", "sdxs"): poor, ("sd-turbo", "sd-v1-5"): good, ("sdxs", "sd-v1-5"): best}
        )
    )
    tried = [(c.light.name, c.heavy.name if c.heavy else None) for c in result.candidates]
    assert tried == [("sd-turbo", None), ("sd-turbo", "sdxs"), ("sd-turbo", "sd-v1-5")]
    assert result.best.light.name == "sd-turbo"
    assert result.best.heavy is not None and result.best.heavy.name == "sd-v1-5"
    assert result.best.predicted_fid == min(
        c.predicted_fid for c in result.candidates if c.predicted_fid is not None
    )


def test_a_cascade_of_three_variants_may_defer_to_the_adjacent_variant() -> None:
    good = reference_quality("c1")
    poor = QualityCurve(good.light_shares, tuple(f + 10 for f in good.fids))
    result = solve_cascade(
        three_variants({("sd-turbo", "sdxs"): good, ("sd-turbo", "sd-v1-5"): poor})
    )
    assert result.best.heavy is not None and result.best.heavy.name == "sdxs"
    assert result.best.defer_fraction > 0


def test_a_cascade_of_three_variants_that_cannot_defer_serves_its_first_variant_alone() -> None:
    # 0.12 s: sd-turbo's fastest batch fits, no batch of it followed by any later variant does
    result = solve_cascade(replace(three_variants(), slo_s=0.12, demand_qps=5))
    assert result.best.status is SolverStatus.OPTIMAL
    assert result.best.light.name == "sd-turbo" and result.best.heavy is None
    assert result.best.replicas() == {"sd-turbo": 1}


def test_solving_emits_no_deprecation_warning() -> None:
    # PuLP 3 warns on LpVariable(...) built outside a model; the allocator uses add_variable
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for solver in ("auto", "PULP_CBC_CMD"):
            result = solve(c1_problem(24, solver=solver, backlog_heavy=20.0))
            assert result.status is SolverStatus.OPTIMAL
