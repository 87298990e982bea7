"""The router's own failures, in the worker's taxonomy (`serving.errors`), so one handler maps
both to OpenAI's error envelope. A stage's own error answer is relayed unchanged instead."""

from __future__ import annotations

from diffcascade_worker.serving.errors import WorkerError


class StageUnavailable(WorkerError):
    """The chosen stage cannot be reached (no endpoint, connection refused): retry (503)."""

    status_code = 503
    error_type = "server_error"
    code = "stage_unavailable"


class BadGateway(WorkerError):
    """The stage broke the connection or answered nonsense (502)."""

    status_code = 502
    error_type = "server_error"
    code = "bad_gateway"


class GatewayTimeout(WorkerError):
    """The stage did not answer within the router's forward timeout (504)."""

    status_code = 504
    error_type = "server_error"
    code = "stage_timeout"
