"""`diffcascade simulate`: replay a trace through a simulated cascade under one policy."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from diffcascade_operator.profiles import ProfileError
from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.sim.policies import POLICIES, PolicyError
from diffcascade_operator.sim.report import write_outputs
from diffcascade_operator.sim.run import simulate as run_simulation
from diffcascade_operator.sim.scenarios import ScenarioError, load_scenario
from diffcascade_operator.sim.traces import TraceError, load_trace


@click.command("simulate")
@click.option(
    "--scenario",
    required=True,
    help="Bundled scenario (sdturbo-sdv15, sdxs-sdv15, sdxl-lightning-sdxl) or a manifest file.",
)
@click.option(
    "--trace",
    "trace_arg",
    required=True,
    help="Trace file (`<arrival_ms>,<prompt_idx>` lines) or a bundled name (maf_1to8qps, ...).",
)
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="diffcascade",
    show_default=True,
    help="Controller to run.",
)
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="Override gpuBudget.")
@click.option(
    "--slo-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Override sloSeconds.",
)
@click.option(
    "--startup-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Replica start-up delay for every variant [default: each profile's startupSeconds].",
)
@click.option(
    "--dispatch",
    type=click.Choice([d.value for d in Dispatch]),
    default=Dispatch.LEAST_LOADED.value,
    show_default=True,
    help="How a stage spreads queries over its replicas.",
)
@click.option(
    "--scrape-interval",
    "scrape_interval_s",
    type=click.FloatRange(min=0.1, max=60.0),
    default=1.0,
    show_default=True,
    help="Seconds between the simulated Prometheus's scrapes of the workers (the controller "
    "reads irate over the last two, as the operator does).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random routing.")
@click.option(
    "--scoring",
    type=click.Choice(["project", "hadis", "both"]),
    default="project",
    show_default=True,
    help="project: what was served (late and dropped queries are violations, FID of the "
    "served mix); hadis: HADIS's analysis/parse_logs.py (needs a scenario with a quality "
    "table, e.g. hadis-sd35); both.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for timeline.csv, timeline.png, summary.json [default: runs/sim-...].",
)
@click.option("--no-png", is_flag=True, help="Skip the PNG timeline (faster).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def simulate(
    scenario: str,
    trace_arg: str,
    policy: str,
    gpus: int | None,
    slo_seconds: float | None,
    startup_seconds: float | None,
    dispatch: str,
    scrape_interval_s: float,
    seed: int,
    scoring: str,
    out_dir: Path | None,
    no_png: bool,
    as_json: bool,
) -> None:
    """Replay a trace through light and heavy worker pools under a policy; report SLO
    violations, FID, latency and GPU time, and write a per-second CSV and PNG timeline."""
    try:
        loaded = load_scenario(scenario, gpus=gpus, slo_seconds=slo_seconds)
    except ScenarioError as exc:
        raise click.BadParameter(str(exc), param_hint="--scenario") from None
    try:
        trace = load_trace(trace_arg)
    except TraceError as exc:
        raise click.BadParameter(str(exc), param_hint="--trace") from None
    try:
        run = run_simulation(
            scenario=loaded,
            trace=trace,
            policy_name=policy,
            startup_s=startup_seconds,
            dispatch=Dispatch(dispatch),
            scrape_interval_s=scrape_interval_s,
            seed=seed,
        )
    except (PolicyError, ProfileError) as exc:
        raise click.ClickException(str(exc)) from None
    if scoring != "project" and run.hadis is None:
        raise click.BadParameter(
            "HADIS's scoring needs a scenario with spec.qualityTable (e.g. hadis-sd35)",
            param_hint="--scoring",
        )
    target = out_dir or Path("runs") / f"sim-{loaded.name}-{policy}-{trace.name}"
    try:
        paths = write_outputs(
            target, result=run.result, summary=run.summary, quality=run.quality, png=not no_png
        )
    except OSError as exc:
        raise click.ClickException(f"cannot write results to {target}: {exc}") from None
    summary = run.summary.to_json()
    hadis = None
    if scoring != "project" and run.hadis is not None:
        hadis = {"scoring": "hadis", **asdict(run.hadis)}
    if run.idle_skipped_s:
        summary["idle_skipped_s"] = round(run.idle_skipped_s, 3)
        if not as_json:
            click.echo(
                f"idle stretches of the trace shortened by {run.idle_skipped_s:.0f} s in all "
                "(nothing arrives and the cascade is idle in them: no outcome changes)",
                err=True,
            )
    if as_json:
        summary["outputs"] = {k: str(v) for k, v in paths.items()}
        if hadis is not None:
            summary["hadis"] = hadis
        if scoring == "hadis":
            summary["reported"] = "hadis"
        click.echo(json.dumps(summary))
        return
    if scoring != "hadis":
        click.echo(f"{'scoring':>20}: project (what was served)")
    for key in (
        "scenario",
        "policy",
        "trace",
        "gpus",
        "slo_seconds",
        "requests",
        "slo_violation_ratio",
        "late",
        "dropped",
        "degraded",
        "deferred",
        "mean_fid",
        "p50_latency_s",
        "p99_latency_s",
        "light_share",
        "gpu_seconds",
        "solve_ms_p50",
        "solve_ms_p95",
        "wall_s",
    ):
        if scoring == "hadis" and key in ("slo_violation_ratio", "mean_fid"):
            continue
        click.echo(f"{key:>20}: {summary[key]}")
    if hadis is not None:
        click.echo(f"{'scoring':>20}: hadis (analysis/parse_logs.py, {hadis['method']})")
        for key in ("avg_fid", "avg_slo_violation", "points", "offset", "shed_rows"):
            click.echo(f"{'hadis ' + key:>20}: {hadis[key]}")
    click.echo(f"{'outputs':>20}: {', '.join(str(p) for p in paths.values())}")
