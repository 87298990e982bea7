"""The worker's failure taxonomy, mapped to HTTP in one place.

Service code raises these; `install_error_handlers` turns them (and FastAPI's own validation
and routing errors) into OpenAI's error envelope, so clients built for the OpenAI Images API
show the message and load balancers see a status code they understand.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffcascade_worker.protocol import HEADER_RETRY_AFTER, ErrorDetail, ErrorResponse


class WorkerError(Exception):
    """Base class: a message for the client plus an HTTP status and OpenAI error type."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param  # the request field at fault, as OpenAI names it
        self.instance_code = code or self.code

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After takes whole seconds; never advertise 0 (clients would spin).
        return {HEADER_RETRY_AFTER: str(max(1, math.ceil(self.retry_after_s)))}

    def envelope(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(
                message=self.message,
                type=self.error_type,
                param=self.param,
                code=self.instance_code,
            )
        )


class InvalidInput(WorkerError):
    """The client's request is wrong: 400, as OpenAI answers (`except openai.BadRequestError`)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ConfigRejected(WorkerError):
    """A config the worker could hold but that would make it refuse every request (400)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "config_rejected"


class PayloadTooLarge(WorkerError):
    """A request body over the worker's limit (413); a prompt needs a few KB at most."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ClientDisconnected(WorkerError):
    """The client went away before its images were done; nobody reads this answer (499)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_disconnected"


class Unauthorized(WorkerError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class InvalidApiKey(WorkerError):
    """Generation needs a client API key and the request had none or a wrong one (401, as
    api.openai.com answers: the SDK raises `AuthenticationError`)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Overloaded(WorkerError):
    """The bounded queue is full: come back later (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class DeadlineExceeded(WorkerError):
    """The request could not finish within its budget (503, dropped)."""

    status_code = 503
    error_type = "server_error"
    code = "deadline_exceeded"


class NotReady(WorkerError):
    """Loading, warming up or draining (503)."""

    status_code = 503
    error_type = "server_error"
    code = "not_ready"


class InferenceFailed(WorkerError):
    status_code = 500
    error_type = "server_error"
    code = "inference_failed"


def error_response(error: WorkerError) -> JSONResponse:
    return JSONResponse(
        status_code=error.status_code,
        content=error.envelope().model_dump(),
        headers=error.headers(),
    )


#: pydantic error types -> OpenAI error codes; anything else is `invalid_value`.
_VALIDATION_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
    "model_attributes_type": "invalid_type",
    "dict_type": "invalid_type",
}


def _param(item: Any) -> str | None:
    if item.get("type") == "json_invalid":
        return None
    location = [str(p) for p in item.get("loc", ()) if p not in ("body", "header", "query")]
    return ".".join(location) or None


def _describe(item: Any) -> str:
    param = _param(item)
    kind = item.get("type")
    message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"Unknown parameter: {param!r}."
    if kind == "json_invalid":
        return f"The request body is not valid JSON: {message}."
    return message if param is None else f"Invalid value for {param!r}: {message}"


def validation_error(exc: RequestValidationError) -> InvalidInput:
    """FastAPI's validation errors as one 400 naming the first offending parameter."""
    errors = list(exc.errors())
    if not errors:
        return InvalidInput("invalid request")
    first = errors[0]
    code = _VALIDATION_CODES.get(str(first.get("type", "")), InvalidInput.code)
    message = " ".join(_describe(item) for item in errors)
    return InvalidInput(message, param=_param(first), code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce leaves in the same envelope."""

    async def on_worker_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, WorkerError)
        return error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "unknown_url" if exc.status_code == 404 else None
        body = ErrorResponse(
            error=ErrorDetail(message=str(exc.detail), type=error_type, code=code)
        ).model_dump()
        headers: dict[str, Any] = dict(exc.headers or {})
        return JSONResponse(status_code=exc.status_code, content=body, headers=headers)

    app.add_exception_handler(WorkerError, on_worker_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


#: Documented error responses, for the OpenAPI schema of each route.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Invalid request (`param` names the field), or a config that would "
        "refuse every request",
    },
    401: {
        "model": ErrorResponse,
        "description": "Missing or wrong bearer token (the config token; for generation, a "
        "client API key when the worker requires them)",
    },
    413: {"model": ErrorResponse, "description": "Request body over the worker's limit"},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
    500: {"model": ErrorResponse, "description": "The pipeline failed"},
    503: {"model": ErrorResponse, "description": "Not ready, draining or deadline missed"},
}
