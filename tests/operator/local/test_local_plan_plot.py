"""The demo's plan plot draws the recorded plan changes."""

from __future__ import annotations

from pathlib import Path

from diffcascade_operator.local.plan_plot import plot_plan


def test_plan_changes_become_a_png(tmp_path: Path) -> None:
    history = [
        {"at": 100.0, "threshold": 0.12, "demand_qps": 0.0, "replicas": {"light": 1, "heavy": 1}},
        {"at": 120.0, "threshold": 0.06, "demand_qps": 9.0, "replicas": {"light": 1, "heavy": 2}},
    ]
    path = plot_plan(history, started_at=105.0, end_s=40.0, path=tmp_path / "plan.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_plan([], started_at=0.0, end_s=1.0, path=tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
