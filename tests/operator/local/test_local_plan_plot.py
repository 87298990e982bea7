"""plan.png draws every tick: demand follows the load down, and ready replicas beside desired."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffcascade_operator.local.plan_plot import plan_figure, plot_plan


def _tick(at: float, demand: float, measured: float, heavy: int, ready: int) -> dict[str, Any]:
    return {
        "at": at,
        "demand_qps": demand,
        "measured_qps": measured,
        "threshold": 0.06 if heavy == 2 and ready < 2 else 0.12,
        "desired": {"light": 1, "heavy": heavy},
        "ready": {"light": 1, "heavy": ready},
    }


TIMELINE = [
    _tick(100, 1.0, 1.0, 1, 1),
    _tick(102, 8.2, 8.0, 2, 1),  # a second heavy replica is wanted, still starting
    _tick(104, 8.2, 8.1, 2, 1),
    _tick(106, 8.2, 8.0, 2, 2),  # it is ready
    _tick(108, 8.2, 1.0, 2, 2),  # the load fell; the plan has not changed yet
    _tick(110, 5.9, 1.0, 2, 2),
]


def _lines(fig: Any) -> dict[str, Any]:
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def test_demand_is_drawn_every_tick_not_only_at_plan_changes() -> None:
    lines = _lines(plan_figure(TIMELINE, started_at=100.0, end_s=12.0))
    measured = lines["measured demand"].get_ydata()
    assert list(measured) == [1.0, 8.0, 8.1, 8.0, 1.0, 1.0]  # back down at 1 qps
    assert list(lines["planned demand"].get_ydata())[-1] == 5.9


def test_ready_replicas_show_the_start_up_beside_the_desired_ones() -> None:
    lines = _lines(plan_figure(TIMELINE, started_at=100.0, end_s=12.0))
    desired = list(lines["heavy desired"].get_ydata())
    ready = list(lines["heavy ready"].get_ydata())
    assert desired[1:3] == [2, 2] and ready[1:3] == [1, 1]  # 4 s of start-up
    assert list(lines["threshold"].get_ydata())[1:3] == [0.06, 0.06]  # the dip it explains


def test_a_png_is_written_and_nothing_for_an_empty_timeline(tmp_path: Path) -> None:
    path = plot_plan(TIMELINE, started_at=100.0, end_s=12.0, path=tmp_path / "plan.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_plan([], started_at=0.0, end_s=1.0, path=tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
