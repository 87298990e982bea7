"""HTTP routes of a worker: translate requests into `WorkerService` calls, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from diffcascade_worker import __name__ as _package
from diffcascade_worker.errors import ERROR_RESPONSES, install_error_handlers
from diffcascade_worker.metrics import CONTENT_TYPE_LATEST
from diffcascade_worker.protocol import (
    HEADER_BUDGET_MS,
    HEADER_REQUEST_ID,
    PATH_CONFIG,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_READYZ,
    CascadeConfig,
    CascadeConfigUpdate,
    GenerationRequest,
    GenerationResponse,
    HealthStatus,
)
from diffcascade_worker.service import WorkerService, parse_budget_ms
from diffcascade_worker.settings import WorkerSettings

_bearer = HTTPBearer(auto_error=False, description="The worker's config token")


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

    @app.post(
        PATH_GENERATIONS,
        response_model=GenerationResponse,
        responses=_errors(422, 429, 500, 503),
        summary="Generate images (OpenAI Images API shape)",
    )
    async def create_images(
        body: GenerationRequest,
        budget_ms: Annotated[
            str | None,
            Header(
                alias=HEADER_BUDGET_MS,
                description="Time budget in ms; defaults to the worker's SLO",
            ),
        ] = None,
        request_id: Annotated[str | None, Header(alias=HEADER_REQUEST_ID, max_length=200)] = None,
    ) -> Response:
        result = await service.generate(
            body, budget_ms=parse_budget_ms(budget_ms), request_id=request_id
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
        responses=_errors(401, 422),
        dependencies=[Depends(authorized)],
        summary="Change threshold, batching, next stage or SLO without a restart",
    )
    async def put_config(update: CascadeConfigUpdate) -> CascadeConfig:
        return service.update_config(update)

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

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffcascade")
    except PackageNotFoundError:
        return f"{_package}-dev"
