"""The worker's logic between the HTTP routes and the batcher.

Admission (readiness, queue room, deadline), one work item per requested image, the gate
decision and deferral per image, response assembly with timings, the live cascade config, and
the loading / ready / draining life cycle. Routes in `app` only translate HTTP to these calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Literal

from diffcascade_worker.deferral import quality_defers
from diffcascade_worker.models.engine import DiffusersEngine, Engine, resolve_settings
from diffcascade_worker.protocol import (
    MAX_SEED,
    SIZE_AUTO,
    CascadeConfig,
    CascadeConfigUpdate,
    GenerationRequest,
    GenerationResponse,
    HealthStatus,
    ImageData,
    Outcome,
    PartialImageEvent,
)
from diffcascade_worker.serving.api_keys import ApiKeys, check_config_token
from diffcascade_worker.serving.batcher import Batcher, ItemResult, WorkItem
from diffcascade_worker.serving.cascade import ForwardFailed, NextStageClient, NextStagePolicy
from diffcascade_worker.serving.errors import (
    ClientDisconnected,
    ConfigRejected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    NotReady,
    WorkerError,
)
from diffcascade_worker.serving.metrics import WorkerMetrics
from diffcascade_worker.serving.settings import WorkerSettings

logger = logging.getLogger(__name__)

EngineLoader = Callable[[WorkerSettings], Engine]
#: Receives a deferred query's first-stage image while the next stage works on it.
PartialSink = Callable[[PartialImageEvent], None]

#: Resolves when the client of a request has gone away (its connection closed).
Disconnected = Callable[[], Awaitable[object]]

#: Largest budget a client may ask for in the budget header (one hour, like the SLO bound).
MAX_BUDGET_MS = 3_600_000.0
#: After the drain timeout, how long the refused requests get to send their 503s.
DRAIN_REFUSAL_GRACE_S = 2.0


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


def parse_budget_ms(value: str | None) -> float | None:
    """The budget header as milliseconds; a bad value is the client's error (400)."""
    if value is None or not value.strip():
        return None
    try:
        budget = float(value)
    except ValueError:
        raise InvalidInput(
            f"budget header must be a number of milliseconds, got {value!r}"
        ) from None
    if not 0.0 < budget <= MAX_BUDGET_MS:  # also rejects nan
        raise InvalidInput(f"budget must be in (0, {MAX_BUDGET_MS:.0f}] ms, got {value!r}")
    return budget


