"""`diffcascade up`, `status` and `demo`: a whole cascade on one machine."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ParamSpec

import click
import httpx
import yaml
from rich.console import Console

from diffcascade_operator.local.model_fetch import DEFAULT_CACHE
from diffcascade_operator.local.runner import (
    EXIT_INTERRUPTED,
    Interrupted,
    LocalRunError,
    default_cascade_file,
    interruptible,
    load_cascade_file,
    prepare,
    run_cascade,
)
from diffcascade_operator.local.state import DEFAULT_RUNS_DIR, STATE_FILE, pid_alive, read_state
from diffcascade_operator.local.view import LiveView, make_console, render_state

if TYPE_CHECKING:
    from diffcascade_worker.serving.api_keys import ApiKeys

    from diffcascade_operator.spec import CascadeSpec

P = ParamSpec("P")


def _exit_130_on_signals(command: Callable[P, None]) -> Callable[P, None]:
    """Ctrl-C, SIGTERM or SIGHUP at any moment of the command, not only once the cascade
    runs (say, during the first-run model build), stops it cleanly with exit code 130."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            with interruptible():
                command(*args, **kwargs)
        except Interrupted:
            click.echo("diffcascade: interrupted; no process left running", err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None

    return run


def _cascade_file(file: Path | None) -> Path:
    if file is not None:
        return file
    found = default_cascade_file()
    if found is None:
        raise click.UsageError(
            "no FILE given and examples/tiny-cpu.yaml not found from here; give a cascade FILE"
        )
    return found


def claim_run_dir(preferred: Path, *, explicit: bool) -> tuple[Path, IO[str]]:
    """A run folder no other `up` holds: `preferred`, else `preferred-2`, `-3`, ...

    Held by an advisory lock on `.lock` for as long as the returned handle stays open (the
    process's life), so two runs never write the same state file and logs.
    """
    for attempt in range(1, 100):
        folder = preferred if attempt == 1 else preferred.with_name(f"{preferred.name}-{attempt}")
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / ".lock").open("a", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            if explicit:
                raise click.ClickException(
                    f"run folder {folder} is in use by another `diffcascade up`; "
                    "give another --run-dir"
                ) from None
            continue
        return folder, handle
    raise click.ClickException(f"every run folder {preferred}[-N] is in use")


def _client_keys(path: Path | None, spec: CascadeSpec) -> ApiKeys | None:
    """The router's client API keys (`--api-keys`); a cascade whose spec names a keys Secret
    is served open without it, and `up` says so."""
    from diffcascade_worker.serving.api_keys import ApiKeyError, ApiKeys

    if path is None:
        if spec.api_keys is not None:
            click.echo(
                f"diffcascade: spec.apiKeys names Secret {spec.api_keys.secret_name}, which a "
                "cluster mounts; here give the keys with --api-keys FILE (now: no key needed)",
                err=True,
            )
        return None
    try:
        return ApiKeys(path)
    except ApiKeyError as error:
        raise click.UsageError(f"--api-keys: {error}") from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise


@click.command("up")
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free"
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="State file and worker logs [default: runs/local/<cascade>]",
)
@click.option(
    "--prometheus/--no-prometheus",
    default=None,
    help="Run a private Prometheus [default: when the binary is on PATH]",
)
@click.option("--live/--no-live", default=None, help="Live view [default: on a terminal]")
@click.option("--ready-timeout", default=300.0, show_default=True, type=click.FloatRange(min=1))
@click.option(
    "--duration", type=click.FloatRange(min=0), help="Stop after S seconds (default: Ctrl-C)"
)
@click.option(
    "--api-keys",
    type=click.Path(exists=True, path_type=Path),
    help="Client API keys (a file, one per line, or a folder of such files): the entry URL "
    "then answers only 'Authorization: Bearer <key>' [default: open]",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="DIFFCASCADE_CACHE_DIR",
    help="Where hf://, http(s):// and s3:// models are fetched to [default: .models/fetched]",
)
@click.option("-v", "--verbose", is_flag=True, help="Log worker starts, stops and pushes.")
@_exit_130_on_signals
def up(
    file: Path | None,
    host: str,
    port: int,
    run_dir: Path | None,
    prometheus: bool | None,
    live: bool | None,
    ready_timeout: float,
    duration: float | None,
    api_keys: Path | None,
    cache_dir: Path | None,
    verbose: bool,
) -> None:
    """Run the cascade in FILE (default examples/tiny-cpu.yaml) on this machine until Ctrl-C.

    Workers are local processes, one per replica; the same control loop as the operator scales
    them and sets the threshold. One entry URL serves the OpenAI-style images API. Models given
    as storage URIs (hf://, http(s)://, s3://) are fetched first, with the worker's own `fetch`
    (what a pod's init container runs); with GPUs here, each worker gets its own.
    """
    from diffcascade_operator.local.demo import build_missing_tiny_models

    _setup_logging(verbose)
    path = _cascade_file(file)
    if not path.is_file():
        raise click.UsageError(f"cascade file {path} does not exist")
    base_dir = Path.cwd()
    console = make_console()
    try:
        name, declared = load_cascade_file(path)
        build_missing_tiny_models(declared, base_dir=base_dir, console=console)
    except LocalRunError as exc:
        raise click.ClickException(str(exc)) from None
    folder, _lock = claim_run_dir(run_dir or DEFAULT_RUNS_DIR / name, explicit=run_dir is not None)
    started = False
    try:
        resolved = _fetch_models(path, folder, cache_dir or base_dir / DEFAULT_CACHE, console)
        code = _run_up(
            resolved,
            base_dir=base_dir,
            folder=folder,
            host=host,
            port=port,
            prometheus=prometheus,
            live=live,
            ready_timeout=ready_timeout,
            duration=duration,
            api_keys=api_keys,
            console=console,
        )
        started = True
    finally:
        if not started:
            remove_unused_run_dir(folder)
    if code:
        raise SystemExit(code)


