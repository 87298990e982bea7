"""The learner on small synthetic data: it learns a separable rule, its metrics are
prequential (scored before the update), and the AUC helper is the textbook one."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from diffcascade_worker.routing.learner import HardnessTarget, PrequentialMetrics, auc
from diffcascade_worker.routing.scorers import LearnedScorer, RuleScorer, rule_scores

_HARD = ["crowd", "hands", "text", "reflection", "mirror", "juggling"]
_EASY = ["sky", "field", "lake", "sunset", "meadow", "ocean"]


def _prompt(rng: random.Random, hard: bool) -> str:
    subject = rng.choice(_HARD if hard else _EASY)
    return f"a photo of a {subject} {rng.choice(['at noon', 'in winter', 'by a painter'])}"


def test_auc_matches_pairwise_counting_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)
    events = rng.random(60) < 0.4
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for (a, ea), (b, eb) in itertools.product(zip(scores, events, strict=True), repeat=2)
        if ea and not eb
    ]
    assert auc(scores, events) == pytest.approx(sum(pairs) / len(pairs))
    assert math.isnan(auc([1.0, 2.0], [True, True]))


def test_learner_learns_a_separable_rule_from_gate_confidences() -> None:
    rng = random.Random(1)
    scorer = LearnedScorer(bits=14)
    for _ in range(400):
        hard = rng.random() < 0.5
        confidence = rng.uniform(0.0, 0.2) if hard else rng.uniform(0.6, 1.0)
        scorer.learn(_prompt(rng, hard), confidence)
    test = [(rng.random() < 0.5) for _ in range(200)]
    scores = [scorer.score(_prompt(rng, hard)) for hard in test]
    assert auc(scores, test) > 0.99
    # The prequential record saw the early, untrained predictions too: lower, but well above 0.5.
    assert 0.8 < scorer.metrics.auc() <= 1.0
    assert scorer.metrics.labels == 400


def test_prequential_metrics_score_the_prediction_made_before_the_update() -> None:
    scorer = LearnedScorer(bits=12)
    prompt = "a photo of a crowd"
    for _ in range(20):
        scorer.learn("a photo of a crowd", 0.0)  # trains the prompt towards hardness 1
        scorer.learn("a photo of a sky", 1.0)
    before = scorer.score(prompt)
    scorer.learn(prompt, 0.0, deferred=True)
    recorded_prediction, _target, event = scorer.metrics._recent[-1]
    assert recorded_prediction == pytest.approx(before)
    assert scorer.score(prompt) > before  # the update came after the record
    assert event is True


def test_hardness_target_is_the_share_of_recent_confidences_above() -> None:
    target = HardnessTarget(window=4)
    assert target.quantile(0.5) == 0.5  # nothing seen yet
    for value in (0.1, 0.2, 0.3, 0.4, 0.9):  # 0.1 leaves the window
        target.add(value)
    assert target.quantile(0.25) == pytest.approx(0.75)
    assert target.quantile(0.3) == pytest.approx(0.625)  # a tie counts half


def test_brier_is_nan_before_any_label_and_squared_error_after() -> None:
    metrics = PrequentialMetrics()
    assert math.isnan(metrics.brier())
    metrics.record(0.8, 1.0, True)
    metrics.record(0.5, 0.0, False)
    assert metrics.brier() == pytest.approx((0.04 + 0.25) / 2)


def test_rule_scores_are_hadis_zscore_dot_weights() -> None:
    table = np.array(
        [[8, 2, 2, 2, 2, 2, 1, 0], [4, 0, 1, 2, 1, 0, 0, 0], [11, 0, 3, 3, 2, 2, 1, 1]]
    )
    mean, std = table.mean(axis=0), table.std(axis=0, ddof=1)
    weights = np.array([0.85, 0.32, 0.72, 0.99, 0.76, 0.07, 0.78, 0.01])
    expected = ((table - mean) / std) @ weights
    assert rule_scores(table) == pytest.approx(expected)
    fixed = RuleScorer(mean=mean, std=std)
    assert fixed.score_features(table[0]) == pytest.approx(expected[0])
