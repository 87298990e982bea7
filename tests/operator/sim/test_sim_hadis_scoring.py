"""HADIS's own scoring (`analysis/parse_logs.py` + `plot_e1_end2end.py`) on hand-made runs,
and the project's scoring of what a hybrid cascade really served."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest
from diffcascade_operator.plan import Plan
from diffcascade_operator.profiles import reference_quality_table
from diffcascade_operator.sim.engine import NOT_SERVED, DecisionRecord, SimResult
from diffcascade_operator.sim.hadis_scoring import dense_curve, hadis_score, smooth
from diffcascade_operator.sim.metrics import table_window_fids
from diffcascade_operator.sim.model import Routing
from sim_helpers import plan

TABLE = reference_quality_table("hadis-hybrid")
NAMES = ("sdxl-lightning", "sd35-large-turbo", "sd35-medium", "sd35-large")
BASE = plan([4, 4, 4, 4], [1, 1, 1, 1], 0.0, NAMES)


def result(
    arrivals: Sequence[float],
    finishes: Sequence[float],
    served: Sequence[int],
    *,
    registrations: Sequence[tuple[float, int]] = (),
    plans: Sequence[tuple[float, Plan]] = ((0.0, BASE),),
    routed: Sequence[bool] | None = None,
    deferred: Sequence[bool] | None = None,
) -> SimResult:
    n = len(arrivals)
    return SimResult(
        stage_names=NAMES,
        slo_s=6.0,
        arrival_s=arrivals,
        finish_s=finishes,
        served_by=served,
        deferred=deferred or [False] * n,
        degraded=[False] * n,
        dropped_s=[math.nan] * n,
        decisions=tuple(
            DecisionRecord(
                at=at,
                plan=p,
                routing=Routing.GATE,
                wall_ms=0.0,
                cpu_ms=0.0,
                solve_ms=0.0,
                solved=True,
            )
            for at, p in plans
        ),
        timeline=(),
        gpu_seconds=0.0,
        end_s=max(f for f in finishes if not math.isnan(f)),
        routed=routed or [False] * n,
        entered_at=[0] * n,
        registrations=registrations,
    )


def test_dense_curves_insert_midpoints_rounded_to_two_decimals() -> None:
    curve = dense_curve([25.23, 23.85, 22.94])
    assert curve == [25.23, 24.54, 23.85, round((23.85 + 22.94) / 2, 2), 22.94]
    assert smooth([1, 2, 3, 4, 5, 6]) == [3.0, 4.0]


def test_mix_fid_reads_the_pair_curve_at_the_heavier_models_rounded_share() -> None:
    arrivals = [0.05 * k for k in range(2000)]
    finishes = [a + 0.5 for a in arrivals]
    # per second: 19 registrations at sd35-large-turbo, 1 at sd35-medium -> heavy share 0.05
    regs = [(a, 1 if k % 20 else 2) for k, a in enumerate(arrivals)]
    run = result(arrivals, finishes, [1] * 2000, registrations=regs)
    score = hadis_score(run, TABLE, policy="hadis-diffserve")
    assert score.method == "mix"
    assert score.avg_fid == pytest.approx(24.54)  # (1,2) at 0.05: between 25.23 and 23.85
    assert score.avg_slo_violation == 0.0


def test_infaas_is_scored_at_its_dominant_variant_and_an_idle_window_at_29_76() -> None:
    arrivals = [0.5 * k for k in range(120)]
    finishes = [a + 0.5 for a in arrivals]
    regs = [(a, 3) for a in arrivals]
    score = hadis_score(
        result(arrivals, finishes, [3] * 120, registrations=regs), TABLE, policy="infaas-acc"
    )
    assert score.avg_fid == pytest.approx(19.95)


def test_violations_are_timeouts_and_drops_over_outcomes_per_5_s_window() -> None:
    arrivals = [float(k) for k in range(100)]
    finishes = [a + (7.0 if k % 5 == 0 else 1.0) for k, a in enumerate(arrivals)]
    served = [2] * 100
    finishes[50], served[50] = math.nan, NOT_SERVED  # dropped: counted at 50 + 12 s
    run = result(arrivals, finishes, served, registrations=[(a, 2) for a in arrivals])
    score = hadis_score(run, TABLE, policy="clipper-heavy")
    # one timeout in every 5 outcomes, the drop adds one more in one window and removes one
    assert score.avg_slo_violation == pytest.approx(0.2, abs=0.01)
    assert score.offset == 0


def test_hadis_is_scored_at_the_row_it_planned_and_a_shed_plan_at_the_worst_row() -> None:
    arrivals = [0.2 * k for k in range(500)]
    finishes = [a + 0.1 for a in arrivals]
    row = TABLE.row(("sd35-medium", "sd35-large"), 0.2, 0.5)
    planned = dataclasses.replace(BASE, row=row)
    # served by SDXL-Lightning the whole time: HADIS's scoring does not look
    run = result(arrivals, finishes, [0] * 500, plans=[(0.0, BASE), (30.0, planned)])
    score = hadis_score(run, TABLE, policy="hadis")
    # rows are ticks 1..100; 29 shed rows (29.75), then 19.29 from tick 30
    per_row = [29.75] * 29 + [19.29] * 71
    windows = [sum(per_row[w * 5 : w * 5 + 5]) / 5 for w in range(20)]
    expected = smooth(windows)
    assert score.shed_rows == 29
    assert score.avg_fid == pytest.approx(sum(expected) / len(expected))


def test_the_projects_scoring_counts_what_the_pair_really_served() -> None:
    arrivals = [0.05 * k for k in range(100)]  # one 5-s window
    finishes = [a + 0.01 for a in arrivals]
    served = [2] * 40 + [3] * 60
    routed = [False] * 40 + [True] * 20 + [False] * 40
    deferred = [False] * 60 + [True] * 40
    run = result(arrivals, finishes, served, routed=routed, deferred=deferred)
    # r = 20/100 = 0.2; c = 40 escalated of 80 not routed = 0.5: the row (2,3) r=.2 c=.5
    assert table_window_fids(run, TABLE) == [19.29]
    lightning = result(arrivals, finishes, [0] * 100)
    assert table_window_fids(lightning, TABLE) == [29.76]