def _fetch_models(path: Path, folder: Path, cache_dir: Path, console: Console) -> Path:
    """The cascade file to run: `path` itself, or (with storage URIs) a copy in the run folder
    whose models point at their fetched copies."""
    from diffcascade_operator.local.model_fetch import (
        FetchFailed,
        fetch_cascade_models,
        fetch_curves,
        remote_uris,
    )

    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    remote = remote_uris(document)
    curves = [
        v
        for v in (document.get("spec") or {}).get("variants") or []
        if "://" in str(((v.get("gate") or {}).get("deferCurve") or {}).get("path") or "")
    ]
    if not remote and not curves:
        return path

    def say(variant: str, field: str, uri: str) -> None:
        console.print(f"fetching {variant} {field} {uri} into {cache_dir}", highlight=False)

    try:
        document, fetched = fetch_cascade_models(document, cache_dir=cache_dir, on_fetch=say)
        document = fetch_curves(document, cache_dir=cache_dir / "curves")
    except FetchFailed as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        offline = offline and "HF_HUB_OFFLINE" not in str(exc)  # the hub's message says it
        hint = " (HF_HUB_OFFLINE is set: only what the hub cache holds can be used)"
        raise click.ClickException(f"{exc}{hint if offline else ''}") from None
    for item in fetched:
        console.print(f"  {item.variant} {item.field}: {item.path}", highlight=False)
    resolved = folder / "cascade.yaml"
    resolved.write_text(
        f"# {path} with its storage URIs fetched (diffcascade up)\n"
        + yaml.safe_dump(document, sort_keys=False),
        encoding="utf-8",
    )
    return resolved


def _run_up(
    path: Path,
    *,
    base_dir: Path,
    folder: Path,
    host: str,
    port: int,
    prometheus: bool | None,
    live: bool | None,
    ready_timeout: float,
    duration: float | None,
    api_keys: Path | None,
    console: Console,
) -> int:
    """Run the cascade in `path` until a signal or the duration; the exit code."""
    from diffcascade_operator.local.cascade import LocalCascade

    try:
        name, spec, profiles = prepare(path, base_dir=base_dir)
    except LocalRunError as exc:
        raise click.ClickException(str(exc)) from None
    keys = _client_keys(api_keys, spec)
    auto = [v.name for v in spec.variants if v.profile.auto]
    if auto:
        console.print(
            f"note: profile.auto ({', '.join(auto)}) is measured by a Job on a cluster; here the "
            "spec's tables are planned with (`diffcascade-worker profile` measures them on this "
            "machine)",
            highlight=False,
        )
    view = LiveView(console, live=live)
    try:
        cascade = LocalCascade(
            name=name,
            spec=spec,
            profiles=profiles,
            run_dir=folder,
            base_dir=base_dir,
            host=host,
            port=port,
            use_prometheus=prometheus,
            on_update=view.update,
            api_keys=keys,
        )
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None

    def on_ready(url: str) -> None:
        click.echo(f"diffcascade: cascade {name} ready at {url}", err=False)
        click.echo(
            f"  try: diffcascade load --url {url} --qps 2 --duration 20 --report report.json",
        )
        click.echo(f"  state: {cascade.state_path}   logs: {cascade.supervisor.log_dir}")
        view.start()

    code = 0
    try:
        asyncio.run(
            run_cascade(
                cascade, ready_timeout_s=ready_timeout, on_ready=on_ready, duration_s=duration
            )
        )
    except Interrupted:
        code = EXIT_INTERRUPTED  # the same as `demo` stopped by Ctrl-C
    except OSError as exc:
        raise click.ClickException(
            f"cannot start the router on {host}:{port}: {exc} (another port: --port N, any: 0)"
        ) from None
    except LocalRunError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        view.stop()
    click.echo(f"diffcascade: cascade {name} stopped; no worker left running")
    return code


def remove_unused_run_dir(folder: Path) -> None:
    """After a failed `up`: drop the run folder unless a worker wrote a log there (the log
    says why it failed); what `up` wrote itself (lock, state, fetched manifest) goes too."""
    logs = folder / "logs"
    if logs.is_dir() and any(p.stat().st_size > 0 for p in logs.glob("*.log")
                             if p.name != "prometheus.log"):  # fmt: skip
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # runs/local, runs: when now empty
        with contextlib.suppress(OSError):
            parent.rmdir()


