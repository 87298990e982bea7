"""`diffcascade load`: replay a trace or Poisson load against a cascade's entry URL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
import httpx
from diffcascade_worker.protocol import PATH_GENERATIONS, parse_size

from diffcascade_operator.loadgen.client import generations_url
from diffcascade_operator.loadgen.prompts import PromptsError, load_prompts
from diffcascade_operator.loadgen.replay import replay, summary_lines
from diffcascade_operator.loadgen.schedule import (
    Schedule,
    TraceError,
    poisson_schedule,
    trace_schedule,
)
from diffcascade_operator.local.router import PATH_PLAN
from diffcascade_operator.local.view import make_console

DEFAULT_SLO_SECONDS = 5.0


def cascade_slo(url: str) -> tuple[float, str]:
    """The SLO a local run (`diffcascade up`) serves with, from its plan URL; else the default."""
    base = generations_url(url).removesuffix(PATH_GENERATIONS)
    try:
        answer = httpx.get(f"{base}{PATH_PLAN}", timeout=3.0, trust_env=False)
        slo = answer.json().get("slo_seconds") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        slo = None
    if isinstance(slo, int | float) and slo > 0:
        return float(slo), "the cascade's"
    return DEFAULT_SLO_SECONDS, "default: no cascade SLO at this URL"


def build_schedule(
    *, trace: str | None, qps: float | None, duration: float | None, speed: float, seed: int
) -> Schedule:
    """The arrivals asked for on the command line, or a UsageError saying what is wrong."""
    if trace is not None and qps is not None:
        raise click.UsageError("--trace and --qps are alternatives: give one of them")
    if trace is None and qps is None:
        raise click.UsageError("give --trace FILE, or --qps N with --duration S")
    if trace is not None:
        try:
            return trace_schedule(trace, duration_s=duration, speed=speed)
        except TraceError as exc:
            raise click.UsageError(str(exc)) from None
    if duration is None:
        raise click.UsageError("--qps needs --duration S")
    assert qps is not None
    return poisson_schedule(qps=qps, duration_s=duration, seed=seed)


@click.command("load")
@click.option("--trace", help="Trace file (`<arrival_ms>,<prompt_idx>` lines) or bundled name.")
@click.option("--qps", type=click.FloatRange(min=0.0, min_open=True), help="Poisson rate.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0.0, min_open=True),
    help="Seconds of Poisson load; with --trace, replay only the first S seconds.",
)
@click.option(
    "--prompts",
    type=click.Path(path_type=Path, dir_okay=False),
    help="One prompt a line (default: 1,000 bundled DiffusionDB prompts).",
)
@click.option("--url", required=True, help="Entry URL, e.g. http://127.0.0.1:8080")
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the JSON report here; plots and a per-request CSV go beside it.",
)
@click.option(
    "--slo-seconds",
    type=click.FloatRange(min=0.001),
    help="Latency SLO [default: the cascade's, read from a local run's URL; else 5]",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Per-request limit; the replay ends at most ~2x this after the last arrival.",
)
@click.option("--max-inflight", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--size", help="WIDTHxHEIGHT to request (default: the server's).")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--seed", default=0, show_default=True, type=int, help="Poisson arrivals' seed.")
@click.option(
    "--save-images",
    type=click.Path(path_type=Path, file_okay=False),
    help="Save the first --save-count images here.",
)
@click.option("--save-count", default=16, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--api-key",
    envvar="DIFFCASCADE_API_KEY",
    help="Client API key, for a cascade that requires them (env DIFFCASCADE_API_KEY).",
)
def load(
    trace: str | None,
    qps: float | None,
    duration: float | None,
    prompts: Path | None,
    url: str,
    report_path: Path | None,
    slo_seconds: float | None,
    timeout_s: float,
    max_inflight: int,
    size: str | None,
    speed: float,
    seed: int,
    save_images: Path | None,
    save_count: int,
    as_json: bool,
    api_key: str | None,
) -> None:
    """Replay a trace or Poisson arrivals against URL and report SLO violations and deferrals."""
    try:
        endpoint = generations_url(url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if size is not None:
        try:
            parse_size(size)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    schedule = build_schedule(trace=trace, qps=qps, duration=duration, speed=speed, seed=seed)
    try:
        prompt_list = load_prompts(prompts)
    except PromptsError as exc:
        raise click.UsageError(str(exc)) from None
    console = make_console(stderr=True)
    reach_or_fail(endpoint)
    if slo_seconds is None:
        slo_seconds, source = cascade_slo(url)
        console.print(f"SLO {slo_seconds:g} s ({source}; --slo-seconds overrides)")
    outcome = asyncio.run(
        replay(
            url=url,
            schedule=schedule,
            prompts=prompt_list,
            slo_seconds=slo_seconds,
            timeout_s=timeout_s,
            max_inflight=max_inflight,
            size=size,
            report_path=report_path,
            save_images=save_images,
            save_count=save_count if save_images is not None else 0,
            console=console,
            api_key=api_key,
        )
    )
    if as_json:
        click.echo(json.dumps(outcome.report, indent=2))
    else:
        for line in summary_lines(outcome.report):
            click.echo(line)
    if outcome.report_path is not None:
        click.echo(f"report: {outcome.report_path}")
        for plot in outcome.plots:
            click.echo(f"plot: {plot}")
    not_found = outcome.report["errors"].get("http_404", 0)
    if not_found:
        click.echo(
            f"{not_found} requests got 404 from {endpoint}: give the cascade's entry URL "
            "(http://HOST:PORT), the OpenAI SDK's base URL (http://HOST:PORT/v1) or the full "
            f"{PATH_GENERATIONS} endpoint",
            err=True,
        )
    if outcome.report["total"] and outcome.report["succeeded"] == 0:
        raise click.ClickException(f"no request succeeded against {endpoint}")


def reach_or_fail(endpoint: str, *, timeout_s: float = 5.0) -> None:
    """Fail at once, not after the whole replay, when nothing listens at the URL."""
    try:
        httpx.get(endpoint.removesuffix(PATH_GENERATIONS) + "/", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"cannot connect to {endpoint}: {exc or type(exc).__name__} (is the cascade "
            "running? `diffcascade up` prints its URL)"
        ) from None
