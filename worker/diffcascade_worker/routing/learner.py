"""An online linear model of prompt hardness, and the prequential metrics that judge it.

Label: every prompt that passes a gated stage comes back with the gate's confidence. The
model does not learn "below threshold t" (t moves with every plan), but the prompt's hardness
quantile: the share of recent confidences above this one (1 = the least confident image seen).
That target ranks prompts the same way for every threshold, so one model serves every router
share r, and the percentile form matches how a threshold c is read (a percentile of the light
model's scores).

Model: logistic regression on hashed n-grams with soft targets and AdaGrad step sizes (one
pass, per label, O(nonzero features)); prediction = the expected hardness quantile.

Prequential ("test, then train"): each label first scores the prediction made without it,
then trains, so the exported AUC and Brier score are out-of-sample by construction.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from diffcascade_worker.routing.features import SparseVector

DEFAULT_WINDOW = 2000


def auc(scores: Sequence[float] | npt.NDArray[np.float64], events: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for `events` (Mann-Whitney, ties counted half);
    NaN when one class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(events, dtype=bool)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = mean_rank[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


class HardnessTarget:
    """Confidence -> hardness quantile among the last `window` confidences (0.5 before any)."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def quantile(self, confidence: float) -> float:
        n = len(self._sorted)
        if n == 0:
            return 0.5
        below = bisect.bisect_left(self._sorted, confidence)
        above = n - bisect.bisect_right(self._sorted, confidence)
        ties = n - below - above
        return (above + 0.5 * ties) / n

    def add(self, confidence: float) -> None:
        if len(self._order) == self.window:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(confidence)
        bisect.insort(self._sorted, confidence)


class OnlineLogistic:
    """Logistic regression over sparse vectors, soft targets, AdaGrad, small L2."""

    def __init__(
        self, dim: int, *, learning_rate: float = 0.5, l2: float = 1e-6, eps: float = 1e-8
    ) -> None:
        self.dim = dim
        self.learning_rate = learning_rate
        self.l2 = l2
        self.weights = np.zeros(dim, dtype=np.float64)
        self._g2 = np.full(dim, eps, dtype=np.float64)
        self.bias = 0.0
        self._bias_g2 = eps
        self.updates = 0

    def margin(self, x: SparseVector) -> float:
        return float(np.dot(self.weights[x.index], x.value)) + self.bias

    def predict(self, x: SparseVector) -> float:
        return _sigmoid(self.margin(x))

    def update(self, x: SparseVector, target: float, weight: float = 1.0) -> float:
        """One AdaGrad step on the cross-entropy with a soft target; returns the prediction
        made before the step."""
        p = self.predict(x)
        g = (p - target) * weight
        if x.index.size:
            w = self.weights[x.index]
            grad = g * x.value + self.l2 * w
            g2 = self._g2[x.index] + grad * grad
            self._g2[x.index] = g2
            self.weights[x.index] = w - self.learning_rate * grad / np.sqrt(g2)
        self._bias_g2 += g * g
        self.bias -= self.learning_rate * g / math.sqrt(self._bias_g2)
        self.updates += 1
        return p


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class PrequentialMetrics:
    """Quality of predictions made before their label was trained on, over a recent window.

    `event` is what the gate did (deferred or not) when the stage reports it; otherwise the
    prompt counts as an escalation when its hardness quantile is at least 0.5."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.labels = 0
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=window)

    def record(self, prediction: float, target: float, event: bool) -> None:
        self.labels += 1
        self._recent.append((prediction, target, event))

    def auc(self) -> float:
        if not self._recent:
            return math.nan
        predictions, _, events = zip(*self._recent, strict=True)
        return auc(predictions, events)

    def brier(self) -> float:
        if not self._recent:
            return math.nan
        return float(np.mean([(p - t) ** 2 for p, t, _ in self._recent]))
