"""One replay end to end: send, show progress, write the report, the per-request CSV and plots.

Shared by `diffcascade load` and `diffcascade demo` (which runs it inside its own event loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from diffcascade_operator.loadgen.client import RequestRecord, run_load
from diffcascade_operator.loadgen.plots import plot_deferral, plot_latency
from diffcascade_operator.loadgen.report import summarize, write_records, write_report
from diffcascade_operator.loadgen.schedule import Schedule


@dataclass(frozen=True)
class ReplayOutcome:
    report: dict[str, Any]
    records: tuple[RequestRecord, ...]
    report_path: Path | None
    plots: tuple[Path, ...]
    records_path: Path | None


async def replay(
    *,
    url: str,
    schedule: Schedule,
    prompts: Sequence[str],
    slo_seconds: float,
    timeout_s: float,
    max_inflight: int,
    size: str | None = None,
    report_path: Path | None = None,
    save_images: Path | None = None,
    save_count: int = 0,
    console: Console | None = None,
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
) -> ReplayOutcome:
    """Send, then write the report, CSV and plots; `stop` ends it early with a partial report."""
    console = console or Console(stderr=True)
    counts = {"ok": 0, "errors": 0, "deferred": 0}
    with Progress(
        TextColumn("[bold]load[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]}  errors {task.fields[errors]}"),
        TextColumn("deferred {task.fields[deferred]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    ) as progress:
        task = progress.add_task("load", total=len(schedule.arrivals), ok=0, errors=0, deferred=0)

        def on_record(record: RequestRecord) -> None:
            counts["ok" if record.ok else "errors"] += 1
            counts["deferred"] += int(record.deferred)
            progress.update(
                task,
                advance=1,
                ok=counts["ok"],
                errors=counts["errors"],
                deferred=counts["deferred"],
            )

        result = await run_load(
            url=url,
            schedule=schedule,
            prompts=prompts,
            timeout_s=timeout_s,
            max_inflight=max_inflight,
            size=size,
            save_images=save_images,
            save_count=save_count,
            on_record=on_record,
            stop=stop,
            api_key=api_key,
        )
    report = summarize(result, slo_seconds=slo_seconds)
    plots: tuple[Path, ...] = ()
    records_path = None
    if report_path is not None:
        folder = report_path.parent
        stem = report_path.stem
        records_path = folder / f"{stem}-requests.csv"
        plots = (
            plot_latency(result.records, slo_seconds=slo_seconds, path=folder / "latency.png"),
            plot_deferral(result.records, path=folder / "deferral.png"),
        )
        write_records(result.records, records_path)
        images = await asyncio.to_thread(_pngs, save_images) if save_images is not None else []
        report["files"] = listed_files(folder, [report_path, records_path, *plots, *images])
        write_report(report, report_path)
    return ReplayOutcome(
        report=report,
        records=result.records,
        report_path=report_path,
        plots=plots,
        records_path=records_path,
    )


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def listed_files(folder: Path, paths: Sequence[Path]) -> list[str]:
    """Every file a run wrote, relative to its report's folder when inside it."""
    listed = []
    for path in paths:
        try:
            listed.append(str(path.relative_to(folder)))
        except ValueError:
            listed.append(str(path))
    return sorted(set(listed))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines about a report."""
    lat = report["latency_s"]

    def fmt(value: float | None, unit: str = "s") -> str:
        return "-" if value is None else f"{value:.2f}{unit}"

    errors = ", ".join(f"{k}={v}" for k, v in report["errors"].items()) or "none"
    share = report["light_share"]
    head = (
        [
            f"interrupted after {report['wall_s']:.0f} s: the report covers the requests "
            f"answered; {report.get('cancelled', 0)} in flight were cancelled (not counted)"
        ]
        if report.get("interrupted")
        else []
    )
    return [
        *head,
        f"requests {report['total']}  succeeded {report['succeeded']}  late {report['late']}  "
        f"errors {report['error_total']} ({errors})",
        f"SLO {report['slo_seconds']:g}s  violation ratio "
        f"{report['slo_violation_ratio'] if report['slo_violation_ratio'] is not None else '-'}",
        f"latency p50 {fmt(lat['p50'])}  p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])}",
        f"light share {'-' if share is None else f'{share:.2f}'}  deferred {report['deferred']}  "
        f"degraded {report['degraded']}  served by {report['served_by']}",
    ]
