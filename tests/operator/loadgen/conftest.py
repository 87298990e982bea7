"""A real light worker process (tiny model) for the load generator's tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from diffcascade_operator.local.supervisor import Supervisor, Worker


@pytest.fixture(scope="module")
def light_worker(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    supervisor = Supervisor(
        cascade="loadtest", log_dir=tmp_path_factory.mktemp("worker-logs"), token="t0ken"
    )
    light = tiny_models["light"]
    worker = supervisor.launch(
        "light",
        [
            *("--variant", "light", "--cascade", "loadtest", "--model", str(light)),
            *("--threads", "1", "--slo-seconds", "10", "--log-level", "warning"),
        ],
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert worker.process.poll() is None, worker.log_path.read_text()[-2000:]
            try:
                if httpx.get(worker.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the worker did not become ready: " + worker.log_path.read_text()[-2000:])
        yield worker
    finally:
        supervisor.shutdown(grace_s=10)
