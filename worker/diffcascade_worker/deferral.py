"""The deferral rule, shared by serving, calibration and anything that predicts deferrals.

Kept free of torch so the rule can be imported anywhere (the operator image has no torch).
"""

from __future__ import annotations

import math


def should_defer(confidence: float, threshold: float) -> bool:
    """True when a query with this gate confidence goes to the next stage.

    confidence < threshold defers; threshold 0 defers nothing; threshold >= 1.0 defers
    everything, even a confidence of exactly 1, so the two ends of the range mean "defer
    nothing" and "defer all". A NaN confidence (a broken score) defers whenever the threshold
    is above 0.
    """
    if threshold >= 1.0:
        return True
    if math.isnan(confidence):
        return threshold > 0.0
    return confidence < threshold
