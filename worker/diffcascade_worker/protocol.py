"""The worker's HTTP contract, shared with the operator.

The control plane imports this module and its torch-free siblings (`deferral`: the threshold
and deferral-curve contract; `deadline`: the drop rule), so none of them may import torch or
diffusers. Paths, headers, request/response models, the config document and every
Prometheus metric name live here, defined once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# --- paths -------------------------------------------------------------------------------------

PATH_GENERATIONS = "/v1/images/generations"
PATH_MODELS = "/v1/models"
PATH_CONFIG = "/v1/cascade/config"
PATH_HEALTHZ = "/healthz"
PATH_READYZ = "/readyz"
PATH_METRICS = "/metrics"
#: The pre-generation router's plan (entry and heavy stage, router share); bearer token.
PATH_ROUTER_CONFIG = "/v1/cascade/router"

# --- headers -----------------------------------------------------------------------------------

#: Remaining time budget of a request in milliseconds. A client may set it to override the
#: worker's SLO; a stage forwarding a deferral sets it to what is left of the original budget,
#: so deadlines survive hops without relying on synchronised clocks.
HEADER_BUDGET_MS = "X-Diffcascade-Budget-Ms"
#: Set on requests forwarded by a gate, so the next stage can count deferred arrivals apart.
HEADER_DEFERRED_FROM = "X-Diffcascade-Deferred-From"
HEADER_REQUEST_ID = "X-Request-Id"
HEADER_RETRY_AFTER = "Retry-After"
#: Set by the pre-generation router on its answer: where it sent the prompt (`entry` or
#: `heavy`), the prompt's router score, and whether the prompt was an exploration sample
#: (would have gone to heavy, went through the gated entry stage to yield a label).
HEADER_ROUTED_TO = "X-Diffcascade-Routed-To"
HEADER_ROUTER_SCORE = "X-Diffcascade-Router-Score"
HEADER_ROUTER_EXPLORED = "X-Diffcascade-Router-Explored"

# --- limits ------------------------------------------------------------------------------------

MAX_PROMPT_CHARS = 4000
MAX_IMAGES_PER_REQUEST = 10
MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 256
#: Below this no batch of any model finishes: a smaller SLO would refuse every request.
MIN_SLO_SECONDS = 0.01
#: Exit code of `diffcascade-worker serve` when its drain timeout passed with images unfinished
#: (each was refused with a 503 `not_ready`); 0 means everything accepted was answered.
EXIT_DRAIN_INCOMPLETE = 3

_SIZE_RE = re.compile(r"^(\d{2,4})x(\d{2,4})$")


#: `size: auto` (OpenAI's default for GPT image models): the variant's own resolution.
SIZE_AUTO = "auto"
#: How images are encoded (the only output_format served) and their background.
OUTPUT_FORMAT = "png"
BACKGROUND = "opaque"
MAX_PARTIAL_IMAGES = 3
MAX_USER_CHARS = 256


def parse_size(size: str) -> tuple[int, int]:
    """'512x512' -> (512, 512); raises ValueError with the accepted form."""
    match = _SIZE_RE.match(size)
    if match is None:
        raise ValueError(f"size must look like '512x512', got {size!r}")
    return int(match.group(1)), int(match.group(2))


# --- generation --------------------------------------------------------------------------------


#: OpenAI's `quality` values this API serves (`standard`/`hd` are DALL-E's and refused): which
#: stage's image the client asks for. The rule is `deferral.quality_defers`.
QUALITIES = ("auto", "low", "medium", "high")

_SUPPORTED: dict[str, tuple[tuple[str, ...], str]] = {
    "quality": (
        QUALITIES,
        "'auto' lets the gate choose, 'low'/'medium' ask for the first stage's image, 'high' "
        "for the next stage's",
    ),
    "output_format": ((OUTPUT_FORMAT,), "images are encoded as PNG"),
    "background": (("auto", BACKGROUND), "diffusion images have no transparency"),
    "moderation": (("auto", "low"), "no moderation filter runs in the cascade"),
}
_REFUSED = {
    "style": "describe the style in the prompt",
    "output_compression": "it applies to jpeg and webp, and only png is served",
}


class GenerationRequest(BaseModel):
    """OpenAI Images `create` request, plus a `seed` extension.

    Every documented parameter is either honoured or refused with a 400 that names it (the
    README's worker section lists the decisions); unknown parameters are refused too.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(
        default=None, description="WIDTHxHEIGHT or 'auto'; both default to the variant's"
    )
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = Field(
        default=None,
        description="The cascade's name (default) or one variant's, to be served by it alone",
    )
    quality: str | None = Field(
        default=None,
        description="'auto' (default): the gate picks the stage per prompt; 'low' or 'medium': "
        "the first stage's image; 'high': the next stage's",
    )
    style: str | None = Field(default=None, description="Refused: describe it in the prompt")
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    safety_identifier: str | None = Field(
        default=None, max_length=MAX_USER_CHARS, description="Echoed in the response"
    )
    output_format: str | None = Field(default=None, description="Only 'png'")
    background: str | None = Field(
        default=None, description="'auto' or 'opaque': diffusion images have no alpha"
    )
    moderation: str | None = Field(
        default=None, description="'auto' or 'low'; the cascade runs no moderation filter"
    )
    output_compression: int | None = Field(
        default=None, description="Refused: only for jpeg/webp, which are not served"
    )
    stream: bool = Field(default=False, description="Server-sent image_generation.* events")
    partial_images: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="With stream: the light image goes out as a partial when the gate defers",
    )
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
        if value is not None and value != SIZE_AUTO:
            parse_size(value)
        return value

    @field_validator("quality", "output_format", "background", "moderation")
    @classmethod
    def _supported_value(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed, why = _SUPPORTED[str(info.field_name)]
        if value is not None and value not in allowed:
            listed = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{value!r} is not supported ({listed}): {why}")
        return value

    @field_validator("style", "output_compression")
    @classmethod
    def _refused(cls, value: object, info: ValidationInfo) -> object:
        if value is not None:
            name = str(info.field_name)
            raise ValueError(f"{name} is not supported: {_REFUSED[name]}")
        return value

    @property
    def identifier(self) -> str | None:
        """OpenAI's rule: a non-empty safety_identifier wins over the deprecated `user`."""
        return self.safety_identifier or self.user or None


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
    nsfw_content_detected: bool | None = Field(
        default=None,
        description="The serving stage's safety checker flagged this image, which is then "
        "black; null if no safety checker runs",
    )
    queue_ms: float
    run_ms: float
    total_ms: float


class GenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str | None = None
    output_format: Literal["png"] = "png"
    background: Literal["opaque"] = "opaque"
    safety_identifier: str | None = None


class ImageUsage(BaseModel):
    """OpenAI's token usage of an image event; diffusion counts no tokens, so all zero."""

    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(
        default_factory=lambda: {"image_tokens": 0, "text_tokens": 0}
    )
    output_tokens: int = 0
    total_tokens: int = 0


class _ImageEvent(BaseModel):
    b64_json: str
    created_at: int
    size: str
    quality: Literal["auto"] = "auto"
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png"] = "png"
    served_by: str
    seed: int
    confidence: float | None = None


class PartialImageEvent(_ImageEvent):
    """The light image of a deferred query, sent while the next stage works on it."""

    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int


class CompletedImageEvent(_ImageEvent):
    """The final image: the light one when the gate is confident, else the next stage's."""

    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: ImageUsage = Field(default_factory=ImageUsage)
    deferred: bool
    degraded: bool = False
    nsfw_content_detected: bool | None = None
    queue_ms: float
    run_ms: float
    total_ms: float
    safety_identifier: str | None = None


#: SSE event names, as OpenAI sends them (the `type` of each event's data).
EVENT_PARTIAL = "image_generation.partial_image"
EVENT_COMPLETED = "image_generation.completed"
EVENT_ERROR = "error"


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`: the cascade (its entry) or one of its variants."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "diffcascade"
    kind: Literal["cascade", "variant"] = Field(
        description="`cascade`: the entry, gated; `variant`: that stage alone"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error object: `param` names the offending request field, when there is one."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, so existing clients surface the message."""

    error: ErrorDetail


# --- cascade config ----------------------------------------------------------------------------


def check_stage_url(value: str) -> str:
    """A next-stage base URL: http(s), a host, no credentials, query or fragment.

    A `?` or `#` would let whoever sets the URL choose the path the prompt is posted to.
    """
    if not value.startswith(("http://", "https://")):
        raise ValueError("next_stage_url must start with http:// or https:// (or be empty)")
    if "?" in value or "#" in value:
        raise ValueError("next_stage_url must not have a query or a fragment")
    authority = value.split("://", 1)[1].split("/", 1)[0]
    if "@" in authority:
        raise ValueError("next_stage_url must not carry credentials")
    if not authority.split(":", 1)[0] and not authority.startswith("["):
        raise ValueError("next_stage_url needs a host")
    return value


class CascadeConfig(BaseModel):
    """What the control plane sets on a running worker (GET/PUT /v1/cascade/config)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    max_batch_wait_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    next_stage_url: str | None = None
    slo_seconds: float = Field(default=5.0, ge=MIN_SLO_SECONDS, le=3600.0)
    plan_id: str | None = Field(default=None, description="Opaque id of the plan that set this")

    @field_validator("next_stage_url")
    @classmethod
    def _stage_url(cls, value: str | None) -> str | None:
        return None if value is None else check_stage_url(value)

    @model_validator(mode="after")
    def _serves_something(self) -> CascadeConfig:
        if self.max_batch_wait_ms >= self.slo_seconds * 1000.0:
            raise ValueError(
                f"max_batch_wait_ms {self.max_batch_wait_ms:g} is not below the SLO of "
                f"{self.slo_seconds:g} s: waiting for a fuller batch would miss every deadline"
            )
        return self


class CascadeConfigUpdate(BaseModel):
    """A partial update: fields left out keep their current value."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)
    max_batch_wait_ms: float | None = Field(default=None, ge=0.0, le=10_000.0)
    next_stage_url: str | None = None
    slo_seconds: float | None = Field(default=None, ge=MIN_SLO_SECONDS, le=3600.0)
    plan_id: str | None = None

    @field_validator("next_stage_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return value if value in (None, "") else check_stage_url(value)

    def apply_to(self, config: CascadeConfig) -> CascadeConfig:
        changes = self.model_dump(exclude_unset=True)
        if changes.get("next_stage_url") == "":
            changes["next_stage_url"] = None
        return config.model_copy(update=changes)


#: The router's scorers: `learned` (hashed n-grams, trained online on the gate's confidences),
#: `rule` (HADIS's fixed feature weights) and `none` (no pre-generation routing: share 0).
RouterScorerName = Literal["learned", "rule", "none"]
MAX_EXPLORATION_SHARE = 0.5


class RouterConfig(BaseModel):
    """What the control plane sets on a pre-generation router (GET/PUT /v1/cascade/router).

    A share `router_share` of prompts, those with the highest router scores among the recent
    ones, goes straight to `heavy_url`; the rest to `entry_url` (the gated entry stage). Of
    the prompts the rule sends to heavy, a share `exploration_share` goes through the entry
    stage anyway, so the gate keeps labelling the hard region the learner is trained on.
    """

    model_config = ConfigDict(extra="forbid")

    entry_url: str = Field(description="Base URL of the plan's entry stage")
    entry_variant: str = Field(default="entry", min_length=1, max_length=128)
    heavy_url: str | None = Field(default=None, description="Base URL of the heavy stage")
    heavy_variant: str | None = Field(default=None, max_length=128)
    router_share: float = Field(default=0.0, ge=0.0, le=1.0)
    exploration_share: float = Field(default=0.05, ge=0.0, le=MAX_EXPLORATION_SHARE)
    scorer: RouterScorerName = "learned"
    plan_id: str | None = Field(default=None, description="Opaque id of the plan that set this")

    @field_validator("entry_url", "heavy_url")
    @classmethod
    def _stage_url(cls, value: str | None) -> str | None:
        return None if value is None else check_stage_url(value)

    @model_validator(mode="after")
    def _heavy_when_routing(self) -> RouterConfig:
        if self.router_share > 0 and self.heavy_url is None:
            raise ValueError(
                f"router_share {self.router_share:g} needs a heavy_url to send prompts to"
            )
        if self.router_share > 0 and self.scorer == "none":
            raise ValueError("scorer 'none' routes nothing: set router_share to 0")
        return self


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
    ABANDONED = "abandoned"  # the client disconnected first: its queued images were dropped
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
LABEL_BATCH_SIZE = "batch_size"  # BATCH_SECONDS: the executed batch's size, so latency by size
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
    "Pipeline time of one batch (generate + gate), by executed batch size.",
    (*_BASE, LABEL_BATCH_SIZE),
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

# --- the pre-generation router's series (`diffcascade-worker route`) ---------------------------

LABEL_TARGET = "target"  # `entry` or `heavy`: where the router sent the prompt
LABEL_EXPLORED = "explored"  # "true": the rule said heavy, exploration sent it to the entry
_ROUTER = (LABEL_CASCADE,)

ROUTER_ROUTED = MetricName(
    "diffcascade_router_routed_images",
    "counter",
    "Images the router sent on, by target stage and exploration (every arrival of the cascade).",
    (*_ROUTER, LABEL_TARGET, LABEL_EXPLORED),
)
ROUTER_REFUSED = MetricName(
    "diffcascade_router_refused_requests",
    "counter",
    "Requests the router answered itself with an error (bad input, overload, stage down).",
    (*_ROUTER, LABEL_OUTCOME),
)
ROUTER_LABELS = MetricName(
    "diffcascade_router_labels",
    "counter",
    "Gate confidences the learner was trained on (one per image through the gated stage).",
    _ROUTER,
)
ROUTER_AUC = MetricName(
    "diffcascade_router_prequential_auc",
    "gauge",
    "AUC of the router score for the gate's deferral, each label scored before the update.",
    _ROUTER,
)
ROUTER_BRIER = MetricName(
    "diffcascade_router_prequential_brier",
    "gauge",
    "Brier score of the predicted hardness quantile, each label scored before the update.",
    _ROUTER,
)
ROUTER_SHARE = MetricName(
    "diffcascade_router_share", "gauge", "Router share r in force (the plan's).", _ROUTER
)
ROUTER_ROUTED_SHARE = MetricName(
    "diffcascade_router_routed_share",
    "gauge",
    "Share of recent images sent straight to the heavy stage.",
    _ROUTER,
)
ROUTER_EXPLORATION_SHARE = MetricName(
    "diffcascade_router_exploration_share",
    "gauge",
    "Exploration share in force: of the prompts the rule sends to heavy, those sent to entry.",
    _ROUTER,
)
ROUTER_INFLIGHT = MetricName(
    "diffcascade_router_inflight_requests", "gauge", "Requests accepted, not answered.", _ROUTER
)
ROUTER_LATENCY_SECONDS = MetricName(
    "diffcascade_router_request_latency_seconds",
    "histogram",
    "End-to-end latency of a request through the router, by target stage.",
    (*_ROUTER, LABEL_TARGET),
)
ROUTER_READY = MetricName(
    "diffcascade_router_ready",
    "gauge",
    "1 when the router has a plan and is not draining.",
    _ROUTER,
)

ROUTER_METRICS = (
    ROUTER_ROUTED,
    ROUTER_REFUSED,
    ROUTER_LABELS,
    ROUTER_AUC,
    ROUTER_BRIER,
    ROUTER_SHARE,
    ROUTER_ROUTED_SHARE,
    ROUTER_EXPLORATION_SHARE,
    ROUTER_INFLIGHT,
    ROUTER_LATENCY_SECONDS,
    ROUTER_READY,
)

#: Upper bounds (`le`) of GATE_CONFIDENCE's buckets. The operator derives f(t) on its 201-point
#: grid from them (linear inside a bucket): every grid point up to 0.05, where light gates pile
#: their confidences (SD-Turbo's 10th percentile is 0.0025), then 0.025 wide. On the bundled
#: reference scores the derived curve is within 0.011 of the exact one (tested against 0.02).
GATE_CONFIDENCE_BUCKETS: tuple[float, ...] = tuple(
    [round(0.005 * k, 3) for k in range(1, 11)] + [round(0.05 + 0.025 * k, 3) for k in range(1, 39)]
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
