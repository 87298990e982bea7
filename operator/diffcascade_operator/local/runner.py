"""Shared by `up` and `demo`: load a cascade file, run it until a signal, always clean up.

Signals: the first SIGINT, SIGTERM or SIGHUP (the terminal closed) starts a clean shutdown
(workers drain); a second kills the workers at once. Before the cascade runs (the first-run
model build, loading the file), `interruptible` turns the same signals into `Interrupted`, so
clean-ups in `finally` run there too and the exit code is the same 130. `atexit` is the
backstop for any other way out of the process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from diffcascade_operator.local.actuator import missing_models
from diffcascade_operator.local.cascade import LocalCascade, StartupFailed
from diffcascade_operator.profiles import CascadeProfiles, ProfileError, profiles_from_spec
from diffcascade_operator.spec import CascadeSpec, InvalidSpec, check_deployable, load_manifest

DEFAULT_EXAMPLE = Path("examples") / "tiny-cpu.yaml"


#: Exit code of `up` and `demo` stopped by Ctrl-C, SIGTERM or SIGHUP (128 + SIGINT, as shells
#: report).
EXIT_INTERRUPTED = 130
#: The signals that stop a local run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: How long a body (the demo's replay) gets to wind down after the first signal.
BODY_STOP_S = 15.0


class LocalRunError(ValueError):
    """A cascade that cannot be run locally (bad file, missing models, workers that crash);
    the message says why and what to do."""


class Interrupted(Exception):
    """Stopped by a signal after a clean shutdown; `result` is what the body wound down to."""

    def __init__(self, result: Any = None) -> None:
        super().__init__("interrupted")
        self.result = result


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Until `run_cascade` installs its own handlers: SIGTERM and SIGHUP, like Ctrl-C, raise
    `Interrupted` where the program stands, so `finally` clean-ups run (a model build stops
    its builder and removes its staging folder) instead of the process dying mid-way."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise Interrupted()

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted() from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def default_cascade_file() -> Path | None:
    """examples/tiny-cpu.yaml of the source tree around the working directory or this package."""
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / DEFAULT_EXAMPLE
            if candidate.is_file():
                return candidate
    return None


def load_cascade_file(path: Path) -> tuple[str, CascadeSpec]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalRunError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise LocalRunError(f"{path} is not valid YAML: {exc}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise LocalRunError(f"{path} must hold exactly one DiffusionCascade document")
    try:
        name, spec = load_manifest(docs[0])
        check_deployable(spec)
    except InvalidSpec as exc:
        raise LocalRunError(f"{path}: invalid DiffusionCascade: {exc}") from None
    return name, spec


def prepare(path: Path, *, base_dir: Path) -> tuple[str, CascadeSpec, CascadeProfiles]:
    """Name, spec and profiles of a cascade file whose models exist under base_dir."""
    name, spec = load_cascade_file(path)
    missing = missing_models(spec, base_dir=base_dir)
    if missing:
        lines = "; ".join(f"{m.variant}: {m.path}" for m in missing)
        raise LocalRunError(
            f"model files not found ({lines}). Paths are relative to the working directory. "
            "Build the tiny models with `diffcascade-worker make-tiny-model --kind light "
            ".models/tiny-light` (and --kind heavy .models/tiny-heavy), or run `diffcascade demo`."
        )
    try:
        profiles = profiles_from_spec(spec, base_dir=base_dir)
    except (ProfileError, OSError, ValueError) as exc:
        raise LocalRunError(f"{path}: cannot load profiles: {exc}") from None
    return name, spec, profiles


async def run_cascade(
    cascade: LocalCascade,
    *,
    ready_timeout_s: float,
    on_ready: Callable[[str], None],
    body: Callable[[str], Awaitable[Any]] | None = None,
    duration_s: float | None = None,
    body_stop: asyncio.Event | None = None,
) -> Any:
    """Start, wait until ready, run `body(url)` (or wait for a signal / duration), stop.

    Returns body's result; None when the duration ran out. A signal raises `Interrupted` once
    everything is stopped; with `body_stop`, the first signal sets it and the body gets
    `BODY_STOP_S` to return what it has (a partial report), which `Interrupted` carries.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            cascade.supervisor.kill_all()
        stop.set()

    atexit.register(cascade.shutdown_now)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    result: Any = None
    try:
        main = asyncio.create_task(_main(cascade, ready_timeout_s, on_ready, body, duration_s))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        interrupted = main not in done
        if interrupted and body_stop is not None:
            body_stop.set()
            await asyncio.wait({main}, timeout=BODY_STOP_S)
        if main.done() and not (interrupted and main.exception() is not None):
            result = main.result()
        else:
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, LocalRunError):
                await main
        stopper.cancel()
    finally:
        await cascade.stop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        atexit.unregister(cascade.shutdown_now)
    if interrupted:
        raise Interrupted(result)
    return result


async def _main(
    cascade: LocalCascade,
    ready_timeout_s: float,
    on_ready: Callable[[str], None],
    body: Callable[[str], Awaitable[Any]] | None,
    duration_s: float | None,
) -> Any:
    await cascade.start()
    try:
        url = await cascade.wait_ready(ready_timeout_s)
    except StartupFailed as exc:
        raise LocalRunError(str(exc)) from None
    except TimeoutError:
        raise LocalRunError(
            f"no {cascade.variants[0]} replica became ready within {ready_timeout_s:.0f} s; "
            f"see the worker logs in {cascade.supervisor.log_dir}"
        ) from None
    on_ready(url)
    if body is not None:
        return await body(url)
    if duration_s is not None:
        await asyncio.sleep(duration_s)
    else:
        await asyncio.Event().wait()
    return None
