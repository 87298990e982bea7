"""The DiffusionCascade spec as pydantic models: the one place its rules are checked.

The CRD (crds/diffusioncascade.yaml) enforces shape and simple bounds at admission; these
models re-check everything, including the cross-field rules, so the operator, `diffcascade up`
and the simulator reject a bad cascade with the same message.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from diffcascade_worker.deferral import DeferCurveError, validate_curve
from diffcascade_worker.models.assembly import WEIGHTS_VARIANT, PipelineAssembly, SchedulerChoice
from diffcascade_worker.protocol import MAX_EXPLORATION_SHARE, RouterScorerName
from diffcascade_worker.storage.uris import StorageError, parse_uri
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "diffcascade.dev"
API_VERSION = "v1alpha1"
KIND = "DiffusionCascade"
PLURAL = "diffusioncascades"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: A cascade's name starts its Services' names, which must be DNS-1035 labels (a letter first,
#: no dots), and is a label value of every child (at most 63 characters).
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: `<cascade>-<variant>` names a Deployment, Service, PDB and NetworkPolicy: a DNS label.
MAX_CHILD_NAME = 63

#: A batch latency outside these bounds (ms) is a unit or typing error, not a measurement;
#: beyond them the solver's arithmetic also loses the precision it needs.
MIN_BATCH_LATENCY_MS = 0.01
MAX_BATCH_LATENCY_MS = 3_600_000.0
#: Replicas of one variant: far above any real cascade, far below int32 (a Deployment's
#: replicas), so a plan never asks the apiserver (or `up`) for an absurd count.
MAX_REPLICAS = 10_000


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes style), snake_case in Python; unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Objective(StrEnum):
    MIN_EXPECTED_FID = "MinExpectedFID"  # ours: minimise FID at the chosen light share
    MAX_THRESHOLD = "MaxThreshold"  # the paper's: the highest threshold that fits


def _storage_uri(value: str, *, model: bool = False) -> str:
    try:
        parse_uri(value, bare_hub_ids=model)
    except StorageError as error:
        raise ValueError(str(error)) from None
    return value


class DeferCurveSpec(_Model):
    """f(t): the fraction of queries the gate defers at threshold t.

    Either inline points (as written by `diffcascade-worker gate calibrate`) or the name of a
    reference curve bundled with diffcascade (e.g. `sd-turbo`, from the DiffServe artifact).
    """

    thresholds: list[float] | None = None
    defer_fractions: list[float] | None = None
    reference: str | None = None
    path: str | None = Field(
        default=None,
        description="A calibration file read by the controller: a path, or an http(s):// or "
        "s3:// URI the operator fetches",
    )

    @field_validator("path")
    @classmethod
    def _path_uri(cls, value: str | None) -> str | None:
        return None if value is None else _storage_uri(value)

    @model_validator(mode="after")
    def _one_source(self) -> DeferCurveSpec:
        inline = self.thresholds is not None or self.defer_fractions is not None
        sources = int(inline) + int(self.reference is not None) + int(self.path is not None)
        if sources != 1:
            raise ValueError(
                "deferCurve needs exactly one of thresholds+deferFractions, reference or path"
            )
        if inline:
            # The contract's one validator (`deferral.validate_curve`), as profiles use it.
            try:
                validate_curve(
                    self.thresholds or [], self.defer_fractions or [], where="deferCurve"
                )
            except DeferCurveError as exc:
                raise ValueError(str(exc)) from None
        return self


class DiscriminatorSpec(_Model):
    uri: str = Field(
        min_length=1,
        description="Storage URI (hf://, pvc://, http(s)://, s3://) or a path in the worker pod",
    )
    # clip-score: a CLIP model folder, no training (the confidence is the CLIP score).
    architecture: Literal["tiny-cnn", "efficientnet_v2_s", "clip-score"] = "tiny-cnn"

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _storage_uri(value)


class GateSpec(_Model):
    discriminator: DiscriminatorSpec | None = None
    defer_curve: DeferCurveSpec | None = None


class ProfileSpec(_Model):
    """Measured mean latency of one batch, by batch size (keys are strings in YAML).

    With `auto`, the operator measures the table (and a gated variant's f(t)) itself, with a
    profiling Job on the variant's nodes, before the first plan; the measurement replaces a
    table (and deferCurve) written beside `auto`, which serve the simulator and local mode.
    """

    batch_latency_ms: dict[int, float] | None = None
    startup_seconds: float = Field(default=0.0, ge=0.0, le=86_400.0)
    auto: bool = False
    batch_sizes: list[Annotated[int, Field(ge=1, le=256)]] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Batch sizes the profiling Job measures (default 1, 2, 4, 8, 16)",
    )

    @field_validator("batch_latency_ms")
    @classmethod
    def _positive(cls, table: dict[int, float] | None) -> dict[int, float] | None:
        if table is None:
            return None
        if not table:
            raise ValueError("profile.batchLatencyMs needs at least one batch size")
        for size, ms in table.items():
            if size < 1 or not MIN_BATCH_LATENCY_MS <= ms <= MAX_BATCH_LATENCY_MS:
                raise ValueError(
                    f"profile.batchLatencyMs[{size}]={ms}: sizes >= 1, ms > 0 (a finite number "
                    f"from {MIN_BATCH_LATENCY_MS:g} to {MAX_BATCH_LATENCY_MS:.0f})"
                )
        return dict(sorted(table.items()))

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, sizes: list[int] | None) -> list[int] | None:
        return sorted(set(sizes)) if sizes is not None else None

    @model_validator(mode="after")
    def _table_or_auto(self) -> ProfileSpec:
        if self.batch_latency_ms is None and not self.auto:
            raise ValueError("profile needs batchLatencyMs, or auto: true to measure it")
        return self


class VariantSpec(_Model):
    name: str = Field(min_length=1, max_length=40)
    model: str = Field(
        min_length=1,
        description="Storage URI (hf://, pvc://, http(s)://, s3://), hub id, or a path in the pod",
    )
    steps: int = Field(default=1, ge=1, le=1000)
    guidance_scale: float = Field(default=0.0, ge=0.0, le=50.0)
    resolution: int = Field(default=512, ge=32, le=2048, multiple_of=8)
    profile: ProfileSpec
    gate: GateSpec | None = None
    min_replicas: int = Field(default=0, ge=0, le=MAX_REPLICAS)
    max_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    max_batch_size: int = Field(default=32, ge=1, le=256)
    gpus_per_replica: int = Field(default=1, ge=0, le=16)
    image: str | None = None
    resources: dict[str, Any] | None = None
    env: list[dict[str, Any]] | None = None
    node_selector: dict[str, str] | None = Field(default=None, max_length=64)
    tolerations: list[dict[str, Any]] | None = Field(default=None, max_length=64)
    # How the pipeline is assembled (diffcascade_worker.models.assembly, the one definition).
    unet: str | None = Field(
        default=None,
        min_length=1,
        description="Replacement UNet (or transformer) of the model's pipeline: a storage URI "
        "of a diffusers state-dict file (e.g. one SDXL-Lightning UNet file) or model folder",
    )
    scheduler: SchedulerChoice | None = None
    weights_variant: str | None = Field(
        default=None,
        pattern=WEIGHTS_VARIANT,
        description="Weights file variant to fetch and load, e.g. fp16 (half the download)",
    )
    safety_checker: bool = Field(
        default=False,
        description="Run the pipeline's safety checker; a flagged image is marked in the response",
    )

    @field_validator("model")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        return _storage_uri(value, model=True)

    @field_validator("unet")
    @classmethod
    def _unet_uri(cls, value: str | None) -> str | None:
        return None if value is None else _storage_uri(value)

    def assembly(self, *, unet: str | None = None) -> PipelineAssembly:
        """The worker's assembly fields; `unet` replaces the URI (the driver's local path).
        safetyChecker false is the worker's default (off), so it is left unsaid."""
        return PipelineAssembly(
            unet=unet if unet is not None else self.unet,
            scheduler=self.scheduler,
            weights_variant=self.weights_variant,
            safety_checker=True if self.safety_checker else None,
        )

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(
                f"variant name {value!r} must be a DNS label (lowercase letters, digits, '-')"
            )
        return value

    @model_validator(mode="after")
    def _bounds(self) -> VariantSpec:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"variant {self.name}: maxReplicas < minReplicas")
        if self.gpus_per_replica == 0 and self.max_replicas is None:
            # Such replicas count nothing against gpuBudget: only maxReplicas bounds them.
            raise ValueError(
                f"variant {self.name}: gpusPerReplica 0 needs maxReplicas (gpuBudget does not "
                "bound replicas that count no GPUs)"
            )
        return self


