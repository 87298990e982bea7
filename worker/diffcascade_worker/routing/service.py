"""The router's serving state: config, decisions, forwarding, labels, drain.

A request is validated (the same OpenAI model the workers use, so a bad one gets the same 400
without costing a stage anything), scored, given its destination at acceptance and forwarded
with its body unchanged; the stage's answer (status, body, Retry-After) comes back unchanged,
plus the routing headers. When the destination was the gated entry stage, the gate's
confidence of each image in the answer (streamed or not) is a label for the scorer.

With client API keys (`--api-keys`) the router checks them itself, with the workers' own
`ApiKeys`, before any routing decision: it is the cascade's one door, whichever stage a plan
enters at or routes to. The client's `Authorization` goes on with the request, so a stage
that checks keys too (no NetworkPolicy in front of it) sees the client's own key.

A config change (a new plan) affects requests accepted after it: each request holds the
destination it was given, so nothing in flight is moved or lost. A client that hangs up
cancels its upstream request (the stage sees the disconnect and drops its queued images).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from diffcascade_worker.protocol import (
    HEADER_BUDGET_MS,
    HEADER_REQUEST_ID,
    HEADER_RETRY_AFTER,
    HEADER_ROUTED_TO,
    HEADER_ROUTER_EXPLORED,
    HEADER_ROUTER_SCORE,
    HealthStatus,
    RouterConfig,
)
from diffcascade_worker.routing.errors import BadGateway, GatewayTimeout, StageUnavailable
from diffcascade_worker.routing.labels import CompletedEventTap, labels_from_json
from diffcascade_worker.routing.metrics import RouterMetrics
from diffcascade_worker.routing.router import Destination, PreGenerationRouter
from diffcascade_worker.routing.rule import RouteDecision, Target
from diffcascade_worker.serving.api_keys import ApiKeys, check_config_token
from diffcascade_worker.serving.cascade import NextStagePolicy, generations_url
from diffcascade_worker.serving.errors import (
    ClientDisconnected,
    ConfigRejected,
    NotReady,
    Overloaded,
)
from diffcascade_worker.serving.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
)

logger = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[None]]
_T = TypeVar("_T")
_FORWARDED = ("content-type", "authorization", HEADER_BUDGET_MS, HEADER_REQUEST_ID)
_RETURNED = ("content-type", HEADER_RETRY_AFTER, "cache-control")
DEFAULT_ROUTER_PORT = 8000
DEFAULT_MAX_INFLIGHT = 1024


class RouterSettings(BaseModel):
    """Fixed for the life of the router process (flags and environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cascade: str = Field(default="default", min_length=1, max_length=128)
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_ROUTER_PORT, ge=0, le=65535)
    token: SecretStr | None = None
    insecure_no_token: bool = False
    #: Client API keys (a file, or a mounted Secret's folder); None: generation is open.
    api_keys: Path | None = None
    initial: RouterConfig | None = None
    #: Stage base URLs a config push may name (port `*` = any); the initial ones always may.
    allowed_stages: tuple[str, ...] = ()
    forward_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    drain_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    max_inflight: int = Field(default=DEFAULT_MAX_INFLIGHT, ge=1)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)
    header_timeout_s: float = Field(default=DEFAULT_HEADER_TIMEOUT_S, gt=0)
    keep_alive_s: int = Field(default=DEFAULT_KEEP_ALIVE_S, ge=1)
    seed: int | None = None  # exploration draws; fixed only in tests


