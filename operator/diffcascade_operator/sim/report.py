"""Per-second CSV and PNG timeline of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffcascade_operator.profiles import QualityCurve, fid_at
from diffcascade_operator.sim.engine import NOT_SERVED, SimResult
from diffcascade_operator.sim.metrics import FID_WINDOW_S, Summary, window_light_shares


@dataclass(frozen=True)
class SecondRow:
    second: int
    arrivals: int
    completions: int
    light_completions: int
    late: int
    dropped: int
    degraded: int
    deferred: int
    threshold: float
    demand_estimate_qps: float
    replicas: tuple[int, ...]
    queue: tuple[int, ...]
    window_fid: float | None


def per_second(result: SimResult, quality: QualityCurve | None) -> list[SecondRow]:
    seconds = max(1, math.ceil(result.end_s))
    arrivals = [0] * (seconds + 1)
    completions = [0] * (seconds + 1)
    light = [0] * (seconds + 1)
    late = [0] * (seconds + 1)
    dropped = [0] * (seconds + 1)
    degraded = [0] * (seconds + 1)
    deferred = [0] * (seconds + 1)
    for qid, arrival in enumerate(result.arrival_s):
        arrivals[min(int(arrival), seconds)] += 1
        if result.deferred[qid]:
            deferred[min(int(arrival), seconds)] += 1
        stage = result.served_by[qid]
        if stage == NOT_SERVED:
            dropped[min(int(result.dropped_s[qid]), seconds)] += 1
            continue
        k = min(int(result.finish_s[qid]), seconds)
        completions[k] += 1
        light[k] += stage == 0
        degraded[k] += result.degraded[qid]
        late[k] += result.finish_s[qid] - arrival > result.slo_s + 1e-9
    shares = window_light_shares(result)
    state = {row.second: row for row in result.timeline}
    stages = len(result.stage_names)
    rows: list[SecondRow] = []
    last_state = None
    for second in range(seconds + 1):
        last_state = state.get(second, last_state)
        window = min(int(second // FID_WINDOW_S), len(shares) - 1)
        share = shares[window]
        fid = fid_at(quality, share) if quality is not None and share is not None else None
        rows.append(
            SecondRow(
                second=second,
                arrivals=arrivals[second],
                completions=completions[second],
                light_completions=light[second],
                late=late[second],
                dropped=dropped[second],
                degraded=degraded[second],
                deferred=deferred[second],
                threshold=last_state.threshold if last_state else 0.0,
                demand_estimate_qps=last_state.demand_qps if last_state else 0.0,
                replicas=last_state.replicas if last_state else (0,) * stages,
                queue=last_state.queue if last_state else (0,) * stages,
                window_fid=fid,
            )
        )
    return rows


def write_csv(path: Path, rows: Sequence[SecondRow], stage_names: Sequence[str]) -> None:
    header = [
        "second",
        "arrivals",
        "completions",
        "light_completions",
        "late",
        "dropped",
        "degraded",
        "deferred",
        "threshold",
        "demand_estimate_qps",
        *(f"replicas_{n}" for n in stage_names),
        *(f"queue_{n}" for n in stage_names),
        "window_fid",
    ]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                [
                    r.second,
                    r.arrivals,
                    r.completions,
                    r.light_completions,
                    r.late,
                    r.dropped,
                    r.degraded,
                    r.deferred,
                    f"{r.threshold:.4f}",
                    f"{r.demand_estimate_qps:.3f}",
                    *r.replicas,
                    *r.queue,
                    "" if r.window_fid is None else f"{r.window_fid:.3f}",
                ]
            )


def write_png(
    path: Path, rows: Sequence[SecondRow], stage_names: Sequence[str], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.second for r in rows]
    fig, axes = plt.subplots(5, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(xs, [r.arrivals for r in rows], lw=0.8, label="arrivals/s")
    ax.plot(xs, [r.demand_estimate_qps for r in rows], lw=1.2, label="demand estimate")
    ax.set_ylabel("QPS")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    ax.step(xs, [r.threshold for r in rows], where="post", color="tab:purple")
    ax.set_ylabel("threshold")
    ax.set_ylim(-0.02, 1.02)
    ax = axes[2]
    for k, name in enumerate(stage_names):
        ax.step(xs, [r.replicas[k] for r in rows], where="post", label=f"{name} ready")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    edges = [*xs, xs[-1] + 1] if xs else [0]
    late = [r.late for r in rows]
    total = [r.late + r.dropped for r in rows]
    ax.stairs(total, edges, fill=True, color="tab:red", label="dropped")
    ax.stairs(late, edges, fill=True, color="tab:orange", label="late")
    ax.set_ylabel("violations/s")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[4]
    ax.plot(xs, [math.nan if r.window_fid is None else r.window_fid for r in rows], color="k")
    ax.set_ylabel("FID (5-s window)")
    ax.set_xlabel("trace time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(
    out_dir: Path,
    *,
    result: SimResult,
    summary: Summary,
    quality: QualityCurve | None,
    png: bool = True,
) -> dict[str, Path]:
    """timeline.csv, timeline.png and summary.json in out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = per_second(result, quality)
    paths = {"csv": out_dir / "timeline.csv", "summary": out_dir / "summary.json"}
    write_csv(paths["csv"], rows, result.stage_names)
    if png:
        paths["png"] = out_dir / "timeline.png"
        title = (
            f"{summary.scenario} / {summary.policy} / {summary.trace} / {summary.gpus} GPUs: "
            f"violations {summary.slo_violation_ratio:.3f}, mean FID "
            f"{'n/a' if summary.mean_fid is None else f'{summary.mean_fid:.2f}'}"
        )
        write_png(paths["png"], rows, result.stage_names, title)
    paths["summary"].write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    return paths