class FidPoint(_Model):
    light_share: float = Field(ge=0.0, le=1.0)
    fid: float = Field(gt=0.0, allow_inf_nan=False)


class QualitySpec(_Model):
    """Offline-profiled FID of the cascade's output by the share served by the light model."""

    fid_by_light_share: list[FidPoint] | None = None
    reference: str | None = Field(default=None, description="Bundled curve name, e.g. c1")

    @model_validator(mode="after")
    def _one_source(self) -> QualitySpec:
        if (self.fid_by_light_share is None) == (self.reference is None):
            raise ValueError("quality needs either fidByLightShare or reference")
        if self.fid_by_light_share is not None and len(self.fid_by_light_share) < 2:
            raise ValueError("quality.fidByLightShare needs at least two points")
        return self


class QualityRowSpec(_Model):
    """One measured hybrid configuration: pair, router share r, escalation share c, FID."""

    light: str = Field(min_length=1, max_length=40)
    heavy: str = Field(min_length=1, max_length=40)
    router_share: float = Field(ge=0.0, le=1.0)
    escalate_share: float = Field(ge=0.0, le=1.0)
    fid: float = Field(gt=0.0)


class QualityTableSpec(_Model):
    """Measured quality of hybrid configurations (pair, r, c -> FID), e.g. HADIS's table.

    Either inline rows or the name of a bundled table (`hadis-hybrid`, `hadis-fixed13`,
    `hadis-disc-only`, `hadis-router-only`). r and c are shares (percentiles of the router
    scores and of the light model's confidences), as in HADIS.
    """

    rows: list[QualityRowSpec] | None = Field(default=None, min_length=1, max_length=4096)
    reference: str | None = Field(default=None, description="Bundled table, e.g. hadis-hybrid")

    @model_validator(mode="after")
    def _one_source(self) -> QualityTableSpec:
        if (self.rows is None) == (self.reference is None):
            raise ValueError("qualityTable needs either rows or reference")
        return self