class WorkerService:
    """One variant's serving state: engine, batcher, config, readiness."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        engine_loader: EngineLoader = DiffusersEngine.load,
        forwarder: NextStageClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics(cascade=settings.cascade, variant=settings.variant)
        self._engine_loader = engine_loader
        self._forwarder = forwarder or NextStageClient(
            variant=settings.variant, timeout_s=settings.forward_timeout_s
        )
        self._clock = clock
        self._config = settings.initial_config()
        initial = [] if settings.next_stage_url is None else [settings.next_stage_url]
        self._next_stages = NextStagePolicy(
            allowed=[*initial, *settings.allowed_next_stages],
            own_port=settings.port,
            own_names=[f"{settings.cascade}-{settings.variant}"],
        )
        if settings.next_stage_url is not None:
            problem = self._next_stages.problem(settings.next_stage_url)
            if problem is not None:
                raise ValueError(problem)
        #: Client API keys; None: generation is open (raises ApiKeyError when unusable).
        self.api_keys = None if settings.api_keys is None else ApiKeys(settings.api_keys)
        self._drain_deadline: float | None = None
        #: Accepted requests refused because the drain timeout passed (the exit code says so).
        self.refused_at_drain = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._engine: Engine | None = None
        self._batcher: Batcher | None = None
        self._state = State.LOADING
        self._detail: str | None = "loading the model"
        self._load_task: asyncio.Task[None] | None = None
        self._warm_batch_s = 0.0
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.loaded = asyncio.Event()  # set once loading ended, ready or failed
        #: Called with a message when loading fails (the server then exits non-zero).
        self.on_fatal: Callable[[str], None] | None = None
        self._publish_config()

    # --- life cycle ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> None:
        """Load and warm up in the background, so health probes answer meanwhile."""
        if self._load_task is None:
            self._load_task = asyncio.create_task(self._load(), name="load-model")

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            settings, engine = await loop.run_in_executor(self._executor, self._load_and_warm)
        except Exception as error:
            message = f"cannot load variant {self.settings.variant}: {error}"
            logger.error(message)
            self._state, self._detail = State.FAILED, message
            self.loaded.set()
            if self.on_fatal is not None:
                self.on_fatal(message)
            return
        self.settings = settings
        self._engine = engine
        self._batcher = Batcher(
            engine=engine,
            executor=self._executor,
            config=lambda: self._config,
            capacity=self.settings.queue_capacity,
            metrics=self.metrics,
            clock=self._clock,
        )
        self._batcher.latency.observe(1, self._warm_batch_s)
        self._batcher.start()
        if self._state is State.LOADING:
            self._state, self._detail = State.READY, None
            self.metrics.ready.set(1)
            logger.info("variant %s ready", self.settings.variant)
        else:  # a drain began while loading
            self._batcher.close()
        self.loaded.set()

    def _load_and_warm(self) -> tuple[WorkerSettings, Engine]:
        # Imports torch and reads the model folder: kept off the event loop, so the HTTP
        # server (health probes) is up long before the model is.
        settings = resolve_settings(self.settings)
        engine = self._engine_loader(settings)
        engine.warm_up()
        # One timed batch at the served settings seeds the latency model used for drops.
        started = time.perf_counter()
        engine.run_batch(["warm-up"], [0])
        self._warm_batch_s = time.perf_counter() - started
        return settings, engine

    def begin_drain(self) -> None:
        """Not ready from now on; new requests get 503; accepted ones go on."""
        if self._state in (State.DRAINING, State.FAILED):
            return
        self._state, self._detail = State.DRAINING, "draining: no new requests"
        self._drain_deadline = self._clock() + self.settings.drain_timeout_s
        self.metrics.ready.set(0)
        if self._batcher is not None:
            self._batcher.close()

    async def drain(self) -> int:
        """Stop intake, wait up to the drain timeout, then refuse what is left with a 503.

        Returns how many accepted images were refused. A refused image's request gets the
        OpenAI error envelope (`not_ready`) rather than the server's plain-text 500 at exit;
        deferrals in flight are already bounded by the drain deadline.
        """
        self.begin_drain()
        timeout = self.settings.drain_timeout_s
        if await self.wait_idle(timeout):
            return 0
        waiting = self._inflight
        reason = f"the worker shut down: its drain timeout of {timeout:g} s passed first"
        refused = self._batcher.abandon(reason) if self._batcher is not None else 0
        await self.wait_idle(DRAIN_REFUSAL_GRACE_S)
        self.refused_at_drain = refused
        logger.error(
            "drain timeout (%g s) reached with %d image(s) in flight: refused %d with 503 "
            "not_ready, %d still unanswered",
            timeout,
            waiting,
            refused,
            self._inflight,
        )
        return refused + self._inflight

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when every accepted request has left within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._batcher is not None:
            await self._batcher.stop()
        await self._forwarder.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.ready.set(0)

    # --- probes ------------------------------------------------------------------------------

    def health(self) -> HealthStatus:
        status = self._probe_status()
        return HealthStatus(status=status, variant=self.settings.variant, detail=self._detail)

    def readiness(self) -> tuple[bool, HealthStatus]:
        """Ready when loaded, not draining, and able to serve a request within the SLO."""
        problem = None
        if self._state is State.READY and self._batcher is not None:
            problem = self._batcher.cannot_serve(slo_seconds=self._config.slo_seconds)
        if problem is not None:
            detail = f"cannot serve: {problem}"
            return False, HealthStatus(
                status="not-ready", variant=self.settings.variant, detail=detail
            )
        return self._state is State.READY, self.health()

    def _probe_status(self) -> Literal["ok", "not-ready", "draining"]:
        if self._state is State.READY:
            return "ok"
        return "draining" if self._state is State.DRAINING else "not-ready"

    # --- config --------------------------------------------------------------------------------

    def authorize(self, token: str | None) -> None:
        check_config_token(self.settings.token, token)

    def authorize_client(self, key: str | None) -> None:
        """Raise InvalidApiKey unless generation is open or `key` is one of the API keys."""
        if self.api_keys is not None:
            self.api_keys.check(key)

    @property
    def config(self) -> CascadeConfig:
        return self._config

    def update_config(self, update: CascadeConfigUpdate) -> CascadeConfig:
        try:
            config = CascadeConfig.model_validate(update.apply_to(self._config).model_dump())
        except ValueError as error:
            raise InvalidInput(f"invalid config: {error}") from None
        problems = self._config_problems(config)
        if problems:
            raise ConfigRejected("config refused: " + "; ".join(problems))
        self._config = config
        self._publish_config()
        logger.info("config now %s", config.model_dump_json())
        return config

    def _config_problems(self, config: CascadeConfig) -> list[str]:
        """What would make this worker refuse every request, or defer where it must not."""
        problems = []
        if config.next_stage_url is not None:
            problem = self._next_stages.problem(config.next_stage_url)
            if problem is not None:
                problems.append(problem)
        one = self._batcher.latency.expected(1) if self._batcher is not None else 0.0
        # Only a changed SLO is checked: a push that keeps it must not fail during a stall.
        if config.slo_seconds != self._config.slo_seconds and config.slo_seconds < one:
            problems.append(
                f"slo_seconds {config.slo_seconds:g} is shorter than one batch here "
                f"(about {one:.3f} s): every request would be dropped"
            )
        return problems

    def _publish_config(self) -> None:
        self.metrics.threshold.set(self._config.threshold)
        self.metrics.configured_batch_size.set(self._config.batch_size)

    # --- generation ----------------------------------------------------------------------------

    async def generate(
        self,
        request: GenerationRequest,
        *,
        budget_ms: float | None = None,
        request_id: str | None = None,
        on_partial: PartialSink | None = None,
        deferred_from: str | None = None,
        disconnected: Disconnected | None = None,
        api_key: str | None = None,
    ) -> GenerationResponse:
        """The images of one request; with `on_partial`, a deferred query's first-stage image
        is handed to it as soon as it exists (the streaming route sends it as a partial).

        A request another stage deferred here (`deferred_from`) is never deferred again, so a
        loop of stages ends after one hop. When `disconnected` resolves first, the request's
        images still queued are dropped: nobody would read them. `api_key`, the client's, goes
        on with a deferral: the next stage may check keys too (a cascade without a router).
        """
        arrival = self._clock()
        ready = self._state is State.READY
        self._check_request(request, ready=ready)
        count = request.n
        self.metrics.arrivals.inc(count)
        batcher = self._batcher
        if not ready or batcher is None:
            self.metrics.completed(Outcome.REJECTED, count)
            raise NotReady(f"worker not ready: {self._detail}", retry_after_s=1.0)
        config = self._config
        budget_s = config.slo_seconds if budget_ms is None else budget_ms / 1000.0
        seeds = self._seeds(request)
        loop = asyncio.get_running_loop()
        items = [
            WorkItem(
                prompt=request.prompt,
                seed=seed,
                deadline=arrival + budget_s,
                enqueued_at=arrival,
                future=loop.create_future(),
            )
            for seed in seeds
        ]
        try:
            batcher.submit(items)
        except WorkerError:
            self.metrics.completed(Outcome.REJECTED, count)
            raise
        self._enter(count)
        # `model: <this variant>` asks for this stage alone: no deferral.
        alone = request.model == self.settings.variant != self.settings.cascade
        completing = self._complete(
            items,
            arrival=arrival,
            request_id=request_id,
            api_key=api_key,
            defer_allowed=not alone and not deferred_from,
            on_partial=on_partial if request.partial_images else None,
            quality=request.quality,
        )
        try:
            if disconnected is None:
                response = await completing
            else:
                response = await self._unless_disconnected(completing, items, disconnected)
        finally:
            self._leave(count)
        return response.model_copy(
            update={"size": self.settings.size_text, "safety_identifier": request.identifier}
        )

    def _check_request(self, request: GenerationRequest, *, ready: bool) -> None:
        """What the request model cannot know: this worker's names, size and queue."""
        settings = self.settings
        if request.model is not None and request.model not in (settings.cascade, settings.variant):
            raise InvalidInput(
                f"model {request.model!r} is not served here: use {settings.cascade!r} (the "
                f"cascade) or {settings.variant!r} (this stage alone); GET /v1/models lists them",
                param="model",
                code="model_not_found",
            )
        size = request.size
        if ready and size not in (None, SIZE_AUTO) and size != settings.size_text:
            raise InvalidInput(
                f"unsupported size {size!r}; this worker serves {settings.size_text} "
                "(or ask for 'auto')",
                param="size",
            )
        if request.n > settings.queue_capacity:
            raise InvalidInput(
                f"n={request.n} is more than this worker's queue holds "
                f"({settings.queue_capacity} images): ask for fewer per request",
                param="n",
            )
        if request.stream and request.n != 1:
            raise InvalidInput("stream: true serves one image per request (n=1)", param="n")
        if request.partial_images is not None and not request.stream:
            raise InvalidInput("partial_images needs stream: true", param="partial_images")

    async def _unless_disconnected(
        self,
        completing: Awaitable[GenerationResponse],
        items: list[WorkItem],
        disconnected: Disconnected,
    ) -> GenerationResponse:
        work = asyncio.ensure_future(completing)
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Our caller was cancelled: the streaming route's own disconnect listener (or a
            # server shutdown) got there first. The work must not run on for nobody.
            self._abandon(work, items)
            raise
        finally:
            watch.cancel()
        if work.done():
            return work.result()
        self._abandon(work, items)
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected("the client disconnected before its images were done")

    def _abandon(self, work: asyncio.Future[GenerationResponse], items: list[WorkItem]) -> None:
        """Stop a request's work: queued images are skipped by the batcher, a deferral in
        flight is cancelled (the next stage sees its client go and drops it too)."""
        if work.done():
            return
        work.cancel()
        for item in items:
            item.future.cancel()
        self.metrics.completed(Outcome.ABANDONED, len(items))

    def _forward_deadline(self, item: WorkItem) -> float:
        """A deferral ends by the request's deadline, and by the drain deadline when draining."""
        drain = self._drain_deadline
        return item.deadline if drain is None else min(item.deadline, drain)

    def _seeds(self, request: GenerationRequest) -> list[int]:
        first = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
        return [(first + i) % (MAX_SEED + 1) for i in range(request.n)]

    def _enter(self, count: int) -> None:
        self._inflight += count
        self._idle.clear()
        self.metrics.inflight.set(self._inflight)

    def _leave(self, count: int) -> None:
        self._inflight -= count
        self.metrics.inflight.set(self._inflight)
        if self._inflight == 0:
            self._idle.set()

    async def _complete(
        self,
        items: list[WorkItem],
        *,
        arrival: float,
        request_id: str | None,
        api_key: str | None = None,
        defer_allowed: bool = True,
        on_partial: PartialSink | None = None,
        quality: str | None = None,
    ) -> GenerationResponse:
        outcomes = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                error = (
                    outcome if isinstance(outcome, WorkerError) else InferenceFailed(str(outcome))
                )
                kind = Outcome.DROPPED if isinstance(error, DeadlineExceeded) else Outcome.FAILED
                if isinstance(error, NotReady):
                    kind = Outcome.REJECTED
                self.metrics.completed(kind, len(items))
                raise error
        results = [o for o in outcomes if isinstance(o, ItemResult)]
        finishing = [
            self._finish_image(
                item,
                result,
                arrival=arrival,
                request_id=request_id,
                api_key=api_key,
                defer_allowed=defer_allowed,
                on_partial=on_partial,
                quality=quality,
            )
            for item, result in zip(items, results, strict=True)
        ]
        # One image (the common case) needs no task per image; several defer concurrently.
        data = [await finishing[0]] if len(finishing) == 1 else await asyncio.gather(*finishing)
        return GenerationResponse(created=int(time.time()), data=list(data))

    async def _finish_image(
        self,
        item: WorkItem,
        result: ItemResult,
        *,
        arrival: float,
        request_id: str | None,
        api_key: str | None = None,
        defer_allowed: bool = True,
        on_partial: PartialSink | None = None,
        quality: str | None = None,
    ) -> ImageData:
        config = self._config
        confidence = result.confidence
        defer = (
            defer_allowed
            and config.next_stage_url is not None
            and quality_defers(quality, confidence, config.threshold)
        )
        served_by = self.settings.variant
        flagged = result.flagged
        b64: str | None = None
        outcome = Outcome.SERVED
        if defer:
            assert config.next_stage_url is not None
            if on_partial is not None:
                b64 = await self._encode(result.image)
                on_partial(
                    PartialImageEvent(
                        b64_json=b64,
                        created_at=int(time.time()),
                        size=self.settings.size_text,
                        served_by=served_by,
                        seed=item.seed,
                        confidence=confidence,
                        partial_image_index=0,
                    )
                )
            try:
                forwarded = await self._forwarder.forward(
                    next_stage_url=config.next_stage_url,
                    prompt=item.prompt,
                    seed=item.seed,
                    size=self.settings.size_text,
                    budget_s=self._forward_deadline(item) - self._clock(),
                    request_id=request_id,
                    api_key=api_key,
                )
            except ForwardFailed as error:
                logger.warning("deferral degraded to %s's image: %s", served_by, error)
                outcome = Outcome.DEGRADED
            else:
                outcome = Outcome.DEFERRED
                b64, served_by = forwarded.image.b64_json, forwarded.image.served_by
                flagged = forwarded.image.nsfw_content_detected
        if b64 is None:
            b64 = await self._encode(result.image)
        done = self._clock()
        self.metrics.completed(outcome)
        self.metrics.latency.observe(done - arrival)
        return ImageData(
            b64_json=b64,
            seed=item.seed,
            served_by=served_by,
            confidence=confidence,
            deferred=defer,
            degraded=outcome is Outcome.DEGRADED,
            nsfw_content_detected=flagged,
            queue_ms=(result.started - arrival) * 1000.0,
            run_ms=(done - result.started) * 1000.0,
            total_ms=(done - arrival) * 1000.0,
        )

    async def _encode(self, image: object) -> str:
        engine = self._engine
        assert engine is not None
        try:
            return await asyncio.to_thread(engine.encode, image)
        except Exception as error:
            raise InferenceFailed(f"cannot encode the image: {error}") from error
