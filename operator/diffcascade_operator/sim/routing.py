"""Per-query routing rules by percentile: a pre-generation router and a percentile gate.

HADIS states both of its routing knobs as shares of a fixed per-prompt distribution, not as
absolute scores (`hadis/src/worker/model.py`):

- router share r: a prompt is hard, and skips the light stage, when its router score is at
  least the cut `sorted(scores)[max(int(N * (1 - r)) - 1, 0)]`;
- escalation share c: after the light stage a prompt is escalated when its confidence is
  below the cut `sorted(confidences)[max(int(N * c) - 1, 0)]`.

The cuts are taken over the whole reference distribution (c is not conditioned on "not
routed"), so the realised shares are r and c only up to those index rules: r = 0 still marks
the single highest-scoring prompt hard, and c = 0 escalates nothing. The simulator converts a
share to a cut once per assignment and then compares per query, as the worker does.
"""

from __future__ import annotations

from collections.abc import Sequence


def router_cut(sorted_scores: Sequence[float], share: float) -> float:
    """Router score at and above which a prompt is routed straight to the heavy stage."""
    if not sorted_scores:
        raise ValueError("router scores are empty")
    index = max(int(len(sorted_scores) * (1 - share)) - 1, 0)
    return float(sorted_scores[index])


def escalation_cut(sorted_confidences: Sequence[float], share: float) -> float:
    """Gate confidence below which a prompt is escalated after the light stage."""
    if not sorted_confidences:
        raise ValueError("confidences are empty")
    index = max(int(len(sorted_confidences) * share) - 1, 0)
    return float(sorted_confidences[index])


def is_routed(score: float, cut: float) -> bool:
    return score >= cut


def is_escalated(confidence: float, cut: float) -> bool:
    return confidence < cut
