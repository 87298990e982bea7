"""The one entry URL of a local cascade: a small proxy in front of each stage's replicas.

`POST /v1/images/generations` goes to the first stage (or, with `model: <variant>`, to that
stage alone); `POST /stages/<variant>/v1/images/generations` to a later one, which is the
next-stage URL the workers defer to, so replicas can come and go without reconfiguring the
stage before. Each request goes to the ready replica with the fewest outstanding requests.
Streamed answers (`stream: true`, server-sent events) are relayed event by event.
`GET /v1/models` lists the cascade and its variants.

The router is a server clients reach, so it runs behind the workers' armour
(`diffcascade_worker.serving.limits`): the same body limit (413), header, keep-alive and write
timeouts, and a connection limit kept well under the file limit (which it raises), so that a
flood of sockets never starves the control loop of sockets of its own. A client that hangs up
is passed on: the request to the stage is cancelled, and the worker drops the work.
With client API keys (`up --api-keys`), the entry and the model list need one of them, as an
entry-stage worker does on a cluster, and the stage paths answer only this machine (the
workers' deferrals).

`GET /metrics` exports the cluster router's series (`routing.metrics`): every arrival at the
entry, by the stage it was sent to, is the cascade's demand for `up`'s control loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import uvicorn
from diffcascade_worker.protocol import (
    HEADER_BUDGET_MS,
    HEADER_DEFERRED_FROM,
    HEADER_REQUEST_ID,
    HEADER_RETRY_AFTER,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_MODELS,
    PATH_READYZ,
    ErrorDetail,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    RouterConfig,
)
from diffcascade_worker.routing.metrics import RouterMetrics
from diffcascade_worker.routing.rule import Target
from diffcascade_worker.serving.api_keys import ApiKeys
from diffcascade_worker.serving.errors import InvalidApiKey
from diffcascade_worker.serving.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    BodyLimit,
    guarded_protocol,
    raise_file_limit,
)
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from diffcascade_operator.local.pre_route import LocalPreRouter

PATH_PLAN = "/v1/cascade/plan"
#: A client connection may take a second one to a stage, and the control loop, Prometheus and
#: the worker processes need descriptors too: clients get at most a quarter of the file limit.
FILES_PER_CLIENT_CONNECTION = 4

T = TypeVar("T")
_FORWARDED_HEADERS = ("content-type", HEADER_BUDGET_MS, HEADER_DEFERRED_FROM, HEADER_REQUEST_ID)
_RETURNED_HEADERS = ("content-type", HEADER_RETRY_AFTER)


def stage_path(variant: str) -> str:
    return f"/stages/{variant}"


@dataclass
class _Replica:
    url: str
    outstanding: int = 0


class ReplicaPool:
    """The ready replicas of one variant and their outstanding requests."""

    def __init__(self) -> None:
        self._replicas: dict[str, _Replica] = {}
        self._turn = itertools.count()

    def add(self, url: str) -> None:
        self._replicas.setdefault(url, _Replica(url))

    def remove(self, url: str) -> None:
        self._replicas.pop(url, None)

    def urls(self) -> list[str]:
        return list(self._replicas)

    def outstanding(self, url: str) -> int:
        replica = self._replicas.get(url)
        return replica.outstanding if replica else 0

    def pick(self, exclude: Iterable[str] = ()) -> _Replica | None:
        """Least outstanding requests; ties rotate so idle replicas share the load."""
        skip = set(exclude)
        candidates = [r for r in self._replicas.values() if r.url not in skip]
        if not candidates:
            return None
        least = min(r.outstanding for r in candidates)
        tied = [r for r in candidates if r.outstanding == least]
        return tied[next(self._turn) % len(tied)]


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the cascade's supervisor owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _error(
    status: int, message: str, *, code: str | None, retry_after: int | None = None
) -> Response:
    """OpenAI's error envelope, so SDK clients raise the matching exception class."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, code=code))
    headers = {HEADER_RETRY_AFTER: str(retry_after)} if retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


#: Starlette's own HTTP errors (no route; a chunked body over the limit) by status.
_HTTP_ERROR_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "payload_too_large"}


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_ERROR_CODES.get(exc.status_code)
    return _error(exc.status_code, str(exc.detail), code=code)


