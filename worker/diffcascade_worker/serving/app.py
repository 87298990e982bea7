"""HTTP routes of a worker: translate requests into `WorkerService` calls, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from diffcascade_worker import __name__ as _package
from diffcascade_worker.protocol import (
    HEADER_BUDGET_MS,
    HEADER_DEFERRED_FROM,
    HEADER_REQUEST_ID,
    PATH_CONFIG,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_MODELS,
    PATH_READYZ,
    CascadeConfig,
    CascadeConfigUpdate,
    GenerationRequest,
    GenerationResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)
from diffcascade_worker.serving.errors import ERROR_RESPONSES, install_error_handlers
from diffcascade_worker.serving.metrics import CONTENT_TYPE_LATEST
from diffcascade_worker.serving.service import WorkerService, parse_budget_ms
from diffcascade_worker.serving.settings import WorkerSettings
from diffcascade_worker.serving.streaming import SSE_MEDIA_TYPE, stream_generation

_bearer = HTTPBearer(auto_error=False, description="The worker's config token")
_client_key = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="A client API key, when the worker requires them (--api-keys)",
)


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: dict(ERROR_RESPONSES[code]) for code in codes}


def create_app(target: WorkerSettings | WorkerService) -> FastAPI:
    """The worker's FastAPI app; its lifespan loads the model in the background and drains."""
    service = target if isinstance(target, WorkerService) else WorkerService(target)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.begin_drain()
            await service.wait_idle(service.settings.drain_timeout_s)
            await service.close()

    app = FastAPI(
        title="diffcascade worker",
        summary=f"Variant {service.settings.variant} of cascade {service.settings.cascade}",
        description="OpenAI-style image generation with an in-pod difficulty gate.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)

    def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        service.authorize(None if credentials is None else credentials.credentials)

    def client_authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_client_key)],
    ) -> str | None:
        """The client's API key once accepted (None: none sent, generation is open)."""
        key = None if credentials is None else credentials.credentials
        service.authorize_client(key)
        return key

    @app.post(
        PATH_GENERATIONS,
        response_model=GenerationResponse,
        responses={
            **_errors(400, 401, 413, 429, 500, 503),
            200: {
                "content": {SSE_MEDIA_TYPE: {}},
                "description": "The images; with `stream: true`, image_generation.* events",
            },
        },
        summary="Generate images (OpenAI Images API shape)",
    )
    async def create_images(
        request: Request,
        body: GenerationRequest,
        budget_ms: Annotated[
            str | None,
            Header(
                alias=HEADER_BUDGET_MS,
                description="Time budget in ms; defaults to the worker's SLO",
            ),
        ] = None,
        request_id: Annotated[str | None, Header(alias=HEADER_REQUEST_ID, max_length=200)] = None,
        deferred_from: Annotated[
            str | None,
            Header(
                alias=HEADER_DEFERRED_FROM, max_length=200, description="Set by a deferring stage"
            ),
        ] = None,
        # A default, not `Annotated`: the annotations are strings, resolved in the module's
        # namespace, where this closure is not.
        api_key: str | None = Depends(client_authorized),
    ) -> Response:
        budget = parse_budget_ms(budget_ms)
        if body.stream:
            return await stream_generation(
                service,
                body,
                budget_ms=budget,
                request_id=request_id,
                deferred_from=deferred_from,
                disconnected=lambda: _until_disconnected(request),
                api_key=api_key,
            )
        result = await service.generate(
            body,
            budget_ms=budget,
            request_id=request_id,
            deferred_from=deferred_from,
            disconnected=lambda: _until_disconnected(request),
            api_key=api_key,
        )
        # Already a validated model: serialise once, skip FastAPI's re-validation.
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get(
        PATH_CONFIG,
        response_model=CascadeConfig,
        responses=_errors(401),
        dependencies=[Depends(authorized)],
        summary="The cascade config in force",
    )
    async def get_config() -> CascadeConfig:
        return service.config

    @app.put(
        PATH_CONFIG,
        response_model=CascadeConfig,
        responses=_errors(400, 401),
        dependencies=[Depends(authorized)],
        summary="Change threshold, batching, next stage or SLO without a restart",
    )
    async def put_config(update: CascadeConfigUpdate) -> CascadeConfig:
        return service.update_config(update)

    @app.get(
        PATH_MODELS,
        response_model=ModelList,
        responses=_errors(401),
        dependencies=[Depends(client_authorized)],
        summary="The cascade and this variant",
    )
    async def models() -> ModelList:
        settings = service.settings
        cards = [ModelCard(id=settings.cascade, kind="cascade")]
        if settings.variant != settings.cascade:
            cards.append(ModelCard(id=settings.variant, kind="variant"))
        return ModelList(data=cards)

    @app.get(PATH_HEALTHZ, response_model=HealthStatus, summary="Alive")
    async def healthz() -> HealthStatus:
        return service.health()

    @app.get(
        PATH_READYZ,
        response_model=HealthStatus,
        responses={503: {"model": HealthStatus, "description": "Loading or draining"}},
        summary="Loaded, warmed up and not draining",
    )
    async def readyz() -> JSONResponse:
        ready, status = service.readiness()
        return JSONResponse(status_code=200 if ready else 503, content=status.model_dump())

    @app.get(
        PATH_METRICS,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus"}},
        summary="Prometheus metrics",
    )
    async def metrics(_request: Request) -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    _without_fastapi_422(app)
    return app


def _without_fastapi_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with input; this worker answers 400 instead."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _until_disconnected(request: Request) -> None:
    """Returns once the client's connection is gone (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffcascade")
    except PackageNotFoundError:
        return f"{_package}-dev"
