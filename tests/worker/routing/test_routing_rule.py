"""The routing rule: HADIS's percentile cut, r = 0 and r = 1, exploration, the score window."""

from __future__ import annotations

import random

import numpy as np
import pytest
from diffcascade_worker.routing.rule import (
    ScoreWindow,
    Target,
    cut_score,
    effective_heavy_share,
    goes_heavy,
    route,
)


def _hadis_is_hard(scores: np.ndarray, r: float, i: int) -> bool:
    """`isHardByRouter` as the artifact writes it."""
    sorted_dist = np.sort(scores)
    index = max(int(len(sorted_dist) * (1 - r)) - 1, 0)
    return bool(scores[i] >= sorted_dist[index])


@pytest.mark.parametrize("r", [0.1, 0.2, 0.5, 0.8, 0.9])
def test_cut_is_hadis_percentile_index_for_every_prompt(r: float) -> None:
    scores = np.random.default_rng(3).normal(size=500)
    ordered = sorted(scores.tolist())
    mine = [goes_heavy(float(s), share=r, sorted_scores=ordered) for s in scores]
    theirs = [_hadis_is_hard(scores, r, i) for i in range(len(scores))]
    assert mine == theirs
    assert abs(sum(mine) / len(mine) - r) <= 2.5 / len(mine)  # the index rounds down


def test_share_zero_routes_nothing_and_share_one_routes_everything() -> None:
    ordered = [0.1, 0.2, 0.3]
    assert not any(goes_heavy(s, share=0.0, sorted_scores=ordered) for s in (0.1, 0.3, 9.0))
    assert all(goes_heavy(s, share=1.0, sorted_scores=ordered) for s in (-9.0, 0.1))
    # r = 1 needs no cut: the first prompt of a cold router goes heavy too
    assert goes_heavy(0.0, share=1.0, sorted_scores=[])
    # HADIS would route its top prompt at r = 0 (the cut is the maximum itself); we do not.
    assert cut_score(ordered, 0.0) == 0.3


def test_no_calibration_scores_routes_to_the_entry_stage() -> None:
    assert route(5.0, share=0.5, sorted_scores=[]).target is Target.ENTRY


def test_exploration_sends_its_share_of_heavy_prompts_through_the_entry_stage() -> None:
    rng = random.Random(7)
    decisions = [
        route(1.0, share=0.5, sorted_scores=[0.0, 1.0], exploration=0.2, draw=rng.random())
        for _ in range(5000)
    ]
    explored = sum(d.explored for d in decisions) / len(decisions)
    assert explored == pytest.approx(0.2, abs=0.02)
    assert all(d.target is Target.ENTRY for d in decisions if d.explored)
    heavy = sum(d.target is Target.HEAVY for d in decisions) / len(decisions)
    assert heavy == pytest.approx(effective_heavy_share(1.0, 0.2), abs=0.02)


def test_easy_prompts_are_never_explored() -> None:
    ordered = [0.0, 1.0, 2.0, 3.0]  # r = 0.5 cuts at 1.0
    decision = route(0.5, share=0.5, sorted_scores=ordered, exploration=1.0, draw=0.0)
    assert decision.target is Target.ENTRY and not decision.explored


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_share_outside_unit_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="router share"):
        route(0.0, share=bad, sorted_scores=[0.0])


def test_score_window_keeps_the_last_scores_sorted() -> None:
    window = ScoreWindow(3, seed=[5.0, 1.0])
    for value in (3.0, 4.0):
        window.add(value)
    assert list(window.sorted_scores) == [1.0, 3.0, 4.0]
    assert len(window) == 3


def test_ties_at_the_cut_are_routed_in_proportion_so_the_share_holds() -> None:
    flat = [0.5] * 1000  # a learner before its first label scores every prompt alike
    rng = random.Random(3)
    heavy = sum(
        goes_heavy(0.5, share=0.3, sorted_scores=flat, tie_draw=rng.random()) for _ in range(4000)
    )
    assert heavy / 4000 == pytest.approx(0.301, abs=0.025)
    # HADIS's `>=` would have sent every one of them: tie_draw 0 reproduces it.
    assert goes_heavy(0.5, share=0.3, sorted_scores=flat, tie_draw=0.0)
