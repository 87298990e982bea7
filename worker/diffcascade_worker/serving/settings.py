"""Start-up settings of one worker process (CLI flags and environment).

Settings are fixed for the life of the process; the part the control plane may change at run
time (threshold, batch size, next stage, SLO) seeds a `protocol.CascadeConfig`, which the
service then owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from diffcascade_worker.models.assembly import PipelineAssembly
from diffcascade_worker.protocol import (
    MAX_BATCH_SIZE,
    MIN_SLO_SECONDS,
    CascadeConfig,
    check_stage_url,
)
from diffcascade_worker.serving.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_WRITE_TIMEOUT_S,
)

DEFAULT_PORT = 8000
DEFAULT_QUEUE_CAPACITY = 64
DEFAULT_SIZE = 512
DEFAULT_STEPS = 1
DEFAULT_GUIDANCE = 0.0


class WorkerSettings(BaseModel):
    """Everything one worker needs to load its variant and serve it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="Hub id or diffusers folder")
    variant: str = Field(min_length=1, max_length=128, description="Name of this stage")
    cascade: str = Field(default="default", min_length=1, max_length=128)
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    # None: the model folder's recorded default (see `resolved`), else the DEFAULT_* above.
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, ge=0.0, le=100.0)
    size: int | None = Field(default=None, ge=8, le=4096)
    device: str | None = None
    dtype: str | None = None
    #: How the pipeline is assembled (replacement UNet, scheduler, weights variant, safety
    #: checker); unset fields come from the model folder's diffcascade.json (`resolved`).
    assembly: PipelineAssembly = Field(default_factory=PipelineAssembly)
    threads: int | None = Field(default=None, ge=1, le=1024, description="torch CPU threads")
    batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    max_batch_wait_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    gate: Path | None = None
    next_stage_url: str | None = None
    #: Next-stage base URLs a config push may choose (the initial one is always allowed); a
    #: port of `*` matches any port of that host.
    allowed_next_stages: tuple[str, ...] = ()
    token: SecretStr | None = None
    insecure_no_token: bool = False
    #: Client API keys (a file, or a mounted Secret's folder); None: generation is open.
    api_keys: Path | None = None
    slo_seconds: float = Field(default=5.0, ge=MIN_SLO_SECONDS, le=3600.0)
    queue_capacity: int = Field(default=DEFAULT_QUEUE_CAPACITY, ge=1, le=100_000)
    forward_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    drain_timeout_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024, le=64 * 1024 * 1024)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=8, le=1_000_000)
    header_timeout_s: float = Field(default=DEFAULT_HEADER_TIMEOUT_S, gt=0.0, le=600.0)
    keep_alive_s: int = Field(default=DEFAULT_KEEP_ALIVE_S, ge=1, le=600)
    write_timeout_s: float = Field(default=DEFAULT_WRITE_TIMEOUT_S, gt=0.0, le=600.0)

    @field_validator("size")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"size must be a multiple of 8 px, got {value}")
        return value

    @field_validator("next_stage_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        return check_stage_url(value)

    @field_validator("allowed_next_stages")
    @classmethod
    def _allowed_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_stage_url(url) for url in value if url)

    @model_validator(mode="after")
    def _serves_something(self) -> WorkerSettings:
        if self.max_batch_wait_ms >= self.slo_seconds * 1000.0:
            raise ValueError(
                "max_batch_wait_ms must be below the SLO: every request would miss its deadline"
            )
        return self

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @property
    def size_text(self) -> str:
        """The one `size` value this worker accepts, in the OpenAI form."""
        size = DEFAULT_SIZE if self.size is None else self.size
        return f"{size}x{size}"

    def resolved(self, found: Mapping[str, Any]) -> WorkerSettings:
        """Unset run settings filled from `found` (the model folder's defaults), then DEFAULT_*."""
        steps = self.steps if self.steps is not None else found.get("steps", DEFAULT_STEPS)
        guidance = self.guidance
        if guidance is None:
            guidance = found.get("guidance_scale", DEFAULT_GUIDANCE)
        size = self.size if self.size is not None else found.get("size", DEFAULT_SIZE)
        assembly = self.assembly.over(found.get("assembly") or PipelineAssembly())
        values = {
            **self.model_dump(),
            "steps": steps,
            "guidance": guidance,
            "size": size,
            "assembly": assembly,
        }
        return WorkerSettings.model_validate(values)

    def initial_config(self) -> CascadeConfig:
        return CascadeConfig(
            threshold=self.threshold,
            batch_size=self.batch_size,
            max_batch_wait_ms=self.max_batch_wait_ms,
            next_stage_url=self.next_stage_url,
            slo_seconds=self.slo_seconds,
        )
