"""HTTP routes of the pre-generation router: translate requests into `RouterService` calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from diffcascade_worker.protocol import (
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_MODELS,
    PATH_READYZ,
    PATH_ROUTER_CONFIG,
    GenerationRequest,
    GenerationResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    RouterConfig,
)
from diffcascade_worker.routing.service import RouterService
from diffcascade_worker.serving.errors import ERROR_RESPONSES, install_error_handlers

_bearer = HTTPBearer(auto_error=False, description="The router's config token")
_client_key = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="A client API key, when the router requires them (--api-keys)",
)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: dict(ERROR_RESPONSES.get(code, {"description": "Stage error"})) for code in codes}


def create_router_app(service: RouterService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await service.drain()
            await service.close()

    app = FastAPI(
        title="diffcascade router",
        summary=f"Pre-generation router of cascade {service.settings.cascade}",
        description="Scores each prompt and sends it to the plan's entry or heavy stage.",
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
    ) -> None:
        # Before the request is validated or routed: a refused request reaches no stage and
        # is no arrival (the demand the operator scales for).
        service.authorize_client(None if credentials is None else credentials.credentials)

    @app.post(
        PATH_GENERATIONS,
        response_model=GenerationResponse,
        dependencies=[Depends(client_authorized)],
        responses=_errors(400, 401, 413, 429, 500, 503),
        summary="Generate images: routed to the entry or heavy stage, answered unchanged",
    )
    async def create_images(request: Request, body: GenerationRequest) -> Response:
        raw = await request.body()  # forwarded as sent: the stage sees the client's request
        return await service.generate(
            body=raw,
            prompt=body.prompt,
            model=body.model,
            images=body.n,
            headers={k.lower(): v for k, v in request.headers.items()},
            disconnected=lambda: _until_disconnected(request),
        )

    @app.get(
        PATH_ROUTER_CONFIG,
        response_model=RouterConfig,
        responses={**_errors(401), 404: {"description": "No plan yet"}},
        dependencies=[Depends(authorized)],
        summary="The router config in force",
    )
    async def get_config() -> Response:
        config = service.config
        if config is None:
            return JSONResponse({"detail": "no plan yet"}, status_code=404)
        return Response(config.model_dump_json(), media_type="application/json")

    @app.put(
        PATH_ROUTER_CONFIG,
        response_model=RouterConfig,
        responses=_errors(400, 401),
        dependencies=[Depends(authorized)],
        summary="Set entry stage, heavy stage, router share, exploration and scorer",
    )
    async def put_config(config: RouterConfig) -> RouterConfig:
        return service.update_config(config)

    @app.get(
        PATH_MODELS,
        response_model=ModelList,
        responses=_errors(401),
        dependencies=[Depends(client_authorized)],
        summary="The cascade",
    )
    async def models() -> ModelList:
        cards = [ModelCard(id=service.settings.cascade, kind="cascade")]
        config = service.config
        if config is not None:
            names = [config.entry_variant, config.heavy_variant]
            cards += [ModelCard(id=n, kind="variant") for n in names if n]
        return ModelList(data=cards)

    @app.get(PATH_HEALTHZ, response_model=HealthStatus, summary="Alive")
    async def healthz() -> HealthStatus:
        return service.health()

    @app.get(PATH_READYZ, response_model=HealthStatus, summary="Has a plan, not draining")
    async def readyz() -> JSONResponse:
        ready, status = service.readiness()
        return JSONResponse(status_code=200 if ready else 503, content=status.model_dump())

    @app.get(PATH_METRICS, response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        service.refresh_metrics()
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _until_disconnected(request: Request) -> None:
    """Returns once the client's connection is gone (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
