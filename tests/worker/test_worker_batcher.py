"""The batcher with a fake engine: batch formation, bounded queue, drops at dequeue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from diffcascade_worker.batcher import Batcher, BatchLatencyModel, ItemResult, WorkItem
from diffcascade_worker.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from diffcascade_worker.metrics import WorkerMetrics
from diffcascade_worker.protocol import CascadeConfig
from worker_testing import FakeEngine


def _item(seed: int, *, budget_s: float = 60.0, prompt: str = "p") -> WorkItem:
    now = time.monotonic()
    return WorkItem(
        prompt=prompt,
        seed=seed,
        deadline=now + budget_s,
        enqueued_at=now,
        future=asyncio.get_running_loop().create_future(),
    )


class Harness:
    def __init__(self, engine: FakeEngine, *, capacity: int = 64, **config: float) -> None:
        self.engine = engine
        self.config = CascadeConfig(**config)  # type: ignore[arg-type]
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.batcher = Batcher(
            engine=engine,
            executor=self.executor,
            config=lambda: self.config,
            capacity=capacity,
            metrics=WorkerMetrics(cascade="c", variant="v"),
        )


@pytest.fixture
async def make_harness() -> AsyncIterator[type[Harness]]:
    made: list[Harness] = []

    class Tracked(Harness):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Tracked
    for harness in made:
        await harness.batcher.stop()
        harness.executor.shutdown(wait=True)


async def test_one_engine_call_takes_up_to_batch_size_of_what_is_queued(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(), batch_size=4)
    items = [_item(seed) for seed in range(10)]
    h.batcher.submit(items)  # queued before the loop starts: batches of 4, 4, 2
    h.batcher.start()
    results = await asyncio.gather(*(i.future for i in items))
    assert h.engine.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [r.image for r in results] == [f"p|{seed}" for seed in range(10)]  # seeds honoured
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2


async def test_max_batch_wait_collects_a_fuller_batch(make_harness: type[Harness]) -> None:
    h = make_harness(FakeEngine(), batch_size=3, max_batch_wait_ms=2000)
    h.batcher.start()
    first = _item(0)
    h.batcher.submit([first])
    await asyncio.sleep(0.05)
    rest = [_item(1), _item(2)]
    h.batcher.submit(rest)
    await asyncio.gather(first.future, *(i.future for i in rest))
    assert h.engine.batches == [[0, 1, 2]]


async def test_without_wait_a_lone_request_runs_at_once(make_harness: type[Harness]) -> None:
    h = make_harness(FakeEngine(), batch_size=8)
    h.batcher.start()
    item = _item(7)
    h.batcher.submit([item])
    result = await asyncio.wait_for(item.future, timeout=10)
    assert isinstance(result, ItemResult) and result.batch_size == 1


async def test_full_queue_refuses_the_whole_request_with_retry_after(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(), capacity=3)
    h.batcher.submit([_item(0), _item(1)])
    with pytest.raises(Overloaded) as refused:
        h.batcher.submit([_item(2), _item(3)])  # 2 + 2 > 3: neither image is queued
    assert refused.value.status_code == 429
    assert "Retry-After" in refused.value.headers()
    assert h.batcher.depth == 2


async def test_item_that_cannot_meet_its_deadline_is_dropped_at_dequeue(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(), batch_size=4)
    h.batcher.latency.observe(2, 0.5)  # a batch of two takes about half a second
    late, fine = _item(0, budget_s=0.1), _item(1, budget_s=30)
    h.batcher.submit([late, fine])
    h.batcher.start()
    with pytest.raises(DeadlineExceeded) as dropped:
        await late.future
    assert dropped.value.status_code == 503 and "Retry-After" in dropped.value.headers()
    assert (await fine.future).image == "p|1"
    assert h.engine.batches == [[1]]


async def test_engine_failure_fails_every_image_of_the_batch(make_harness: type[Harness]) -> None:
    h = make_harness(FakeEngine(fail=True), batch_size=4)
    items = [_item(0), _item(1)]
    h.batcher.submit(items)
    h.batcher.start()
    for item in items:
        with pytest.raises(InferenceFailed):
            await item.future


async def test_closed_batcher_finishes_queue_and_refuses_intake(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(delay_s=0.05), batch_size=1)
    items = [_item(seed) for seed in range(3)]
    h.batcher.submit(items)
    h.batcher.start()
    h.batcher.close()
    with pytest.raises(NotReady):
        h.batcher.submit([_item(9)])
    await asyncio.wait_for(h.batcher.join(), timeout=10)
    assert all(i.future.done() and i.future.exception() is None for i in items)


def test_latency_model_is_an_ewma_per_size_interpolated_in_between() -> None:
    model = BatchLatencyModel(alpha=0.5)
    assert model.expected(4) == 0.0  # nothing measured: never drop on a guess
    model.observe(1, 0.1)
    model.observe(1, 0.3)
    assert model.expected(1) == pytest.approx(0.2)
    model.observe(8, 0.9)
    assert model.expected(4) == pytest.approx(0.2 + (3 / 7) * 0.7)
    assert model.expected(16) == pytest.approx(0.9)
