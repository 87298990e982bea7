"""The gate: discriminators, the confidence scorer, training and calibration of f(t)."""