#: The exploration share a learning router keeps by default (labels keep coming).
DEFAULT_EXPLORATION_SHARE = 0.05


class RouterSpec(_Model):
    """The pre-generation router: which scorer ranks prompts by difficulty, and how.

    `scorer`: `rule` (HADIS's fixed-weight rule), `learned` (hashed n-grams trained online on
    the gate's confidences) or `none`. `reference`: bundled per-prompt scores of the reference
    prompts (e.g. `hadis-rule`), what the simulator routes by; with it and no scorer the
    scorer is the rule. `explorationShare`: of the prompts the router would send straight to
    the heavy stage, the share it sends through the gated entry stage anyway so the learner
    keeps getting labels (default 0.05 for `learned`, 0 otherwise); the planner charges the
    entry stage for them.
    """

    scorer: RouterScorerName | None = None
    reference: str | None = Field(
        default=None,
        min_length=1,
        description="Bundled per-prompt scores, e.g. hadis-rule (HADIS's rule)",
    )
    exploration_share: float | None = Field(default=None, ge=0.0, le=MAX_EXPLORATION_SHARE)

    @model_validator(mode="after")
    def _scorer_or_reference(self) -> RouterSpec:
        if self.scorer is None and self.reference is None:
            raise ValueError("router needs a scorer (rule, learned, none) or a reference")
        if self.scorer == "none" and self.exploration_share:
            raise ValueError("router.explorationShare needs a scorer: 'none' routes nothing")
        return self

    def effective_scorer(self) -> RouterScorerName:
        if self.scorer is not None:
            return self.scorer
        return "rule"  # a reference names per-prompt scores of the rule

    def effective_exploration(self) -> float:
        if self.exploration_share is not None:
            return self.exploration_share
        return DEFAULT_EXPLORATION_SHARE if self.effective_scorer() == "learned" else 0.0

    def routes(self) -> bool:
        """Whether plans may send a share of prompts straight to the heavy stage."""
        return self.effective_scorer() != "none"


class ControlSpec(_Model):
    interval_seconds: float = Field(default=5.0, ge=0.1, le=3600.0)
    headroom: float = Field(default=1.05, ge=1.0, le=10.0)
    ewma_alpha: float = Field(default=0.3, gt=0.0, le=1.0)
    trend_horizon_seconds: float = Field(default=10.0, ge=0.0, le=600.0)
    scale_down_stabilization_seconds: float = Field(default=30.0, ge=0.0, le=3600.0)
    prometheus_url: str | None = None
    max_batch_wait_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    paused: bool = False


_OBJECT_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class StorageSpec(_Model):
    """Where pods keep fetched models and what they fetch with (KServe-style storage)."""

    cache_claim_name: str | None = Field(
        default=None,
        pattern=_OBJECT_NAME,
        description="PVC holding the model cache (default: the operator's, else an emptyDir)",
    )
    cache_size_limit: str | None = Field(
        default=None, description="sizeLimit of the emptyDir cache, e.g. 40Gi"
    )
    secret_name: str | None = Field(
        default=None,
        pattern=_OBJECT_NAME,
        description="Secret with HF_TOKEN and/or AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY",
    )
    s3_endpoint: str | None = Field(
        default=None, pattern=r"^https?://", description="S3-compatible endpoint URL (default AWS)"
    )
    s3_region: str | None = None


class ApiKeysSpec(_Model):
    """Client API keys the cascade requires (off when the spec has none); who checks them:
    `worker_config.checks_api_keys`."""

    secret_name: str = Field(
        pattern=_OBJECT_NAME,
        max_length=253,
        description="Secret whose every key holds client API keys, one per line",
    )


