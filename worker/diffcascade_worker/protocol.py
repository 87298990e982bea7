"""The worker's HTTP contract, shared with the operator.

This module is the only part of the worker the control plane imports, so it must not import
torch or diffusers. Paths, headers, request/response models, the config document and every
Prometheus metric name live here, defined once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- paths -------------------------------------------------------------------------------------

PATH_GENERATIONS = "/v1/images/generations"
PATH_CONFIG = "/v1/cascade/config"
PATH_HEALTHZ = "/healthz"
PATH_READYZ = "/readyz"
PATH_METRICS = "/metrics"

# --- headers -----------------------------------------------------------------------------------

#: Remaining time budget of a request in milliseconds. A client may set it to override the
#: worker's SLO; a stage forwarding a deferral sets it to what is left of the original budget,
#: so deadlines survive hops without relying on synchronised clocks.
HEADER_BUDGET_MS = "X-Diffcascade-Budget-Ms"
#: Set on requests forwarded by a gate, so the next stage can count deferred arrivals apart.
HEADER_DEFERRED_FROM = "X-Diffcascade-Deferred-From"
HEADER_REQUEST_ID = "X-Request-Id"
HEADER_RETRY_AFTER = "Retry-After"

# --- limits ------------------------------------------------------------------------------------

MAX_PROMPT_CHARS = 4000
MAX_IMAGES_PER_REQUEST = 10
MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 256
THRESHOLD_GRID_POINTS = 201  # t = 0, 0.005, ..., 1.0: the grid the allocator and calibration share

_SIZE_RE = re.compile(r"^(\d{2,4})x(\d{2,4})$")


def parse_size(size: str) -> tuple[int, int]:
    """'512x512' -> (512, 512); raises ValueError with the accepted form."""
    match = _SIZE_RE.match(size)
    if match is None:
        raise ValueError(f"size must look like '512x512', got {size!r}")
    return int(match.group(1)), int(match.group(2))


# --- generation --------------------------------------------------------------------------------


class GenerationRequest(BaseModel):
    """OpenAI Images `create` request, plus a `seed` extension."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(default=None, description="WIDTHxHEIGHT; defaults to the worker's")
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = Field(default=None, description="Accepted for client compatibility")
    quality: str | None = Field(default=None, description="Accepted for client compatibility")
    style: str | None = Field(default=None, description="Accepted for client compatibility")
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value


class ImageData(BaseModel):
    """One generated image with the cascade's metadata about how it was produced."""

    b64_json: str
    revised_prompt: str | None = None
    seed: int
    served_by: str = Field(description="Variant whose image this is")
    confidence: float | None = Field(
        default=None, description="Gate confidence of the first stage's image; null if no gate"
    )
    deferred: bool = Field(description="The gate sent this query to the next stage")
    degraded: bool = Field(
        default=False, description="A deferral failed or would miss the deadline: light image"
    )
    queue_ms: float
    run_ms: float
    total_ms: float


class GenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, so existing clients surface the message."""

    error: ErrorDetail


# --- cascade config ----------------------------------------------------------------------------


class CascadeConfig(BaseModel):
    """What the control plane sets on a running worker (GET/PUT /v1/cascade/config)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    max_batch_wait_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    next_stage_url: str | None = None
    slo_seconds: float = Field(default=5.0, gt=0.0, le=3600.0)
    plan_id: str | None = Field(default=None, description="Opaque id of the plan that set this")


class CascadeConfigUpdate(BaseModel):
    """A partial update: fields left out keep their current value."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)
    max_batch_wait_ms: float | None = Field(default=None, ge=0.0, le=10_000.0)
    next_stage_url: str | None = None
    slo_seconds: float | None = Field(default=None, gt=0.0, le=3600.0)
    plan_id: str | None = None

    @field_validator("next_stage_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and value != "" and not value.startswith(("http://", "https://")):
            raise ValueError("next_stage_url must start with http:// or https:// (or be empty)")
        return value

    def apply_to(self, config: CascadeConfig) -> CascadeConfig:
        changes = self.model_dump(exclude_unset=True)
        if changes.get("next_stage_url") == "":
            changes["next_stage_url"] = None
        return config.model_copy(update=changes)


class HealthStatus(BaseModel):
    status: Literal["ok", "not-ready", "draining"]
    variant: str
    detail: str | None = None


# --- metrics -----------------------------------------------------------------------------------


class Outcome(StrEnum):
    """How a request left a worker; the `outcome` label of COMPLETIONS."""

    SERVED = "served"  # this stage's image was returned
    DEFERRED = "deferred"  # the next stage's image was returned
    DEGRADED = "degraded"  # a deferral failed or would miss the deadline: this stage's image
    DROPPED = "dropped"  # could not finish by its deadline: 503 at dequeue
    REJECTED = "rejected"  # queue full or draining: 429/503 at admission
    FAILED = "failed"  # the pipeline raised


MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricName:
    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...]

    @property
    def exposed(self) -> str:
        """The series name as scraped (prometheus_client appends `_total` to counters)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


LABEL_CASCADE = "cascade"
LABEL_VARIANT = "variant"
LABEL_OUTCOME = "outcome"
_BASE = (LABEL_CASCADE, LABEL_VARIANT)

ARRIVALS = MetricName(
    "diffcascade_arrived_requests",
    "counter",
    "Generation requests admitted or refused at intake.",
    _BASE,
)
COMPLETIONS = MetricName(
    "diffcascade_completed_requests",
    "counter",
    "Requests that left the worker, by outcome.",
    (*_BASE, LABEL_OUTCOME),
)
LATENCY_SECONDS = MetricName(
    "diffcascade_request_latency_seconds",
    "histogram",
    "End-to-end latency of a request at this worker.",
    _BASE,
)
QUEUE_SECONDS = MetricName(
    "diffcascade_queue_wait_seconds",
    "histogram",
    "Time a request waited before its batch started.",
    _BASE,
)
BATCH_SECONDS = MetricName(
    "diffcascade_batch_latency_seconds",
    "histogram",
    "Pipeline time of one batch (generate + gate).",
    _BASE,
)
QUEUE_DEPTH = MetricName(
    "diffcascade_queue_depth", "gauge", "Images waiting for a batch (not yet running).", _BASE
)
INFLIGHT = MetricName(
    "diffcascade_inflight_requests", "gauge", "Requests admitted, not done.", _BASE
)
BATCH_SIZE = MetricName("diffcascade_batch_size", "histogram", "Images per executed batch.", _BASE)
GATE_CONFIDENCE = MetricName(
    "diffcascade_gate_confidence", "histogram", "Gate confidence of each first-stage image.", _BASE
)
THRESHOLD = MetricName("diffcascade_threshold", "gauge", "Deferral threshold in force.", _BASE)
CONFIGURED_BATCH_SIZE = MetricName(
    "diffcascade_configured_batch_size", "gauge", "Maximum batch size in force.", _BASE
)
READY = MetricName(
    "diffcascade_ready", "gauge", "1 when loaded, warmed up and not draining.", _BASE
)

ALL_METRICS = (
    ARRIVALS,
    COMPLETIONS,
    LATENCY_SECONDS,
    QUEUE_SECONDS,
    BATCH_SECONDS,
    QUEUE_DEPTH,
    INFLIGHT,
    BATCH_SIZE,
    GATE_CONFIDENCE,
    THRESHOLD,
    CONFIGURED_BATCH_SIZE,
    READY,
)
