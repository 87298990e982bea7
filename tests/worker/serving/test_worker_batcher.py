"""The batcher with a fake engine: batch formation, bounded queue, drops at dequeue."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from diffcascade_worker.models.engine import BatchOutput
from diffcascade_worker.protocol import CascadeConfig
from diffcascade_worker.serving.batcher import (
    PROBE_AFTER_DROPS,
    Batcher,
    BatchLatencyModel,
    ItemResult,
    WorkItem,
)
from diffcascade_worker.serving.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotReady,
    Overloaded,
)
from diffcascade_worker.serving.metrics import WorkerMetrics
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


class _StallFirst(FakeEngine):
    """The first batch takes `stall_s` (a stopped process), every later one `delay_s`."""

    stall_s = 0.0
    calls = 0

    def run_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> BatchOutput:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.stall_s)
        return super().run_batch(prompts, seeds)


async def _served(h: Harness, count: int, *, budget_s: float) -> int:
    items = [_item(100 + i, budget_s=budget_s) for i in range(count)]
    for item in items:  # one at a time, as a client would
        h.batcher.submit([item])
        with contextlib.suppress(DeadlineExceeded):
            await asyncio.wait_for(asyncio.shield(item.future), timeout=10)
    return sum(1 for i in items if i.future.exception() is None)


async def test_one_stalled_batch_does_not_lock_the_worker_out(
    make_harness: type[Harness],
) -> None:
    engine = _StallFirst(delay_s=0.01)
    engine.stall_s = 1.5  # 3x the SLO: a plain EWMA (alpha 0.3) would expect 0.45+ s
    h = make_harness(engine, batch_size=1, slo_seconds=0.4)
    h.batcher.latency.observe(1, 0.01)  # the warm-up batch
    h.batcher.start()
    stalled = _item(0, budget_s=5.0)
    h.batcher.submit([stalled])
    await asyncio.wait_for(stalled.future, timeout=10)
    assert h.batcher.latency.expected(1) < 0.1
    assert await _served(h, 10, budget_s=0.4) == 10
    assert h.batcher.cannot_serve(slo_seconds=0.4) is None


async def test_an_estimate_over_the_deadline_is_re_measured_by_a_probe_batch(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(delay_s=0.01), batch_size=1, slo_seconds=0.5)
    h.batcher.probe_interval_s = 0.2
    h.batcher.latency.observe(1, 2.0)  # learnt while the machine was slow, now stale
    h.batcher.start()
    served = await _served(h, 12, budget_s=0.5)
    # a few are dropped on the stale estimate, then a probe shows the truth
    assert served >= 12 - PROBE_AFTER_DROPS - 1
    assert h.batcher.probes >= 1
    assert h.batcher.latency.expected(1) < 0.1


async def test_idle_worker_whose_estimate_exceeds_its_slo_measures_itself(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(delay_s=0.01), batch_size=1, slo_seconds=0.5)
    h.batcher.probe_interval_s = 0.2
    h.batcher.latency.observe(1, 2.0)
    assert h.batcher.cannot_serve(slo_seconds=0.5) is not None  # readiness says so
    h.batcher.start()
    for _ in range(200):  # up to 10 s
        if h.batcher.cannot_serve(slo_seconds=0.5) is None:
            break
        await asyncio.sleep(0.05)
    assert h.batcher.cannot_serve(slo_seconds=0.5) is None
    assert h.batcher.probes >= 1 and h.engine.batches == [[0]]


def test_latency_model_caps_one_outlier_and_trusts_a_much_faster_batch() -> None:
    model = BatchLatencyModel(alpha=0.3, max_jump=4.0)
    model.observe(1, 0.1)
    model.observe(1, 17.0)  # a stall: counts as 0.4 s at most
    assert model.expected(1) == pytest.approx(0.7 * 0.1 + 0.3 * 0.4)
    for _ in range(8):  # a lasting slow-down is still learnt
        model.observe(1, 2.0)
    assert model.expected(1) > 1.5
    model.observe(1, 0.1)  # 20x faster than expected: the estimate was wrong
    assert model.expected(1) == pytest.approx(0.1)
    model.observe(4, 30.0)  # first batch of 4: bounded by 4 x (4 x 0.1 s)
    assert model.expected(4) == pytest.approx(1.6)


async def test_a_poisoned_batch_size_is_re_measured_while_other_sizes_run_fine(
    make_harness: type[Harness],
) -> None:
    h = make_harness(FakeEngine(delay_s=0.01), batch_size=2, slo_seconds=1.0)
    h.batcher.probe_interval_s = 0.1
    h.batcher.latency.observe(1, 0.01)
    for _ in range(40):  # batches of two were slow for a while, and no longer are
        h.batcher.latency.observe(2, 5.0)
    assert h.batcher.latency.expected(2) > 4.0
    h.batcher.start()
    pairs_served = 0
    for round_ in range(8):
        single = _item(10 * round_)
        h.batcher.submit([single])  # batches of one keep running in between
        await asyncio.wait_for(single.future, timeout=10)
        pair = [_item(10 * round_ + 1, budget_s=1.0), _item(10 * round_ + 2, budget_s=1.0)]
        h.batcher.submit(pair)
        done = await asyncio.gather(*(i.future for i in pair), return_exceptions=True)
        pairs_served += all(isinstance(d, ItemResult) for d in done)
    assert pairs_served >= 8 - PROBE_AFTER_DROPS
    assert h.batcher.latency.expected(2) < 0.5
