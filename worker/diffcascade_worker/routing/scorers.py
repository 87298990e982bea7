"""Router scorers: a higher score means a harder prompt (more likely escalated by the gate).

- `RuleScorer`: HADIS's rule exactly as `isHardByRouter` computes it: eight integer prompt
  features, z-scored over a prompt set (pandas' mean and sample standard deviation), dotted
  with fixed weights. HADIS precomputes the features with spaCy, wordfreq and concreteness
  norms; given them (`score_features`), the score is HADIS's. For a live prompt there is no
  spaCy here: `approximate_features` (in `hadis_features`) stands in and is an approximation.
- `LearnedScorer`: hashed n-grams -> online logistic model of the hardness quantile, trained
  on the gate's confidences as they come back (see `learner`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from diffcascade_worker.routing.features import DEFAULT_BITS, HashedNgrams
from diffcascade_worker.routing.hadis_features import FEATURE_NAMES, approximate_features
from diffcascade_worker.routing.learner import (
    DEFAULT_WINDOW,
    HardnessTarget,
    OnlineLogistic,
    PrequentialMetrics,
)

#: `isHardByRouter`'s weights, in `prompt_features.csv` column order (FEATURE_NAMES).
HADIS_WEIGHTS: tuple[float, ...] = (0.85, 0.32, 0.72, 0.99, 0.76, 0.07, 0.78, 0.01)


class Scorer(Protocol):
    name: str
    metrics: PrequentialMetrics

    def score(self, prompt: str) -> float: ...

    def learn(self, prompt: str, confidence: float, *, deferred: bool | None = None) -> None: ...


def zscore_stats(
    table: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Column means and sample standard deviations (ddof=1, as pandas computes them)."""
    data = np.asarray(table, dtype=np.float64)
    return data.mean(axis=0), data.std(axis=0, ddof=1)


def rule_scores(table: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """HADIS's router scores of a whole prompt set: z-score over the set, dot the weights."""
    mean, std = zscore_stats(table)
    std = np.where(std > 0, std, 1.0)  # a constant column (no variance) contributes 0
    return np.asarray(((np.asarray(table) - mean) / std) @ np.array(HADIS_WEIGHTS))


class RuleScorer:
    """HADIS's fixed-weight rule; z-scored with given statistics, or with running ones over
    the prompts it has scored (HADIS z-scores over the prompt set it serves)."""

    name = "rule"

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self._fixed = mean is not None and std is not None
        self._mean = np.asarray(mean if mean is not None else np.zeros(8), dtype=np.float64)
        self._std = np.asarray(std if std is not None else np.ones(8), dtype=np.float64)
        self._n = 0
        self._m2 = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
        self._running = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
        self.weights = np.array(HADIS_WEIGHTS, dtype=np.float64)
        self.metrics = PrequentialMetrics()
        self._target = HardnessTarget()

    def score_features(self, features: Sequence[float]) -> float:
        x = np.asarray(features, dtype=np.float64)
        std = np.where(self._std > 0, self._std, 1.0)
        return float(((x - self._mean) / std) @ self.weights)

    def score(self, prompt: str) -> float:
        features = approximate_features(prompt)
        if not self._fixed:
            self._observe(np.asarray(features, dtype=np.float64))
        return self.score_features(features)

    def _observe(self, x: npt.NDArray[np.float64]) -> None:
        # Welford: running mean and sample variance of the features of prompts scored.
        self._n += 1
        delta = x - self._running
        self._running += delta / self._n
        self._m2 += delta * (x - self._running)
        self._mean = self._running.copy()
        if self._n > 1:
            self._std = np.sqrt(self._m2 / (self._n - 1))

    def learn(self, prompt: str, confidence: float, *, deferred: bool | None = None) -> None:
        """The rule does not learn; its quality is still tracked on the same labels."""
        prediction = _squash(self.score_features(approximate_features(prompt)))
        target = self._target.quantile(confidence)
        event = deferred if deferred is not None else target >= 0.5
        self.metrics.record(prediction, target, event)
        self._target.add(confidence)


def _squash(score: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score))))


class LearnedScorer:
    """Hashed n-grams and an online logistic model of the hardness quantile."""

    name = "learned"

    def __init__(
        self,
        *,
        bits: int = DEFAULT_BITS,
        learning_rate: float = 0.5,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.features = HashedNgrams(bits)
        self.model = OnlineLogistic(self.features.dim, learning_rate=learning_rate)
        self.metrics = PrequentialMetrics(window)
        self._target = HardnessTarget(window)

    def score(self, prompt: str) -> float:
        return self.model.predict(self.features.transform(prompt))

    def learn(self, prompt: str, confidence: float, *, deferred: bool | None = None) -> None:
        """Test, then train: the prediction is scored against this label before the update."""
        if not math.isfinite(confidence):
            return
        x = self.features.transform(prompt)
        target = self._target.quantile(confidence)
        prediction = self.model.update(x, target)
        event = deferred if deferred is not None else target >= 0.5
        self.metrics.record(prediction, target, event)
        self._target.add(confidence)

    def fit_quantiles(self, prompts: Sequence[str], targets: Sequence[float]) -> None:
        """Offline training on known hardness quantiles (benchmarks: one pass, in order)."""
        for prompt, target in zip(prompts, targets, strict=True):
            self.model.update(self.features.transform(prompt), float(target))


def make_scorer(name: str) -> Scorer | None:
    """The scorer a router config names (`none`: no scorer, nothing is routed)."""
    if name == "learned":
        return LearnedScorer()
    if name == "rule":
        return RuleScorer()
    if name == "none":
        return None
    raise ValueError(f"unknown scorer {name!r} (learned, rule or none)")
