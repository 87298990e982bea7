"""Worker processes of a local cascade: start, watch, drain, and never leave one behind.

Each worker runs in its own process group (so a terminal's Ctrl-C reaches only `up`, which then
drains the workers in order) and asks the kernel to SIGTERM it if `up` dies without cleaning up
(Linux `PR_SET_PDEATHSIG`, set by a tiny exec wrapper rather than a `preexec_fn`, which is unsafe
in a threaded parent). The kernel ties that signal to the *thread* that started the child, so
children are started from the event loop's thread only. `shutdown()` is idempotent and safe from
`atexit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from diffcascade_worker.protocol import EXIT_DRAIN_INCOMPLETE

logger = logging.getLogger(__name__)

# argv: PARENT_PID PROGRAM ARGS...: ask for SIGTERM when the parent dies, make sure it has not
# died already, then become PROGRAM.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (another process may still take it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn(
    argv: list[str], *, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, output to `log_path`, tied to our lifetime."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    log: IO[bytes] = log_path.open("ab")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        log.close()


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's whole process group (it leads its own session)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def stop_processes(processes: list[subprocess.Popen[bytes]], *, grace_s: float) -> None:
    """SIGTERM all, wait up to `grace_s`, SIGKILL what is left, reap everything."""
    for process in processes:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.poll() is None:
            signal_group(process, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)
        # Grandchildren share the group; make sure none survives its leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def run_tied(argv: list[str], *, log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run a child to completion (`spawn`: it dies with us); its exit code. Whatever ends the
    wait early (a signal turned into an exception, say) stops the child before it propagates."""
    process = spawn(argv, log_path=log_path, env=env)
    try:
        return process.wait()
    except BaseException:
        stop_processes([process], grace_s=2.0)
        raise


class WorkerState(StrEnum):
    STARTING = "starting"  # process up, /readyz not yet 200
    READY = "ready"  # serving, in the router
    UNREADY = "unready"  # was ready, stopped answering /readyz: out of the router until it does
    DRAINING = "draining"  # SIGTERM sent, finishing accepted requests
    EXITED = "exited"


@dataclass(eq=False)
class Worker:
    variant: str
    serial: int
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float  # monotonic
    state: WorkerState = WorkerState.STARTING
    draining_since: float | None = None
    pushed: dict[str, Any] | None = field(default=None)  # last config the worker accepted
    failed_probes: int = 0  # consecutive /readyz probes a ready worker failed

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.serial}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.UNREADY)


def worker_command() -> list[str]:
    """argv prefix that runs `diffcascade-worker` with this interpreter."""
    script = Path(sys.executable).parent / "diffcascade-worker"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from diffcascade_worker.cli import main; main()"]


class Supervisor:
    """Owns every worker process of one local cascade."""

    def __init__(
        self,
        *,
        cascade: str,
        log_dir: Path,
        token: str,
        host: str = "127.0.0.1",
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.cascade = cascade
        self.log_dir = log_dir
        self.host = host
        self.drain_timeout_s = drain_timeout_s
        self.workers: list[Worker] = []
        self._token = token
        self._serial = 0
        self._closed = False

    def launch(self, variant: str, args: list[str], *, env: dict[str, str] | None = None) -> Worker:
        """Start one worker of `variant`; `args` are its `serve` options besides host, port and
        drain (`worker_config.serve_args`, which names the variant and the cascade); `env` is
        added to its environment (e.g. its own CUDA_VISIBLE_DEVICES)."""
        if self._closed:
            raise RuntimeError("the supervisor is shut down")
        self._serial += 1
        port = free_port(self.host)
        log_path = self.log_dir / f"{variant}-{self._serial}.log"
        argv = [
            *worker_command(),
            "serve",
            "--host",
            self.host,
            "--port",
            str(port),
            "--drain-timeout",
            f"{self.drain_timeout_s:g}",
            *args,
        ]
        env = {**os.environ, **(env or {})}
        env["DIFFCASCADE_TOKEN"] = self._token  # not on the command line, where ps shows it
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        process = spawn(argv, log_path=log_path, env=env)
        worker = Worker(
            variant=variant,
            serial=self._serial,
            host=self.host,
            port=port,
            process=process,
            log_path=log_path,
            started_at=time.monotonic(),
        )
        self.workers.append(worker)
        return worker

    def drain(self, worker: Worker) -> None:
        """SIGTERM: the worker stops intake, finishes accepted requests and exits."""
        if worker.alive:
            worker.state = WorkerState.DRAINING
            worker.draining_since = time.monotonic()
            signal_group(worker.process, signal.SIGTERM)

    def poll(self) -> list[Worker]:
        """Reap exited workers, kill drains that overran; returns workers that died unasked."""
        died: list[Worker] = []
        now = time.monotonic()
        for worker in self.workers:
            if worker.state is WorkerState.EXITED:
                continue
            code = worker.process.poll()
            if code is not None:
                if worker.alive:
                    died.append(worker)
                elif code == EXIT_DRAIN_INCOMPLETE:
                    logger.warning(
                        "%s: drain timeout (%g s) passed with requests unfinished; see %s",
                        worker.name,
                        self.drain_timeout_s,
                        worker.log_path,
                    )
                worker.state = WorkerState.EXITED
            elif (
                worker.state is WorkerState.DRAINING
                and worker.draining_since is not None
                and now - worker.draining_since > self.drain_timeout_s + 5.0
            ):
                signal_group(worker.process, signal.SIGKILL)
        self.workers = [w for w in self.workers if w.state is not WorkerState.EXITED or w in died]
        return died

    def of(self, variant: str, *states: WorkerState) -> list[Worker]:
        wanted = states or (WorkerState.STARTING, WorkerState.READY, WorkerState.UNREADY)
        return [w for w in self.workers if w.variant == variant and w.state in wanted]

    def shutdown(self, *, grace_s: float | None = None) -> None:
        """Drain every worker, kill stragglers after the grace period, reap all. Idempotent."""
        self._closed = True
        processes = [w.process for w in self.workers]
        stop_processes(processes, grace_s=self.drain_timeout_s if grace_s is None else grace_s)
        for worker in self.workers:
            worker.state = WorkerState.EXITED

    def kill_all(self) -> None:
        """No draining: for a second Ctrl-C."""
        self._closed = True
        for worker in self.workers:
            signal_group(worker.process, signal.SIGKILL)
