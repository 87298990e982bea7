"""The bundled drift traces: what bench/drift_traces.py writes, and the drift they document."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from diffcascade_operator.live_profiles import drift_distance
from diffcascade_operator.profiles import (
    defer_curve_from_scores,
    reference_confidences,
    reference_defer_curve,
)
from diffcascade_operator.sim.traces import load_trace, parse_trace

BENCH = Path(__file__).resolve().parents[3] / "bench"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("drift_traces", BENCH / "drift_traces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["harder", "easier"])
def test_the_bundled_drift_trace_is_what_the_script_writes(kind: str) -> None:
    script = _script()
    trace = parse_trace((BENCH / "traces" / f"drift_{kind}_2to16qps.txt").read_text())
    rows = script.drift_rows(kind)
    assert list(trace.prompts) == [p for _, p in rows]
    base = parse_trace((BENCH / "traces" / "maf_2to16qps.txt").read_text())
    assert trace.arrivals_s == pytest.approx(base.arrivals_s, abs=0.001)


@pytest.mark.parametrize(("kind", "late_f"), [("harder", 1.0), ("easier", 0.0)])
def test_prompts_drift_at_150_s_and_not_before(kind: str, late_f: float) -> None:
    trace = load_trace(f"drift_{kind}_2to16qps")
    confidences = reference_confidences("sd-turbo")
    profile = reference_defer_curve("sd-turbo")
    early = [
        confidences[p] for at, p in zip(trace.arrivals_s, trace.prompts, strict=True) if at < 150
    ]
    late = [
        confidences[p] for at, p in zip(trace.arrivals_s, trace.prompts, strict=True) if at >= 150
    ]
    assert drift_distance(defer_curve_from_scores(early), profile) < 0.05
    late_curve = defer_curve_from_scores(late)
    assert drift_distance(late_curve, profile) > 0.5
    assert late_curve.fractions[20] == pytest.approx(late_f)  # f(0.1)
