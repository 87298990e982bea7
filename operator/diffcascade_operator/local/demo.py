"""`diffcascade demo`: tiny models, a local cascade, a short trace of real prompts, a report.

Everything lands under `runs/demo-<timestamp>/`: report.json, latency.png, deferral.png,
plan.png, report-requests.csv, images/, the run's state.json and the worker logs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from diffcascade_operator.loadgen.prompts import load_prompts
from diffcascade_operator.loadgen.replay import (
    ReplayOutcome,
    listed_files,
    replay,
    summary_lines,
)
from diffcascade_operator.loadgen.report import write_report
from diffcascade_operator.loadgen.schedule import trace_schedule
from diffcascade_operator.local.actuator import missing_models
from diffcascade_operator.local.plan_plot import plot_plan
from diffcascade_operator.local.runner import (
    EXIT_INTERRUPTED,
    Interrupted,
    LocalRunError,
    prepare,
    run_cascade,
)
from diffcascade_operator.local.supervisor import run_tied
from diffcascade_operator.local.view import LiveView, demand_text
from diffcascade_operator.spec import CascadeSpec

MODELS = {"heavy": Path(".models") / "tiny-heavy", "light": Path(".models") / "tiny-light"}


def bundled(name: str) -> Path:
    return Path(str(resources.files("diffcascade_operator.local") / name))


def _model_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / "diffcascade.json").is_file()


def ensure_tiny_models(base_dir: Path, console: Console) -> None:
    """Build the tiny pipelines (and the light one's gate) unless already there.

    Built in a child process (the control plane never imports torch) into a temporary folder,
    then moved into place, so an interrupted build leaves nothing half-written. The builder
    dies with this process (`run_tied`); under the build lock, any `.build-*` folder left by
    a run that was killed is removed.
    """
    if all(_model_complete(base_dir / rel) for rel in MODELS.values()):
        return
    models = base_dir / ".models"
    models.mkdir(parents=True, exist_ok=True)
    with (models / ".build.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            console.print("another run is building the tiny models; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        todo = [k for k, rel in MODELS.items() if not _model_complete(base_dir / rel)]
        if todo:
            for stale in models.glob(".build-*"):
                shutil.rmtree(stale, ignore_errors=True)
            _build(todo, base_dir=base_dir, console=console)


def _build(todo: list[str], *, base_dir: Path, console: Console) -> None:
    console.print(f"building tiny models into {base_dir / '.models'} (about a minute, once)")
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=base_dir / ".models"))
    try:
        script = (
            "import sys; from pathlib import Path\n"
            "from diffcascade_worker.models.tiny import make_tiny_model\n"
            "for kind in sys.argv[2:]: make_tiny_model(kind, Path(sys.argv[1]) / kind)\n"
        )
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        log = staging / "build.log"
        code = run_tied([sys.executable, "-c", script, str(staging), *todo], log_path=log, env=env)
        if code != 0:
            output = log.read_text(errors="replace")[-2000:]
            raise LocalRunError(f"building the tiny models failed:\n{output}")
        for kind in todo:
            target = base_dir / MODELS[kind]
            shutil.rmtree(target, ignore_errors=True)
            (staging / kind).replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_missing_tiny_models(spec: CascadeSpec, *, base_dir: Path, console: Console) -> None:
    """`up` on a cascade over the tiny models (the default example) builds them, as `demo` does;
    any other missing model is left for `prepare` to report."""
    tiny = {str((base_dir / rel).resolve()) for rel in MODELS.values()}
    missing = missing_models(spec, base_dir=base_dir)
    if missing and all(any(m.path.startswith(t) for t in tiny) for m in missing):
        ensure_tiny_models(base_dir, console)


def run_demo(
    *,
    out_dir: Path | None,
    cascade_file: Path | None,
    trace: str | None,
    port: int,
    use_prometheus: bool | None,
    save_count: int,
    console: Console,
    started: float,
) -> int:
    """Returns the exit code: 0 when the replay ran and some requests succeeded."""
    from diffcascade_operator.local.cascade import LocalCascade

    base_dir = Path.cwd()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir or base_dir / "runs" / f"demo-{stamp}"
    ensure_tiny_models(base_dir, console)
    name, spec, profiles = prepare(cascade_file or bundled("demo-cascade.yaml"), base_dir=base_dir)
    schedule = trace_schedule(trace or str(bundled("demo_trace.txt")))
    prompts = load_prompts()
    view = LiveView(console, live=False)  # the progress bar owns the terminal
    cascade = LocalCascade(
        name=name,
        spec=spec,
        profiles=profiles,
        run_dir=out,
        base_dir=base_dir,
        port=port,
        use_prometheus=use_prometheus,
        on_update=view.update,
    )

    def on_ready(url: str) -> None:
        source = "Prometheus" if cascade.prometheus else "direct scrape"
        console.print(
            f"cascade [bold]{name}[/bold] ready at {url} after "
            f"{time.monotonic() - started:.0f} s (metrics: {source}); replaying "
            f"{len(schedule.arrivals)} requests over {schedule.duration_s:.0f} s "
            f"(trace {schedule.name}, {len(prompts)} DiffusionDB prompts)"
        )

    stop = asyncio.Event()  # set by the first Ctrl-C: the replay ends with a partial report

    async def body(url: str) -> ReplayOutcome:
        return await replay(
            url=url,
            schedule=schedule,
            prompts=prompts,
            slo_seconds=spec.slo_seconds,
            timeout_s=max(10.0, 4 * spec.slo_seconds),
            max_inflight=64,
            report_path=out / "report.json",
            save_images=out / "images",
            save_count=save_count,
            console=console,
            stop=stop,
        )

    console.print(f"starting cascade {name} ({', '.join(cascade.variants)}); outputs in {out}")
    code = 0
    try:
        outcome: ReplayOutcome | None = asyncio.run(
            run_cascade(
                cascade, ready_timeout_s=300.0, on_ready=on_ready, body=body, body_stop=stop
            )
        )
    except Interrupted as stopped:
        outcome, code = stopped.result, EXIT_INTERRUPTED
    if outcome is None:
        console.print("interrupted: shut down cleanly, no worker left running")
        return EXIT_INTERRUPTED
    plan_png = plot_plan(
        list(cascade.timeline),
        started_at=outcome.report["started_at"],
        end_s=outcome.report["wall_s"],
        path=out / "plan.png",
    )
    if plan_png is not None:
        outcome = replace(outcome, plots=(*outcome.plots, plan_png))
    _list_every_file(outcome, out)
    _print_summary(console, outcome, cascade.history, started)
    if code:
        console.print("interrupted: partial report written, no worker left running")
        return code
    return 0 if outcome.report["succeeded"] else 1


def _list_every_file(outcome: ReplayOutcome, out: Path) -> None:
    """report.json names every file of the run: the replay's, plan.png, state and logs."""
    if outcome.report_path is None:
        return
    written = [p for p in out.rglob("*") if p.is_file()]
    outcome.report["files"] = listed_files(out, [outcome.report_path, *written])
    write_report(outcome.report, outcome.report_path)


def _print_summary(console: Console, outcome: ReplayOutcome, history: Any, started: float) -> None:
    if console.is_terminal:
        console.rule("report")
    else:  # a rule would span the unwrapped console's whole width
        console.print("--- report ---", highlight=False)
    for line in summary_lines(outcome.report):
        console.print(line, highlight=False)
    console.print("plan changes:", highlight=False)
    for change in history:
        batches = change.get("batch_sizes") or {}
        replicas = " ".join(
            f"{k}={v}" + (f" b{batches[k]}" if batches.get(k) else "")
            for k, v in change["replicas"].items()
        )
        demand = demand_text(change["demand_qps"], change.get("measured_qps"))
        console.print(
            f"  {demand}: t={change['threshold']:.3f} defer {change['defer_fraction']:.0%} "
            f"{replicas}",
            highlight=False,
        )
    folder = outcome.report_path.parent if outcome.report_path else None
    console.print(f"report:  {outcome.report_path}", highlight=False)
    for plot in outcome.plots:
        console.print(f"plot:    {plot}", highlight=False)
    if folder is not None:
        console.print(f"images:  {folder / 'images'}", highlight=False)
        console.print(f"state:   {folder / 'state.json'}", highlight=False)
        console.print(f"logs:    {folder / 'logs'}", highlight=False)
    console.print(
        f"demo finished in {time.monotonic() - started:.0f} s; every process shut down",
        highlight=False,
    )
