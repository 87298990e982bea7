"""Worker test fixtures: real `diffcascade-worker serve` processes on loopback.

Process start-up costs several seconds (torch + diffusers imports), so the light -> heavy
cascade is started once per session and tests push configs instead of restarting it.
Helpers live in `worker_testing` (a plain module: test files import it by name).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_testing import Cascade, free_port, start_worker


@pytest.fixture(scope="session")
def cascade_processes(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cascade]:
    """A light worker (gate, next stage = heavy) and a heavy worker, started once."""
    logs = tmp_path_factory.mktemp("worker-logs")
    heavy_port = free_port()
    heavy = start_worker(model=tiny_models["heavy"], variant="heavy", logs=logs, port=heavy_port)
    light = start_worker(
        model=tiny_models["light"],
        variant="light",
        logs=logs,
        args=[
            "--gate",
            str(tiny_models["light"] / "gate.pt"),
            "--next-stage-url",
            f"http://127.0.0.1:{heavy_port}",
            "--allowed-next-stage",  # the tests point deferrals at stand-in servers too
            "http://127.0.0.1:*",
            "--batch-size",
            "4",
        ],
    )
    try:
        heavy.wait_ready()
        light.wait_ready()
        yield Cascade(light=light, heavy=heavy, light_dir=tiny_models["light"])
    finally:
        for worker in (light, heavy):
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        light.terminate()
        heavy.terminate()


@pytest.fixture
def cascade(cascade_processes: Cascade) -> Cascade:
    cascade_processes.reset()
    return cascade_processes