def _requested_model(body: bytes) -> str | None:
    """The request's `model`, if it is a JSON object naming one (the worker validates the rest)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


def _generation(body: bytes) -> GenerationRequest | None:
    """The request validated as a worker validates it; None when a worker would answer 400."""
    try:
        return GenerationRequest.model_validate_json(body)
    except ValidationError:
        return None


def connection_budget(file_limit: int) -> int:
    """How many client connections the router holds at once under `file_limit` descriptors."""
    return max(8, min(DEFAULT_MAX_CONNECTIONS, file_limit // FILES_PER_CLIENT_CONNECTION))


class _ClientGone(Exception):
    """The client hung up before the stage answered."""


async def _until_disconnected(request: Request) -> None:
    """Returns once the client's connection is gone (its body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client hangs up first: then `work` is cancelled, which
    closes the connection to the stage, so the worker sees the hang-up and drops the work."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise _ClientGone


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gone() -> Response:
    """What a client that hung up 'gets' (nobody reads it; the access log shows 499)."""
    return _error(499, "the client disconnected", code="client_disconnected")


async def _relay(
    upstream: httpx.Response, variant: str, release: Callable[[], None]
) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:  # the stage went away mid-stream: end with an error event
        detail = ErrorDetail(message=f"stage {variant}: {exc}", type="server_error", code=None)
        yield f"event: error\ndata: {ErrorResponse(error=detail).model_dump_json()}\n\n".encode()
    finally:
        release()


async def _close(upstream: httpx.Response, release: Callable[[], None]) -> None:
    try:
        await upstream.aclose()
    finally:
        release()