def _local_states(runs_dir: Path, name: str | None) -> list[Path]:
    """State files of local runs, newest first (of NAME's runs: NAME, NAME-2, ... folders)."""
    found = runs_dir.glob(f"*/{STATE_FILE}")
    if name is not None:
        found = (p for p in found if re.fullmatch(rf"{re.escape(name)}(-\d+)?", p.parent.name))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _run_summary(path: Path) -> str:
    """`tiny (running, runs/local/tiny)` for the list of local runs."""
    try:
        state = read_state(path)
    except ValueError:
        return f"{path.parent.name} (unreadable)"
    alive = state.get("running") and pid_alive(int(state.get("pid", 0)))
    return f"{state.get('cascade')} ({'running' if alive else 'stopped'}, {path.parent})"


def _fresh_local_state(path: Path) -> dict[str, Any]:
    state = read_state(path)
    if state.get("running"):
        if not pid_alive(int(state.get("pid", 0))):
            state["running"] = False
            state["note"] = "the `up` process is gone (killed?)"
        elif state.get("entry_url"):
            try:
                live = httpx.get(f"{state['entry_url']}/v1/cascade/plan", timeout=2.0)
                if live.status_code == 200:
                    state = live.json()
            except (httpx.HTTPError, ValueError):
                pass
    return state


@click.command("status")
@click.argument("name", required=False)
@click.option("-n", "--namespace", help="Read the cascade NAME from this Kubernetes namespace.")
@click.option("--cluster", is_flag=True, help="Read from the cluster even if a local run exists.")
@click.option("--context", help="kubeconfig context.")
@click.option(
    "--state",
    "state_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A local run's state.json.",
)
@click.option(
    "--runs-dir",
    default=str(DEFAULT_RUNS_DIR),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw document.")
def status(
    name: str | None,
    namespace: str | None,
    cluster: bool,
    context: str | None,
    state_file: Path | None,
    runs_dir: Path,
    as_json: bool,
) -> None:
    """Print the current plan of a local run (`up`) or of a cascade on a cluster."""
    console = make_console()
    if (cluster or namespace is not None) and name is None and state_file is None:
        raise click.UsageError(
            "--cluster/--namespace read one cascade: give its NAME "
            "(`kubectl get dcas -A` lists them)"
        )
    if state_file is None and not cluster and namespace is None:
        found = _local_states(runs_dir, name)
        if found:
            state_file = found[0]
        elif name is None:
            raise click.UsageError(
                f"no local run found under {runs_dir}; give NAME (and --namespace) "
                "for a cascade on a cluster"
            )
        elif others := _local_states(runs_dir, None):
            raise click.ClickException(
                f"no local run of {name!r} under {runs_dir}; local runs: "
                + ", ".join(_run_summary(p) for p in others)
                + f". For a cascade on a cluster: diffcascade status {name} --namespace NS"
            )
    if state_file is not None:
        try:
            state = _fresh_local_state(state_file)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(json.dumps(state, indent=2))
        else:
            console.print(render_state(state))
            if state.get("note"):
                console.print(f"note: {state['note']}", style="yellow")
        return
    from diffcascade_operator.local.cluster_status import (
        ClusterStatusError,
        read_cascade,
        render_cluster_status,
    )

    if name is None:
        raise click.UsageError("give the cascade's NAME")
    try:
        obj = read_cascade(name, namespace or "default", context=context)
    except ClusterStatusError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(obj.get("status") or {}, indent=2))
    else:
        console.print(render_cluster_status(obj))


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where report, plots and images go [default: runs/demo-<timestamp>]",
)
@click.option(
    "--cascade-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Cascade to run [default: the bundled demo cascade]",
)
@click.option("--trace", help="Trace to replay [default: the bundled demo trace]")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--prometheus/--no-prometheus",
    default=None,
    help="Run a private Prometheus [default: when the binary is on PATH]",
)
@click.option("--save-count", default=24, show_default=True, type=click.IntRange(min=0))
@click.option("-v", "--verbose", is_flag=True)
@_exit_130_on_signals
def demo(
    out_dir: Path | None,
    cascade_file: Path | None,
    trace: str | None,
    port: int,
    prometheus: bool | None,
    save_count: int,
    verbose: bool,
) -> None:
    """Build tiny models, run a cascade here, replay a short trace of real prompts, report."""
    from diffcascade_operator.local.demo import run_demo

    _setup_logging(verbose)
    try:
        code = run_demo(
            out_dir=out_dir,
            cascade_file=cascade_file,
            trace=trace,
            port=port,
            use_prometheus=prometheus,
            save_count=save_count,
            console=make_console(),
            started=time.monotonic(),
        )
    except LocalRunError as exc:
        raise click.ClickException(str(exc)) from None
    if code:
        raise SystemExit(code)
