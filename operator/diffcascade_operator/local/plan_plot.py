"""The controller over a replay, tick by tick: demand, threshold and replicas per stage (PNG).

Drawn from the local loop's per-tick timeline, not from plan changes only, so the demand line
follows the load down after a step (a plan may stay put while demand falls) and each stage
shows its ready replicas beside the desired ones: a new replica's start-up is the gap between
the two, and it is why the threshold dips while the plan waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plan_figure(timeline: Sequence[dict[str, Any]], *, started_at: float, end_s: float) -> Figure:
    """Top: threshold (left), planned and measured demand (right). Bottom: desired (dashed)
    and ready (solid) replicas per stage. Times are seconds after `started_at`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    times = [h["at"] - started_at for h in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    top.step(
        times,
        [h["threshold"] for h in timeline],
        where="post",
        color="tab:purple",
        label="threshold",
    )
    top.set_ylabel("threshold")
    twin = top.twinx()
    twin.plot(
        times,
        [h["demand_qps"] for h in timeline],
        color="tab:gray",
        linestyle=":",
        label="planned demand",
    )
    measured = [h.get("measured_qps") for h in timeline]
    twin.plot(
        [t for t, m in zip(times, measured, strict=True) if m is not None],
        [m for m in measured if m is not None],
        color="tab:gray",
        label="measured demand",
    )
    twin.set_ylabel("demand (qps)", color="tab:gray")
    twin.set_ylim(bottom=0)
    handles = top.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    top.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    top.set_title("Plan over time: threshold, demand, replicas desired (dashed) and ready")
    top.grid(alpha=0.3)
    variants = list(timeline[-1]["desired"]) if timeline else []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, variant in enumerate(variants):
        color = colors[i % len(colors)]
        desired = [h["desired"].get(variant, 0) for h in timeline]
        ready = [h.get("ready", {}).get(variant, 0) for h in timeline]
        bottom.step(
            times, desired, where="post", color=color, linestyle="--", label=f"{variant} desired"
        )
        bottom.step(times, ready, where="post", color=color, label=f"{variant} ready")
    bottom.set_ylabel("replicas")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("seconds after the replay started")
    bottom.set_xlim(min([0.0, *times]), max([end_s, *times]))
    bottom.legend(loc="upper left", fontsize=8, ncol=2)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_plan(
    timeline: Sequence[dict[str, Any]], *, started_at: float, end_s: float, path: Path
) -> Path | None:
    """plan.png from the local loop's timeline; None (and no file) when it is empty."""
    if not timeline:
        return None
    import matplotlib.pyplot as plt

    fig = plan_figure(timeline, started_at=started_at, end_s=end_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
