"""OpenAI's `quality` against the gate: which requests go to the next stage."""

from __future__ import annotations

import pytest
from diffcascade_worker.deferral import quality_defers


@pytest.mark.parametrize(
    ("quality", "confidence", "threshold", "defers"),
    [
        ("low", 0.0, 1.0, False),
        ("medium", 0.0, 1.0, False),
        ("high", 1.0, 0.0, True),
        ("high", None, 0.0, True),  # even a stage without a gate score sends it on
        ("auto", 0.2, 0.3, True),
        ("auto", 0.4, 0.3, False),
        (None, 0.2, 0.3, True),
        ("auto", None, 1.0, False),  # no score, no deferral: the gate decides nothing
    ],
)
def test_quality_overrides_the_gate_only_when_it_names_a_stage(
    quality: str | None, confidence: float | None, threshold: float, defers: bool
) -> None:
    assert quality_defers(quality, confidence, threshold) is defers
