"""Helpers shared by the worker tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from diffcascade_worker.models.engine import BatchOutput
from diffcascade_worker.protocol import PATH_CONFIG, PATH_METRICS, PATH_READYZ
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READY_TIMEOUT_S = 120.0
_SCRIPT = Path(sys.executable).with_name("diffcascade-worker")
#: The installed console script, or the same entry point through this interpreter.
WORKER_CLI = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from diffcascade_worker.cli import main; main()"]
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class WorkerProcess:
    """One `diffcascade-worker serve` subprocess and its log file."""

    variant: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.variant} exited with {self.process.returncode}:\n"
                    + self.log_tail()
                )
            try:
                if httpx.get(self.url + PATH_READYZ, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.variant} not ready in {timeout_s} s:\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} of the worker's /metrics."""
        text = httpx.get(self.url + PATH_METRICS, timeout=10.0).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def put_config(self, **changes: Any) -> httpx.Response:
        response = httpx.put(self.url + PATH_CONFIG, json=changes, headers=AUTH, timeout=10.0)
        assert response.status_code == 200, response.text
        return response


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def start_worker(
    *, model: Path, variant: str, logs: Path, args: Sequence[str] = (), port: int | None = None
) -> WorkerProcess:
    port = port or free_port()
    log = logs / f"{variant}-{port}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        *WORKER_CLI,
        "serve",
        "--model",
        str(model),
        "--variant",
        variant,
        "--cascade",
        "test",
        "--port",
        str(port),
        "--threads",
        "1",
        "--token",
        TOKEN,
        "--log-level",
        "warning",
        *args,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return WorkerProcess(variant=variant, port=port, process=process, log=log)


@dataclass
class Cascade:
    light: WorkerProcess
    heavy: WorkerProcess
    light_dir: Path

    def reset(self) -> None:
        """The baseline every cascade test starts from."""
        self.heavy.put_config(batch_size=4, max_batch_wait_ms=0, slo_seconds=60)
        self.light.put_config(
            threshold=0.0,
            batch_size=4,
            max_batch_wait_ms=0,
            slo_seconds=60,
            next_stage_url=self.heavy.url,
        )


@dataclass
class FakeEngine:
    """An `Engine` whose 'images' are strings and whose confidence depends on the prompt.

    A prompt starting with 'hard' scores 0.1, 'easy' 0.9, anything else 0.5.
    """

    delay_s: float = 0.0
    gate: bool = True
    fail: bool = False
    batches: list[list[int]] = field(default_factory=list)
    block: threading.Event | None = None

    def warm_up(self) -> None:
        if self.block is not None:
            self.block.wait(timeout=30)

    def run_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> BatchOutput:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("boom")
        self.batches.append(list(seeds))
        images = [f"{p}|{s}" for p, s in zip(prompts, seeds, strict=True)]
        confidences = [self.confidence(p) for p in prompts] if self.gate else None
        return BatchOutput(images=images, confidences=confidences)

    @staticmethod
    def confidence(prompt: str) -> float:
        if prompt.startswith("hard"):
            return 0.1
        return 0.9 if prompt.startswith("easy") else 0.5

    def encode(self, image: Any) -> str:
        return base64.b64encode(str(image).encode()).decode()


def fake_loader(engine: FakeEngine) -> Callable[[Any], FakeEngine]:
    return lambda _settings: engine


@contextlib.asynccontextmanager
async def served_in_process(service: Any) -> AsyncIterator[str]:
    """`service` behind the real server stack of `serve` (uvicorn, body limit, connection
    guards) on a loopback port of this event loop; yields its base URL once it is loaded."""
    import asyncio

    import uvicorn
    from diffcascade_worker.serving.serve_command import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(service, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(400):
            if server.started and service.loaded.is_set():
                break
            await asyncio.sleep(0.025)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
        sock.close()
