"""The worker's drop-at-dequeue rule on the boundary cases the simulator also replays."""

from __future__ import annotations

import asyncio

import pytest
from deadline_cases import SHARED, WORKER_ONLY
from diffcascade_worker.deadline import should_drop
from diffcascade_worker.protocol import CascadeConfig
from diffcascade_worker.serving.batcher import Batcher, BatchLatencyModel, WorkItem
from diffcascade_worker.serving.errors import DeadlineExceeded
from diffcascade_worker.serving.metrics import WorkerMetrics
from worker_testing import FakeEngine


@pytest.mark.parametrize(("remaining", "expected", "dropped"), SHARED + WORKER_ONLY)
def test_should_drop_exactly_when_the_batch_would_end_past_the_deadline(
    remaining: float, expected: float, dropped: bool
) -> None:
    assert should_drop(remaining_s=remaining, expected_batch_s=expected) is dropped


@pytest.mark.parametrize(("remaining", "expected", "dropped"), SHARED + WORKER_ONLY)
async def test_batcher_drops_at_dequeue_by_the_shared_rule(
    remaining: float, expected: float, dropped: bool
) -> None:
    now = 100.0
    latency = BatchLatencyModel()
    if expected > 0:
        latency.observe(1, expected)
    batcher = Batcher(
        engine=FakeEngine(),
        executor=None,  # type: ignore[arg-type]  # never runs a batch here
        config=lambda: CascadeConfig(),
        capacity=4,
        metrics=WorkerMetrics(cascade="c", variant="v"),
        latency=latency,
        clock=lambda: now,
    )
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    item = WorkItem(
        prompt="p",
        seed=0,
        deadline=now + remaining,
        enqueued_at=now,
        future=future,  # type: ignore[arg-type]
    )
    kept = batcher._drop_late([item])
    assert (kept == []) is dropped
    if dropped:
        assert isinstance(future.exception(), DeadlineExceeded)
