"""PNG plots of a replay: latency over time and deferral rate over time (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from diffcascade_operator.loadgen.client import RequestRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _buckets(records: Sequence[RequestRecord], width_s: float) -> list[list[RequestRecord]]:
    if not records:
        return []
    count = math.floor(max(r.scheduled_s for r in records) / width_s) + 1
    buckets: list[list[RequestRecord]] = [[] for _ in range(count)]
    for record in records:
        buckets[int(record.scheduled_s // width_s)].append(record)
    return buckets


def plot_latency(
    records: Sequence[RequestRecord], *, slo_seconds: float, path: Path, title: str = ""
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    by_variant: dict[str, list[RequestRecord]] = {}
    for record in records:
        if record.ok:
            by_variant.setdefault(record.served_by or "?", []).append(record)
    for variant, group in sorted(by_variant.items()):
        ax.scatter(
            [r.scheduled_s for r in group],
            [r.latency_s for r in group],
            s=10,
            alpha=0.7,
            label=f"served by {variant}",
        )
    failed = [r for r in records if not r.ok]
    if failed:
        ax.scatter(
            [r.scheduled_s for r in failed],
            [r.latency_s for r in failed],
            s=18,
            marker="x",
            color="red",
            label="error",
        )
    ax.axhline(slo_seconds, color="black", linestyle="--", linewidth=1, label="SLO")
    ax.set_xlabel("arrival (s after start)")
    ax.set_ylabel("latency (s)")
    ax.set_title(title or "Latency over time")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_deferral(
    records: Sequence[RequestRecord], *, path: Path, bucket_s: float = 5.0, title: str = ""
) -> Path:
    import matplotlib.pyplot as plt

    fig = deferral_figure(records, bucket_s=bucket_s, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: How an answered (or failed) request ends up, in the order the bars stack.
OUTCOMES = (
    ("light", "light image (gate confident)", "tab:blue"),
    ("deferred", "heavy image (deferred)", "tab:orange"),
    ("degraded", "light image (deferred, degraded)", "tab:olive"),
    ("error", "error", "tab:red"),
)


def outcome(record: RequestRecord) -> str:
    """`light`, `deferred` (the next stage's image), `degraded` (deferred, but the light image
    came back) or `error`."""
    if not record.ok:
        return "error"
    if record.degraded:
        return "degraded"
    return "deferred" if record.deferred else "light"


def deferral_figure(
    records: Sequence[RequestRecord], *, bucket_s: float = 5.0, title: str = ""
) -> Figure:
    """Requests per bucket by outcome (stacked counts, left axis from 0) and the share the gate
    deferred, degraded ones included (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = _buckets(records, bucket_s)
    starts = [i * bucket_s for i in range(len(buckets))]
    counts = {
        key: [sum(1 for r in b if outcome(r) == key) for b in buckets] for key, *_ in OUTCOMES
    }
    fig, ax = plt.subplots(figsize=(9, 4.5))
    base = [0] * len(buckets)
    for key, label, color in OUTCOMES:
        ax.bar(
            starts,
            counts[key],
            width=bucket_s * 0.9,
            bottom=base,
            align="edge",
            color=color,
            label=f"{label}: {sum(counts[key])}",
        )
        base = [b + c for b, c in zip(base, counts[key], strict=True)]
    ax.set_ylim(0, max(base, default=0) * 1.1 or 1.0)
    ax.set_xlabel("arrival (s after start)")
    ax.set_ylabel(f"requests per {bucket_s:g} s")
    ax.grid(alpha=0.3, axis="y")
    twin = ax.twinx()
    shares = []
    for bucket in buckets:
        answered = [r for r in bucket if r.ok]
        deferred = sum(1 for r in answered if r.deferred)
        shares.append(deferred / len(answered) if answered else float("nan"))
    if buckets:  # close the last bucket so its level is drawn across its width
        twin.step(
            [*starts, len(buckets) * bucket_s],
            [*shares, shares[-1]],
            where="post",
            color="black",
            linestyle=":",
            label="deferred share (degraded included)",
        )
    twin.set_ylim(-0.02, 1.02)
    twin.set_ylabel("share of answered requests deferred")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    # Above the axes, not over them: a legend inside would hide the bars it describes.
    ax.legend(
        lines[0] + more[0],
        lines[1] + more[1],
        loc="lower left",
        bbox_to_anchor=(0.0, 1.01),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.set_title(title or f"Outcomes over time ({bucket_s:g} s buckets)", loc="right", fontsize=9)
    fig.tight_layout()
    return fig