class RouterService:
    def __init__(self, settings: RouterSettings, *, client: httpx.AsyncClient | None = None):
        self.settings = settings
        initial = settings.initial
        stages = [] if initial is None else [initial.entry_url, initial.heavy_url]
        self._stages = NextStagePolicy(
            allowed=[*(u for u in stages if u), *settings.allowed_stages],
            own_port=settings.port,
            own_names=[settings.cascade],
        )
        if initial is not None:
            self._check(initial)
        self.router: PreGenerationRouter | None = (
            None if initial is None else PreGenerationRouter(initial, seed=settings.seed)
        )
        #: Client API keys; None: generation is open (raises ApiKeyError when unusable).
        self.api_keys = None if settings.api_keys is None else ApiKeys(settings.api_keys)
        self.metrics = RouterMetrics(cascade=settings.cascade)
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            timeout=httpx.Timeout(settings.forward_timeout_s, connect=5.0),
            trust_env=False,
        )
        self.inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._publish_config()

    # --- config ------------------------------------------------------------------------------

    def authorize(self, token: str | None) -> None:
        check_config_token(self.settings.token, token)

    def authorize_client(self, key: str | None) -> None:
        """Raise InvalidApiKey unless generation is open or `key` is one of the API keys."""
        if self.api_keys is not None:
            self.api_keys.check(key)

    def _check(self, config: RouterConfig) -> None:
        for field, url in (("entry_url", config.entry_url), ("heavy_url", config.heavy_url)):
            if url is None:
                continue
            problem = self._stages.problem(url)
            if problem is not None:
                raise ConfigRejected(problem.replace("next_stage_url", field), param=field)

    @property
    def config(self) -> RouterConfig | None:
        return None if self.router is None else self.router.config

    def update_config(self, config: RouterConfig) -> RouterConfig:
        self._check(config)
        if self.router is None:
            self.router = PreGenerationRouter(config, seed=self.settings.seed)
        else:
            self.router.configure(config)
        self._publish_config()
        logger.info(
            "plan %s: entry %s, heavy %s, r=%.3f, exploration %.3f, scorer %s",
            config.plan_id,
            config.entry_variant,
            config.heavy_variant,
            config.router_share,
            config.exploration_share,
            config.scorer,
        )
        return config

    def _publish_config(self) -> None:
        self.metrics.publish(self.config, ready=self.readiness()[0])

    # --- health --------------------------------------------------------------------------------

    def health(self) -> HealthStatus:
        return HealthStatus(status="ok", variant="router")

    def readiness(self) -> tuple[bool, HealthStatus]:
        if self.draining:
            return False, HealthStatus(status="draining", variant="router")
        if self.router is None:
            return False, HealthStatus(
                status="not-ready", variant="router", detail="no plan yet: PUT the router config"
            )
        return True, HealthStatus(status="ok", variant="router")

    def begin_drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0.0)

    async def drain(self) -> bool:
        """Stop intake, wait for what was accepted; True when the timeout cut some off."""
        self.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        await self._client.aclose()

    # --- requests ------------------------------------------------------------------------------

    def destination(self, prompt: str, model: str | None) -> Destination:
        """Where a request goes (raises NotReady while there is no plan or while draining)."""
        ready, status = self.readiness()
        if not ready or self.router is None:
            raise NotReady(status.detail or f"router is {status.status}", retry_after_s=1)
        config = self.router.config
        if model is not None and model == config.heavy_variant and config.heavy_url:
            # Asked for the heavy variant by name: no routing decision, no label.
            return Destination(
                RouteDecision(Target.HEAVY, 0.0), config.heavy_url, model, config.plan_id
            )
        return self.router.decide(prompt)

    async def generate(
        self,
        *,
        body: bytes,
        prompt: str,
        model: str | None,
        images: int,
        headers: dict[str, str],
        disconnected: Disconnected,
    ) -> Response:
        if self.inflight >= self.settings.max_inflight:
            self.metrics.refused("rejected")
            raise Overloaded(
                f"router has {self.inflight} requests in flight (limit "
                f"{self.settings.max_inflight})",
                retry_after_s=1,
            )
        try:
            destination = self.destination(prompt, model)
        except NotReady:
            self.metrics.refused("rejected")
            raise
        learn = destination.decision.target is Target.ENTRY and model in (
            None,
            self.settings.cascade,
            destination.variant,
        )
        self.metrics.routed(
            destination.decision.target, explored=destination.decision.explored, images=images
        )
        self._enter()
        started = time.perf_counter()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.metrics.latency(destination.decision.target, time.perf_counter() - started)
                self._leave()

        try:
            upstream = await self._send(destination, body, headers, disconnected)
        except BaseException:
            release()
            raise
        returned = {k: v for k in _RETURNED if (v := upstream.headers.get(k)) is not None}
        returned.update(_routing_headers(destination.decision))
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                self._relay(upstream, prompt if learn else None, release),
                status_code=upstream.status_code,
                headers=returned,
            )
        try:
            content = await _race(upstream.aread(), disconnected)
        except httpx.HTTPError as error:
            raise BadGateway(f"stage {destination.variant}: {error}") from None
        finally:
            await upstream.aclose()
            release()
        if learn and upstream.status_code == 200:
            self._learn_from_json(prompt, content)
        return Response(content, status_code=upstream.status_code, headers=returned)

    async def _send(
        self,
        destination: Destination,
        body: bytes,
        headers: dict[str, str],
        disconnected: Disconnected,
    ) -> httpx.Response:
        forwarded = {k: v for k in _FORWARDED if (v := headers.get(k.lower())) is not None}
        request = self._client.build_request(
            "POST", generations_url(destination.url), content=body, headers=forwarded
        )
        name = destination.variant
        try:
            return await _race(self._client.send(request, stream=True), disconnected)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            self.metrics.refused("stage_unavailable")
            raise StageUnavailable(
                f"stage {name} cannot be reached: {error}", retry_after_s=1
            ) from None
        except httpx.TimeoutException:
            self.metrics.refused("stage_timeout")
            raise GatewayTimeout(f"stage {name} did not answer in time") from None
        except httpx.HTTPError as error:
            self.metrics.refused("bad_gateway")
            raise BadGateway(f"stage {name}: {type(error).__name__}: {error}") from None

    async def _relay(
        self, upstream: httpx.Response, prompt: str | None, release: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        """Relay server-sent events as they come; read the completed events' confidences."""
        tap = CompletedEventTap()
        try:
            async for chunk in upstream.aiter_raw():
                if prompt is not None:
                    for confidence, deferred in tap.feed(chunk):
                        self._observe(prompt, confidence, deferred)
                yield chunk
        except httpx.HTTPError as error:
            envelope = BadGateway(f"stage stream broke: {error}").envelope()
            yield f"event: error\ndata: {envelope.model_dump_json()}\n\n".encode()
        finally:
            await upstream.aclose()  # also when the client went away: the stage sees it
            release()

    def _learn_from_json(self, prompt: str, content: bytes) -> None:
        for confidence, deferred in labels_from_json(content):
            self._observe(prompt, confidence, deferred)

    def _observe(self, prompt: str, confidence: float, deferred: bool | None) -> None:
        if self.router is not None:
            self.router.observe(prompt, confidence, deferred=deferred)

    def refresh_metrics(self) -> None:
        """Quality gauges from the scorer's prequential record (at scrape time)."""
        self.metrics.refresh(self.router)

    def _enter(self) -> None:
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        self._idle.clear()

    def _leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
        if self.inflight == 0:
            self._idle.set()


def _routing_headers(decision: RouteDecision) -> dict[str, str]:
    return {
        HEADER_ROUTED_TO: decision.target.value,
        HEADER_ROUTER_SCORE: f"{decision.score:.6g}",
        HEADER_ROUTER_EXPLORED: str(decision.explored).lower(),
    }


async def _race(work: Awaitable[_T], disconnected: Disconnected) -> _T:
    """`work`, unless the client hangs up first: then it is cancelled (499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientDisconnected("the client closed the connection")
