"""The controller's decisions over a replay: threshold and replicas per stage (PNG, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_plan(
    history: Sequence[dict[str, Any]], *, started_at: float, end_s: float, path: Path
) -> Path | None:
    """Step plot of the plan changes in `history` (wall-clock `at`), relative to `started_at`."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    times = [max(0.0, h["at"] - started_at) for h in history] + [end_s]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    thresholds = [h["threshold"] for h in history]
    top.step(times, [*thresholds, thresholds[-1]], where="post", color="tab:purple")
    top.set_ylabel("threshold")
    demand = [h["demand_qps"] for h in history]
    twin = top.twinx()
    twin.step(times, [*demand, demand[-1]], where="post", color="tab:gray", linestyle=":")
    twin.set_ylabel("planned demand (qps)", color="tab:gray")
    top.set_title("Plan over time: threshold (solid), planned demand (dotted), replicas")
    top.grid(alpha=0.3)
    for variant in history[-1]["replicas"]:
        counts = [h["replicas"].get(variant, 0) for h in history]
        bottom.step(times, [*counts, counts[-1]], where="post", label=variant)
    bottom.set_ylabel("replicas")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("seconds after the replay started")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
