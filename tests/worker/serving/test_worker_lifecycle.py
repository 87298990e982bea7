"""Overload and SIGTERM on a real worker process (the heavy tiny model: slow enough to queue).

The SIGTERM test ends the module's worker, so it stays last in this file.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from diffcascade_worker.protocol import (
    COMPLETIONS,
    INFLIGHT,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_READYZ,
)
from worker_testing import WorkerProcess, metric, start_worker

pytestmark = pytest.mark.slow


QUEUE_CAPACITY = 10


@pytest.fixture(scope="module")
def heavy_worker(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A heavy-model worker at batch size 1 with a 10-image queue; the last test SIGTERMs it."""
    worker = start_worker(
        model=tiny_models["heavy"],
        variant="drained",
        logs=tmp_path_factory.mktemp("lifecycle-logs"),
        args=["--queue-capacity", str(QUEUE_CAPACITY), "--batch-size", "1"],
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.terminate()


async def test_full_queue_answers_429_with_retry_after(heavy_worker: WorkerProcess) -> None:
    worker = heavy_worker
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.post(worker.url + PATH_GENERATIONS, json={"prompt": f"p{i}", "seed": i})
                for i in range(2 * QUEUE_CAPACITY)
            )
        )
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    # About the queue plus the running batch get in; the rest are refused at once.
    assert codes.count(200) >= QUEUE_CAPACITY // 2 and codes.count(429) >= 1, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    rejected = metric(worker.metrics(), COMPLETIONS.exposed, outcome="rejected")
    assert rejected == codes.count(429)


async def test_sigterm_under_load_loses_no_accepted_request_and_exits_0(
    heavy_worker: WorkerProcess,
) -> None:
    worker = heavy_worker
    accepted = QUEUE_CAPACITY
    async with httpx.AsyncClient(timeout=120) as client:
        load = [
            asyncio.create_task(
                client.post(worker.url + PATH_GENERATIONS, json={"prompt": f"p{i}", "seed": i})
            )
            for i in range(accepted)
        ]
        for _ in range(600):  # until all ten are admitted (in flight)
            if metric(worker.metrics(), INFLIGHT.name) >= accepted:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the load never became in flight")
        worker.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        during = await client.get(worker.url + PATH_READYZ)
        alive = await client.get(worker.url + PATH_HEALTHZ)
        late = await client.post(worker.url + PATH_GENERATIONS, json={"prompt": "late"})
        responses = await asyncio.gather(*load)
    assert during.status_code == 503 and during.json()["status"] == "draining"
    assert alive.status_code == 200
    assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
    assert [r.status_code for r in responses] == [200] * accepted
    assert all(r.json()["data"][0]["served_by"] == "drained" for r in responses)
    assert worker.process.wait(timeout=60) == 0, worker.log_tail()
