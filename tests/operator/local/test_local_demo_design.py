"""The demo's bundled cascade and trace do what the demo promises, checked with `decide()`."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffcascade_operator.control import decide
from diffcascade_operator.loadgen.schedule import trace_schedule
from diffcascade_operator.local.demo import MODELS, bundled, ensure_tiny_models
from diffcascade_operator.local.runner import prepare
from diffcascade_operator.snapshot import DemandSample, Snapshot
from rich.console import Console

pytestmark = pytest.mark.slow  # needs the session's tiny models (built once, ~30-60 s)


@pytest.fixture
def demo_dir(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    """A working directory whose .models/ holds the session's tiny models."""
    (tmp_path / ".models").mkdir()
    for kind, rel in MODELS.items():
        (tmp_path / rel).symlink_to(tiny_models[kind], target_is_directory=True)
    return tmp_path


def _rate(arrivals: list[float], start: float, end: float) -> float:
    return sum(start <= a < end for a in arrivals) / (end - start)


def test_the_demo_trace_steps_up_enough_to_scale_the_demo_cascade(demo_dir: Path) -> None:
    _, spec, profiles = prepare(bundled("demo-cascade.yaml"), base_dir=demo_dir)
    schedule = trace_schedule(str(bundled("demo_trace.txt")))
    times = [a.at_s for a in schedule.arrivals]
    assert 40 <= schedule.duration_s <= 70  # short enough for a demo
    low, high = _rate(times, 0, 15), _rate(times, 15, 45)
    assert high > 4 * low

    def plan_at(qps: float, previous: object = None) -> object:
        demand = tuple(DemandSample(at=float(t), qps=qps) for t in range(0, 21, 2))
        return decide(Snapshot(spec=spec, profiles=profiles, now=20.0, demand=demand), None)

    calm, busy = plan_at(low), plan_at(high)
    assert calm.replicas()["heavy"] == 1  # type: ignore[attr-defined]
    assert busy.replicas()["heavy"] == 2  # type: ignore[attr-defined]
    assert busy.threshold < calm.threshold  # type: ignore[attr-defined]


def test_tiny_models_are_not_rebuilt_when_present(demo_dir: Path) -> None:
    before = {rel: (demo_dir / rel).resolve() for rel in MODELS.values()}
    ensure_tiny_models(demo_dir, Console(quiet=True))
    assert {rel: (demo_dir / rel).resolve() for rel in MODELS.values()} == before