class CascadeSpec(_Model):
    slo_seconds: float = Field(gt=0.0, le=3600.0)
    gpu_budget: int = Field(ge=1, le=100_000)
    objective: Objective = Objective.MIN_EXPECTED_FID
    variants: list[VariantSpec] = Field(min_length=1, max_length=8)
    quality: QualitySpec | None = None
    quality_table: QualityTableSpec | None = None
    router: RouterSpec | None = None
    control: ControlSpec = ControlSpec()
    worker_image: str | None = None
    storage: StorageSpec | None = None
    simulator_only: bool = Field(
        default=False,
        description="Only for `diffcascade simulate`: its stages may defer without a gate "
        "(reference curves); the operator and `diffcascade up` refuse it",
    )
    api_keys: ApiKeysSpec | None = None

    @model_validator(mode="after")
    def _cascade_rules(self) -> CascadeSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        for variant in self.variants[:-1]:
            gate = variant.gate
            measured = gate is not None and gate.discriminator is not None and variant.profile.auto
            if (gate is None or gate.defer_curve is None) and not measured:
                raise ValueError(
                    f"variant {variant.name} defers to a later stage and needs gate.deferCurve"
                    " (or gate.discriminator with profile.auto to measure it)"
                )
        if not self.simulator_only:
            for variant in self.variants:
                gate = variant.gate
                if gate is not None and gate.discriminator is not None:
                    continue
                defers = variant is not self.variants[-1]
                if defers or (gate is not None and gate.defer_curve is not None):
                    raise ValueError(
                        f"variant {variant.name} has no gate.discriminator: its workers would "
                        "never defer while the plan counts on its deferCurve; give it a gate "
                        "(clip-score needs no training), or mark the cascade simulatorOnly to "
                        "only simulate it"
                    )
        floor = sum(v.min_replicas * v.gpus_per_replica for v in self.variants)
        if floor > self.gpu_budget:
            raise ValueError(f"minReplicas need {floor} GPUs, above gpuBudget {self.gpu_budget}")
        order = {name: i for i, name in enumerate(names)}
        for row in (self.quality_table.rows or []) if self.quality_table is not None else []:
            if row.light not in order or row.heavy not in order:
                raise ValueError(
                    "qualityTable rows must name variants of spec.variants "
                    f"({row.light} -> {row.heavy})"
                )
            if order[row.light] >= order[row.heavy]:
                raise ValueError(
                    "a qualityTable row's light variant must come before its heavy one in "
                    f"spec.variants ({row.light} -> {row.heavy})"
                )
        return self


class InvalidSpec(ValueError):
    """A cascade spec that cannot be used; the message names every problem."""


def parse_spec(raw: dict[str, Any]) -> CascadeSpec:
    """Validate a spec dict (as found in the custom resource) or raise InvalidSpec."""
    try:
        return CascadeSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidSpec(problems) from None


def check_deployable(spec: CascadeSpec) -> None:
    """InvalidSpec for a cascade that may only be simulated (every driver that runs workers
    calls this: the operator, `diffcascade up` and `demo`)."""
    if spec.simulator_only:
        raise InvalidSpec(
            "simulatorOnly: this cascade exists to drive `diffcascade simulate` and is not "
            "deployed; give every deferring variant a gate.discriminator and remove the mark"
        )


def variant_object_name(cascade: str, variant: str) -> str:
    """The name of a variant's Deployment, Service, PodDisruptionBudget and NetworkPolicy."""
    return f"{cascade}-{variant}"


def check_names(cascade: str, spec: CascadeSpec) -> None:
    """The cascade's name must make valid child names (the CRD checks the same with CEL): a
    Service name is a DNS-1035 label, and the name is a label value of every child."""
    problems = []
    if len(cascade) > MAX_CHILD_NAME or not _DNS_1035_LABEL.match(cascade):
        problems.append(
            f"metadata.name {cascade!r} must start with a lowercase letter and hold only "
            "lowercase letters, digits and '-' (no dots), at most 63 characters: it begins "
            "the names of the cascade's Services"
        )
    for variant in spec.variants:
        child = variant_object_name(cascade, variant.name)
        if len(child) > MAX_CHILD_NAME:
            problems.append(
                f"the worker Deployment and Service of variant {variant.name} would be named "
                f"{child!r} ({len(child)} characters): cascade name + '-' + variant name must "
                f"fit in {MAX_CHILD_NAME}"
            )
    if problems:
        raise InvalidSpec("; ".join(problems))


def load_manifest(doc: dict[str, Any]) -> tuple[str, CascadeSpec]:
    """(name, spec) of a DiffusionCascade manifest; InvalidSpec if it is not one."""
    if doc.get("kind") != KIND:
        raise InvalidSpec(f"expected kind {KIND}, got {doc.get('kind')!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise InvalidSpec("metadata.name is required")
    spec = parse_spec(doc.get("spec") or {})
    check_names(name, spec)
    return name, spec
