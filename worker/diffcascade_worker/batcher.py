"""Dynamic batching: a bounded queue of images feeding one pipeline call per batch.

One loop takes whatever is queued, up to the batch size in force (optionally waiting up to
`max_batch_wait_ms` for a fuller batch), drops at dequeue the images that cannot finish by
their deadline, and runs the engine once for the rest in a single dedicated thread (the GPU is
one device: concurrent calls would only contend). The expected batch time that decides the
drops is an exponentially weighted average of measured batch latencies per batch size.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from diffcascade_worker.engine import BatchOutput, Engine
from diffcascade_worker.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from diffcascade_worker.metrics import WorkerMetrics
from diffcascade_worker.protocol import CascadeConfig

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class ItemResult:
    """One image of a finished batch."""

    image: Any
    confidence: float | None
    started: float  # monotonic time the batch started
    finished: float
    batch_size: int


@dataclass(eq=False)
class WorkItem:
    """One image to generate; `future` resolves to an `ItemResult` or a `WorkerError`."""

    prompt: str
    seed: int
    deadline: float  # monotonic seconds
    enqueued_at: float
    future: asyncio.Future[ItemResult] = field(repr=False)


class BatchLatencyModel:
    """Expected seconds per batch size: EWMA of what was measured, interpolated in between."""

    def __init__(self, *, alpha: float = 0.3) -> None:
        self._alpha = alpha
        self._by_size: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        previous = self._by_size.get(size)
        self._by_size[size] = (
            seconds if previous is None else (1 - self._alpha) * previous + self._alpha * seconds
        )

    def expected(self, size: int) -> float:
        """0.0 while nothing is known: never drop on a guess."""
        if size in self._by_size:
            return self._by_size[size]
        sizes = sorted(self._by_size)
        if not sizes:
            return 0.0
        index = bisect.bisect_left(sizes, size)
        if index == 0:
            return self._by_size[sizes[0]]
        if index == len(sizes):
            return self._by_size[sizes[-1]]
        low, high = sizes[index - 1], sizes[index]
        fraction = (size - low) / (high - low)
        return self._by_size[low] + fraction * (self._by_size[high] - self._by_size[low])


class Batcher:
    """The bounded image queue and the loop that turns it into engine calls."""

    def __init__(
        self,
        *,
        engine: Engine,
        executor: Executor,
        config: Callable[[], CascadeConfig],
        capacity: int,
        metrics: WorkerMetrics,
        latency: BatchLatencyModel | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._engine = engine
        self._executor = executor
        self._config = config
        self.capacity = capacity
        self._metrics = metrics
        self.latency = latency or BatchLatencyModel()
        self._clock = clock
        self._queue: deque[WorkItem] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._running: list[WorkItem] = []  # the batch being computed
        self._task: asyncio.Task[None] | None = None

    # --- intake ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    def backlog_seconds(self) -> float:
        """Rough time until a newly queued image would start: a hint for Retry-After."""
        batch_size = max(1, self._config().batch_size)
        batches = len(self._queue) // batch_size + 1
        return batches * self.latency.expected(batch_size)

    def submit(self, items: list[WorkItem]) -> None:
        """Queue all of `items` or none of them (a request's images stay together)."""
        if self._closed:
            raise NotReady("the worker is draining and takes no new requests")
        if len(self._queue) + len(items) > self.capacity:
            raise Overloaded(
                f"queue full ({len(self._queue)} of {self.capacity} images waiting)",
                retry_after_s=self.backlog_seconds(),
            )
        self._queue.extend(items)
        self._metrics.queue_depth.set(len(self._queue))
        self._arrived.set()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="batcher")

    def close(self) -> None:
        """Stop intake; the loop finishes what is queued, then ends."""
        self._closed = True
        self._arrived.set()

    async def join(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Cancel the loop and fail what has not finished (shutdown after the drain timeout)."""
        self.close()
        pending = [*self._running, *self._queue]
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in pending:
            if not item.future.done():
                item.future.set_exception(NotReady("the worker shut down before this image ran"))
        self._metrics.queue_depth.set(0)

    # --- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            try:
                config = self._config()
                await self._wait_for_fuller_batch(config)
                batch = self._take(config.batch_size)
                self._metrics.queue_depth.set(len(self._queue))
                batch = self._drop_late(batch)
                if batch:
                    await self._run(batch)
            except Exception:  # a bug here must not leave every later request hanging
                logger.exception("batcher loop error; continuing")

    async def _wait_for_fuller_batch(self, config: CascadeConfig) -> None:
        if config.max_batch_wait_ms <= 0 or self._closed:
            return
        until = self._queue[0].enqueued_at + config.max_batch_wait_ms / 1000.0
        while len(self._queue) < config.batch_size and not self._closed:
            remaining = until - self._clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take(self, batch_size: int) -> list[WorkItem]:
        batch: list[WorkItem] = []
        while self._queue and len(batch) < batch_size:
            item = self._queue.popleft()
            if not item.future.done():  # a cancelled caller needs no image
                batch.append(item)
        return batch

    def _drop_late(self, batch: list[WorkItem]) -> list[WorkItem]:
        expected = self.latency.expected(len(batch))
        now = self._clock()
        kept: list[WorkItem] = []
        for item in batch:
            if item.deadline - now < expected:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"cannot finish within the deadline: {max(0.0, item.deadline - now):.3f}"
                        f" s left, a batch takes about {expected:.3f} s",
                        retry_after_s=self.backlog_seconds(),
                    )
                )
            else:
                kept.append(item)
        return kept

    async def _run(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        prompts = [item.prompt for item in batch]
        seeds = [item.seed for item in batch]
        started = self._clock()
        for item in batch:
            self._metrics.queue_wait.observe(max(0.0, started - item.enqueued_at))
        self._running = batch
        try:
            output: BatchOutput = await loop.run_in_executor(
                self._executor, self._engine.run_batch, prompts, seeds
            )
            if len(output.images) != len(batch):
                raise RuntimeError(f"engine returned {len(output.images)} images for {len(batch)}")
        except Exception as error:
            logger.exception("batch of %d failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"image generation failed: {error}"))
            return
        finally:
            self._running = []
        finished = self._clock()
        self.latency.observe(len(batch), finished - started)
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_latency.observe(finished - started)
        for index, item in enumerate(batch):
            confidence = None if output.confidences is None else float(output.confidences[index])
            if confidence is not None:
                self._metrics.gate_confidence.observe(confidence)
            if not item.future.done():
                item.future.set_result(
                    ItemResult(
                        image=output.images[index],
                        confidence=confidence,
                        started=started,
                        finished=finished,
                        batch_size=len(batch),
                    )
                )
