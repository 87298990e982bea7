"""The replay's plots: the deferral plot's legend hides no data and its QPS axis starts at 0."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from diffcascade_operator.loadgen.client import RequestRecord
from diffcascade_operator.loadgen.plots import deferral_figure, plot_deferral


def _records() -> list[RequestRecord]:
    """A step from 1 to 8 qps; every request in the busy part deferred (share 1.0, top left)."""
    records = []
    for i in range(80):
        scheduled = i * 1.0 if i < 10 else 10 + (i - 10) / 8
        records.append(
            RequestRecord(
                index=i,
                prompt_index=i,
                scheduled_s=scheduled,
                latency_s=0.5,
                status=200,
                error=None,
                served_by="heavy",
                deferred=True,
            )
        )
    return records


def test_deferral_legend_sits_outside_the_plotted_area() -> None:
    fig = deferral_figure(_records())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    legend_box = legend.get_window_extent(renderer)
    plot_box = ax.get_window_extent(renderer)
    assert legend_box.y0 >= plot_box.y1 - 1  # above the axes: no step hidden under it
    plt.close(fig)


def test_deferral_counts_start_at_zero_and_cover_the_busiest_bucket(tmp_path: Path) -> None:
    fig = deferral_figure(_records())
    low, high = fig.axes[0].get_ylim()
    assert low == 0.0 and high >= 40  # 8 qps x 5-s buckets
    plt.close(fig)
    assert plot_deferral(_records(), path=tmp_path / "deferral.png").stat().st_size > 0


def test_degraded_answers_are_their_own_bars_and_each_outcome_is_counted() -> None:
    records = [
        RequestRecord(i, i, i * 0.5, 0.5, 200, None, served_by="light", deferred=d, degraded=g)
        for i, (d, g) in enumerate([(False, False)] * 5 + [(True, False)] * 3 + [(True, True)] * 2)
    ]
    records.append(RequestRecord(10, 10, 5.0, 1.0, 503, "http_503"))
    fig = deferral_figure(records)
    labels = fig.axes[0].get_legend().get_texts()  # type: ignore[union-attr]
    assert [t.get_text() for t in labels][:4] == [
        "light image (gate confident): 5",
        "heavy image (deferred): 3",
        "light image (deferred, degraded): 2",
        "error: 1",
    ]
    plt.close(fig)
