"""Dynamic batching: a bounded queue of images feeding one pipeline call per batch.

One loop takes whatever is queued, up to the batch size in force (optionally waiting up to
`max_batch_wait_ms` for a fuller batch), drops at dequeue the images that cannot finish by
their deadline, and runs the engine once for the rest in a single dedicated thread (the GPU is
one device: concurrent calls would only contend). The expected batch time that decides the
drops is an exponentially weighted average of measured batch latencies per batch size.

That estimate must never lock the worker out: a stall (a stopped process, a swapped-out host)
makes one batch look seconds long, and an estimate over the deadline drops every request, so no
batch runs to correct it. So one sample may raise the estimate at most `max_jump` times; after
`PROBE_AFTER_DROPS` batches in a row were dropped whole on the estimate, a batch whose images
still have time left runs anyway (at most once per `probe_interval_s`) to re-measure; and an
idle worker whose estimate exceeds its SLO measures itself with a one-image probe.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from diffcascade_worker.deadline import should_drop
from diffcascade_worker.models.engine import BatchOutput, Engine
from diffcascade_worker.protocol import CascadeConfig
from diffcascade_worker.serving.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotReady,
    Overloaded,
)
from diffcascade_worker.serving.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Batches in a row dropped whole on the estimate before one runs anyway to re-measure it.
PROBE_AFTER_DROPS = 3


@dataclass(frozen=True)
class ItemResult:
    """One image of a finished batch."""

    image: Any
    confidence: float | None
    started: float  # monotonic time the batch started
    finished: float
    batch_size: int
    flagged: bool | None = None  # the safety checker's verdict (None: none ran)


@dataclass(eq=False)
class WorkItem:
    """One image to generate; `future` resolves to an `ItemResult` or a `WorkerError`."""

    prompt: str
    seed: int
    deadline: float  # monotonic seconds
    enqueued_at: float
    future: asyncio.Future[ItemResult] = field(repr=False)


class BatchLatencyModel:
    """Expected seconds per batch size: EWMA of what was measured, interpolated in between.

    A sample counts for at most `max_jump` times what is expected for its size (scaled
    linearly beyond the largest size measured), so one stall cannot poison the estimate while a
    lasting slow-down is still learnt within a few batches; a sample under 1/`max_jump` of the
    estimate replaces it, since a batch that fast proves the estimate wrong.
    """

    def __init__(self, *, alpha: float = 0.3, max_jump: float = 4.0) -> None:
        self._alpha = alpha
        self._max_jump = max_jump
        self._by_size: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        seconds = min(seconds, self.bound(size))
        previous = self._by_size.get(size)
        if previous is None or seconds * self._max_jump < previous:
            self._by_size[size] = seconds
        else:
            self._by_size[size] = (1 - self._alpha) * previous + self._alpha * seconds

    def bound(self, size: int) -> float:
        """The largest sample `observe` takes for `size` now (infinite while nothing is known)."""
        if not self._by_size:
            return math.inf
        reference = self.expected(size)
        largest = max(self._by_size)
        if size > largest:
            reference *= size / largest
        return self._max_jump * reference if reference > 0 else math.inf

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
        probe_interval_s: float = 1.0,
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
        self._running_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.probe_interval_s = probe_interval_s
        self._last_probe = -math.inf
        # Per batch size: batches in a row dropped whole on the estimate (a size whose estimate
        # is poisoned stays so while batches of other sizes run fine).
        self._dropped_streak: dict[int, int] = {}
        self.probes = 0  # batches run against the estimate, to re-measure it

    # --- intake ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    def backlog_seconds(self) -> float:
        """Rough time until a newly queued image would start: a hint for Retry-After."""
        batch_size = max(1, self._config().batch_size)
        batches = len(self._queue) // batch_size + 1
        return batches * self.latency.expected(batch_size)

    def running_for(self) -> float:
        """Seconds the batch in progress has been running; 0 when none is."""
        since = self._running_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def cannot_serve(self, *, slo_seconds: float) -> str | None:
        """Why a request with the default deadline cannot be served now, or None."""
        running = self.running_for()
        if running > 2 * slo_seconds:
            return f"a batch has been running for {running:.1f} s (SLO {slo_seconds:g} s)"
        expected = self.latency.expected(1)
        if expected > slo_seconds:
            return f"a batch of 1 takes about {expected:.2f} s, over the {slo_seconds:g} s SLO"
        return None

    def abandon(self, reason: str) -> int:
        """Fail every queued and running image with `NotReady(reason)`; returns how many."""
        pending = [i for i in (*self._running, *self._queue) if not i.future.done()]
        self._queue.clear()
        self._metrics.queue_depth.set(0)
        for item in pending:
            item.future.set_exception(NotReady(reason))
        return len(pending)

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
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=self._idle_wait())
                except TimeoutError:
                    await self._self_probe()
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

    def _idle_wait(self) -> float | None:
        """How long to wait for work before measuring an estimate that locks requests out."""
        if self.latency.expected(1) > self._config().slo_seconds:
            return self.probe_interval_s
        return None

    async def _self_probe(self) -> None:
        if self._closed or self.latency.expected(1) <= self._config().slo_seconds:
            return
        loop = asyncio.get_running_loop()
        started = self._clock()
        self._running_since = started
        try:
            await loop.run_in_executor(self._executor, self._engine.run_batch, ["probe"], [0])
        except Exception:
            logger.exception("probe batch failed")
            return
        finally:
            self._running_since = None
        self.probes += 1
        self._measured(1, self._clock() - started)

    def _measured(self, size: int, seconds: float) -> None:
        before = self.latency.expected(size)
        self.latency.observe(size, seconds)
        slo = self._config().slo_seconds
        if before > slo >= self.latency.expected(size):
            logger.warning("batch time recovered: %.3f s for %d image(s)", seconds, size)

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
        # An estimate that has dropped batch after batch is re-measured: images that still
        # have time run anyway.
        probe = (
            self._dropped_streak.get(len(batch), 0) >= PROBE_AFTER_DROPS
            and now - self._last_probe >= self.probe_interval_s
        )
        kept: list[WorkItem] = []
        for item in batch:
            # A probe keeps every image that is not already late.
            cost = 0.0 if probe else expected
            if should_drop(remaining_s=item.deadline - now, expected_batch_s=cost):
                item.future.set_exception(
                    DeadlineExceeded(
                        f"cannot finish within the deadline: {max(0.0, item.deadline - now):.3f}"
                        f" s left, a batch takes about {expected:.3f} s",
                        retry_after_s=self.backlog_seconds(),
                    )
                )
            else:
                kept.append(item)
        if not kept:
            self._dropped_streak[len(batch)] = self._dropped_streak.get(len(batch), 0) + 1
        elif probe:
            self._last_probe = now
            self.probes += 1
            logger.info("probe batch of %d against an estimate of %.3f s", len(kept), expected)
        return kept

    async def _run(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        prompts = [item.prompt for item in batch]
        seeds = [item.seed for item in batch]
        started = self._clock()
        for item in batch:
            self._metrics.queue_wait.observe(max(0.0, started - item.enqueued_at))
        self._running = batch
        self._running_since = started
        self._dropped_streak.pop(len(batch), None)
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
            self._running_since = None
        finished = self._clock()
        self._measured(len(batch), finished - started)
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_latency(len(batch)).observe(finished - started)
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
                        flagged=None if output.flagged is None else bool(output.flagged[index]),
                    )
                )
