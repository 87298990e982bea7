"""What a worker is told, for every driver: its serve arguments and its config document.

The Kubernetes actuator renders the arguments into a Deployment and pushes the config to
ready pods; the one-machine actuator passes the same arguments to a local process and pushes
the same config. Only where a file lives (a pod's cache volume or a path on this machine) and
how a stage is addressed (a Service or the local router) differ, so the driver passes those in.

Arguments hold what the spec fixes (changing them restarts workers); the config holds what a
plan decides (pushed without a restart). `plan_id` names one config generation, the same way
everywhere: a hash of what the workers are told.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffcascade_worker.protocol import CascadeConfigUpdate

from diffcascade_operator.plan import Plan, VariantAllocation
from diffcascade_operator.spec import CascadeSpec

#: variant name -> the base URL its stage is reached at (a Service, or the local router).
StageUrl = Callable[[str], str]


@dataclass(frozen=True)
class WorkerFiles:
    """Where one worker finds its files, as its driver resolved them."""

    model: str
    gate: str | None = None
    unet: str | None = None  # the replacement UNet, when the variant has one
    #: The client API keys (file or mounted Secret folder), given only to a stage that checks
    #: them (`checks_api_keys`).
    api_keys: str | None = None


def _names(spec: CascadeSpec) -> list[str]:
    return [v.name for v in spec.variants]


def checks_api_keys(
    spec: CascadeSpec, stage: str | None, *, router: bool, stages_closed: bool
) -> bool:
    """Whether `stage` (a variant's workers; None: the cascade's router) checks the client API
    keys of a cascade whose spec names a keys Secret: every door a client can reach does.

    With a router (`router`), that is the router: the stages' NetworkPolicy
    (`stages_closed`) admits only the router, earlier stages, the operator and the scrapers,
    so the router is the one door, and it checks a prompt it sends straight to the heavy
    stage like any other. The stages behind it need no keys. Without a router, or without
    that NetworkPolicy, a client may reach whatever stage a plan enters at or routes to,
    which with hybrid plans may be any stage: then every stage checks (a deferral carries
    the client's key, which the router passes on too)."""
    if spec.api_keys is None:
        return False
    if stage is None:
        return router
    return not (router and stages_closed)


def allocation(plan: Plan | None, name: str) -> VariantAllocation | None:
    if plan is None:
        return None
    return next((a for a in plan.variants if a.name == name), None)


def default_next_stage(spec: CascadeSpec, name: str) -> str | None:
    """The next variant in the spec: where a stage defers before a plan says otherwise."""
    names = _names(spec)
    index = names.index(name)
    return names[index + 1] if index + 1 < len(names) else None


def next_stage(plan: Plan | None, spec: CascadeSpec, name: str) -> str | None:
    """Where `name` sends its deferrals under `plan`: the plan's `next_stage`, else the next
    variant (a stage a plan routes nowhere has threshold 0 and defers nothing anyway)."""
    chosen = allocation(plan, name)
    if chosen is not None and chosen.next_stage is not None:
        return chosen.next_stage
    return default_next_stage(spec, name)


def allowed_next_stages(spec: CascadeSpec, name: str) -> list[str]:
    """Every stage `name` may defer to: the later variants (a plan may skip some)."""
    names = _names(spec)
    return names[names.index(name) + 1 :]


def routes_by_plan(spec: CascadeSpec) -> bool:
    """Whether plans can route a stage past the next variant (three or more variants).

    Then every config names the next stage explicitly; with two, the serve arguments' next
    stage is the only one there is, and the config leaves it alone (so a worker reached at
    an address of its own, as in the emulator tests, keeps it)."""
    return len(spec.variants) > 2


def plan_id(plan: Plan) -> str:
    """A short hash of what the plan tells the workers (replicas excluded: they are not told;
    the spec's SLO and batch wait are in the workers' arguments, so a change restarts them)."""
    payload = [(a.name, a.batch_size, a.threshold, a.next_stage) for a in plan.variants]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]


def config_update(
    plan: Plan | None, name: str, *, spec: CascadeSpec, stage_url: StageUrl
) -> CascadeConfigUpdate:
    """The config every ready worker of `name` should hold under `plan` (before any plan:
    batch 1, the spec's SLO and batch wait, the worker's own threshold). The next stage is
    named when plans route (`routes_by_plan`)."""
    chosen = allocation(plan, name)
    fields: dict[str, Any] = {
        "batch_size": chosen.batch_size if chosen is not None else 1,
        "max_batch_wait_ms": spec.control.max_batch_wait_ms,
        "slo_seconds": spec.slo_seconds,
        "plan_id": plan_id(plan) if plan is not None else "initial",
    }
    if routes_by_plan(spec):
        target = next_stage(plan, spec, name)
        fields["next_stage_url"] = stage_url(target) if target is not None else ""
    if chosen is not None and chosen.threshold is not None:
        fields["threshold"] = chosen.threshold
    return CascadeConfigUpdate(**fields)


def config_body(
    plan: Plan | None, name: str, *, spec: CascadeSpec, stage_url: StageUrl
) -> dict[str, Any]:
    """`config_update` as the JSON body of PUT /v1/cascade/config."""
    return config_update(plan, name, spec=spec, stage_url=stage_url).model_dump(exclude_none=True)


def serve_args(
    spec: CascadeSpec,
    name: str,
    *,
    cascade: str,
    files: WorkerFiles,
    stage_url: StageUrl,
    extra: Mapping[str, str] | None = None,
) -> list[str]:
    """`diffcascade-worker serve` arguments for a worker of `name` (spec-fixed values only).

    `extra` adds driver-specific flags (host, port, drain timeout, threads), written the same
    `--flag=value` way.
    """
    variant = next(v for v in spec.variants if v.name == name)
    args = [
        f"--model={files.model}",
        f"--variant={variant.name}",
        f"--cascade={cascade}",
        f"--steps={variant.steps}",
        f"--guidance={variant.guidance_scale:g}",
        f"--size={variant.resolution}",
        f"--slo-seconds={spec.slo_seconds:g}",
        f"--max-batch-wait-ms={spec.control.max_batch_wait_ms:g}",
        *variant.assembly(unet=files.unet).flags(),
    ]
    if files.gate is not None:
        args.append(f"--gate={files.gate}")
    if files.api_keys is not None:
        args.append(f"--api-keys={files.api_keys}")
    target = default_next_stage(spec, name)
    if target is not None:
        args.append(f"--next-stage-url={stage_url(target)}")
    # A plan may skip a stage; the worker takes no next stage outside this list.
    for later in allowed_next_stages(spec, name)[1:]:
        args.append(f"--allowed-next-stage={stage_url(later)}")
    for flag, value in (extra or {}).items():
        args.append(f"--{flag}={value}")
    return args


__all__ = [
    "StageUrl",
    "WorkerFiles",
    "allocation",
    "allowed_next_stages",
    "checks_api_keys",
    "config_body",
    "config_update",
    "default_next_stage",
    "next_stage",
    "plan_id",
    "routes_by_plan",
    "serve_args",
]