class Router:
    """Entry proxy of one local cascade; `pools[variant]` is maintained by the supervisor."""

    def __init__(
        self,
        *,
        variants: Iterable[str],
        plan: Callable[[], dict[str, Any]],
        forward_timeout_s: float = 120.0,
        cascade: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        keep_alive_s: int = DEFAULT_KEEP_ALIVE_S,
        max_connections: int | None = None,
        api_keys: ApiKeys | None = None,
    ) -> None:
        """`max_connections` None: `connection_budget` of the file limit (raised at start);
        `api_keys` None: generation is open."""
        self.variants = list(variants)
        self.cascade = cascade
        self.pools = {v: ReplicaPool() for v in self.variants}
        self._plan = plan
        self.pre_route: LocalPreRouter | None = None  # set by `route_by` once there is a plan
        self.metrics = RouterMetrics(cascade=cascade or "default")
        self._timeout = httpx.Timeout(forward_timeout_s, connect=5.0)
        self._client: httpx.AsyncClient | None = None
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.keep_alive_s = keep_alive_s
        self.max_connections = max_connections
        self.api_keys = api_keys
        routes = [
            Route(PATH_GENERATIONS, self._entry, methods=["POST"]),
            Route("/stages/{variant}" + PATH_GENERATIONS, self._stage, methods=["POST"]),
            Route(PATH_READYZ, self._readyz, methods=["GET"]),
            Route(PATH_HEALTHZ, self._healthz, methods=["GET"]),
            Route(PATH_PLAN, self._plan_route, methods=["GET"]),
            Route(PATH_MODELS, self._models, methods=["GET"]),
            Route(PATH_METRICS, self._metrics, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

    @property
    def entry_variant(self) -> str:
        return self.variants[0]

    def ready(self) -> bool:
        return bool(self.pools[self.entry_variant].urls())

    def route_by(self, config: RouterConfig) -> None:
        """The pre-generation step follows this config (the plan's entry, heavy stage, r)."""
        if self.pre_route is None:
            self.pre_route = LocalPreRouter(config, metrics=self.metrics)
        else:
            self.pre_route.configure(config)

    def stage_url(self, variant: str) -> str:
        """Base URL a previous stage defers to (the worker appends the generations path)."""
        return f"{self.url}{stage_path(variant)}"

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and serve; returns the entry URL. Raises OSError when the port is taken."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        bound = sock.getsockname()[1]
        self.url = f"http://{host}:{bound}"
        file_limit = raise_file_limit()
        if self.max_connections is None:
            self.max_connections = connection_budget(file_limit)
        self._client = httpx.AsyncClient(
            timeout=self._timeout,
            trust_env=False,
            limits=httpx.Limits(
                max_connections=self.max_connections, max_keepalive_connections=128
            ),
        )
        config = uvicorn.Config(
            BodyLimit(self.app, max_bytes=self.max_body_bytes),
            log_level="warning",
            access_log=False,
            timeout_keep_alive=self.keep_alive_s,
            lifespan="off",
            # A burst is accepted all at once before any connection can make room; a backlog
            # no deeper than the connection limit keeps that burst under the file limit.
            backlog=self.max_connections,
        )
        config.load()
        config.http_protocol_class = guarded_protocol(
            config.http_protocol_class,
            header_timeout_s=self.header_timeout_s,
            max_connections=self.max_connections,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="router")
        while not self._server.started:
            if self._task.done():
                await self._task  # re-raises the start-up error
                raise OSError(f"router on {self.url} stopped during start-up")
            await asyncio.sleep(0.02)
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, timeout=5.0)
        if self._client is not None:
            await self._client.aclose()

    def _refused(self, request: Request) -> Response | None:
        """A 401 in OpenAI's envelope unless generation is open or the request has a key."""
        if self.api_keys is None:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        try:
            self.api_keys.check(key.strip() if scheme.lower() == "bearer" else None)
        except InvalidApiKey as error:
            body = error.envelope().model_dump()
            return JSONResponse(body, status_code=error.status_code, headers=error.headers())
        return None

    async def _entry(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.body()
        model = _requested_model(body)
        generation = _generation(body)
        if model not in self.pools and self.pre_route is not None:
            # The pre-generation step (local.pre_route): entry or heavy stage, by the plan.
            return await self.pre_route.handle(
                body, generation, lambda v: self._forward(v, request)
            )
        variant = model if model in self.pools else self.entry_variant
        if generation is not None:  # a named stage is an arrival too (the router's rule)
            entry = self.pre_route.router.config.entry_variant if self.pre_route else None
            target = Target.ENTRY if variant == (entry or self.entry_variant) else Target.HEAVY
            self.metrics.routed(target, explored=False, images=generation.n)
        return await self._forward(variant, request)

    async def _stage(self, request: Request) -> Response:
        peer = request.client.host if request.client else ""
        if self.api_keys is not None and not _loopback(peer):
            # With keys, a stage path would be a way around them: the workers defer from here.
            return _error(403, "stage paths take this cascade's deferrals only", code="forbidden")
        variant = request.path_params["variant"]
        if variant not in self.pools:
            return _error(404, f"no stage named {variant!r}", code="unknown_stage")
        return await self._forward(variant, request)

    async def _forward(self, variant: str, request: Request) -> Response:
        assert self._client is not None
        body = await request.body()
        headers = {k: v for k in _FORWARDED_HEADERS if (v := request.headers.get(k)) is not None}
        pool = self.pools[variant]
        tried: list[str] = []
        for _ in range(2):  # a replica that went away gets one retry elsewhere
            replica = pool.pick(exclude=tried)
            if replica is None:
                break
            tried.append(replica.url)
            replica.outstanding += 1
            released = False

            def release(replica: _Replica = replica) -> None:
                nonlocal released
                if not released:
                    released = True
                    replica.outstanding -= 1

            try:
                upstream = await _unless_gone(
                    request,
                    self._client.send(
                        self._client.build_request(
                            "POST", replica.url + PATH_GENERATIONS, content=body, headers=headers
                        ),
                        stream=True,
                    ),
                )
            except _ClientGone:
                release()
                return _gone()
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                release()
                continue
            except httpx.TimeoutException:
                release()
                return _error(504, f"stage {variant} did not answer in time", code="timeout")
            except httpx.HTTPError as exc:
                release()
                return _error(502, f"stage {variant}: {exc}", code="bad_gateway")
            returned = {
                k: v for k in _RETURNED_HEADERS if (v := upstream.headers.get(k)) is not None
            }
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                # Relay events as they come: the light partial must not wait for the heavy.
                return StreamingResponse(
                    _relay(upstream, variant, release),
                    status_code=upstream.status_code,
                    headers={**returned, "Cache-Control": "no-cache"},
                    background=BackgroundTask(_close, upstream, release),
                )
            try:
                content = await _unless_gone(request, upstream.aread())
            except _ClientGone:
                return _gone()
            except httpx.HTTPError as exc:
                return _error(502, f"stage {variant}: {exc}", code="bad_gateway")
            finally:
                await upstream.aclose()
                release()
            return Response(content, status_code=upstream.status_code, headers=returned)
        return _error(503, f"no ready replica of stage {variant}", code="no_replica", retry_after=1)

    async def _models(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        cards = [ModelCard(id=v, kind="variant") for v in self.variants]
        if self.cascade is not None:
            cards.insert(0, ModelCard(id=self.cascade, kind="cascade"))
        return JSONResponse(ModelList(data=cards).model_dump())

    async def _readyz(self, request: Request) -> Response:
        ready = self.ready()
        return JSONResponse(
            {"status": "ok" if ready else "not-ready", "variant": self.entry_variant},
            status_code=200 if ready else 503,
        )

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "variant": self.entry_variant})

    async def _metrics(self, request: Request) -> Response:
        pre_route = self.pre_route
        self.metrics.publish(pre_route.router.config if pre_route else None, ready=self.ready())
        self.metrics.refresh(pre_route.router if pre_route else None)
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def _plan_route(self, request: Request) -> Response:
        return JSONResponse(self._plan())
