"""On-cluster profiling: a Job per `profile.auto` variant, measured before the first plan.

The Job runs `diffcascade-worker profile` on the variant's image, node selector, tolerations
and resources (so on the GPU type it will serve on), after the same fetch init container the
workers have. It hands its result back through the container's termination message (under
4 KiB, read from the pod's status: no Kubernetes rights in the Job); the operator checks it
and stores it in a ConfigMap `<cascade>-profile-<variant>` annotated with the profile key.

The key hashes what changes the measurement (model, gate, steps, guidance, resolution, batch
sizes, image, resources, nodes, and the pipeline's assembly: unet, scheduler, weights variant,
safety checker): a spec change that touches any of them names a new Job, so the variant is
profiled again; until every auto variant has a ConfigMap of its current key
the operator creates no workers and decides no plan (what already runs is left alone).
Planning then uses the spec with the measured table (and, for a gated variant, the measured
f(t)) in place of what the spec wrote.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffcascade_operator.kube import manifests
from diffcascade_operator.kube import status as st
from diffcascade_operator.kube.model_storage import add_storage, variant_storage
from diffcascade_operator.kube.policy import check_spec
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.spec import (
    CascadeSpec,
    DeferCurveSpec,
    InvalidSpec,
    ProfileSpec,
    VariantSpec,
    check_deployable,
    parse_spec,
)

PROFILED = "Profiled"
PROFILE_KEY = "diffcascade.dev/profile-key"
LABEL_PROFILE_OF = "diffcascade.dev/profile-of"
PROFILE_DATA_KEY = "profile.json"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
JOB_DEADLINE_S = 3600
JOB_TTL_S = 86_400
Event = tuple[str, str, str]


def batch_sizes(variant: VariantSpec) -> list[int]:
    sizes = variant.profile.batch_sizes or list(DEFAULT_BATCH_SIZES)
    return [b for b in sizes if b <= variant.max_batch_size] or [1]


def profile_key(spec: CascadeSpec, variant: VariantSpec, settings: OperatorSettings) -> str:
    gate = variant.gate.discriminator if variant.gate is not None else None
    material = {
        "model": variant.model,
        "gate": [gate.uri, gate.architecture] if gate is not None else None,
        "steps": variant.steps,
        "guidance": variant.guidance_scale,
        "resolution": variant.resolution,
        "batchSizes": batch_sizes(variant),
        "image": variant.image or spec.worker_image or settings.worker_image,
        "resources": variant.resources,
        "gpus": variant.gpus_per_replica,
        "nodeSelector": variant.node_selector,
        "tolerations": variant.tolerations,
    }
    assembly = variant.assembly().model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if assembly:  # a UNet, scheduler, weights or checker change measures another pipeline
        material["assembly"] = assembly
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def _name(*parts: str, limit: int = 63) -> str:
    """`a-b-c`, shortened with a hash when over `limit` (a label value and a DNS label)."""
    name = "-".join(parts)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def job_name(cascade: str, variant: str, key: str) -> str:
    return _name(cascade, "profile", variant, key[:8])


def configmap_name(cascade: str, variant: str) -> str:
    return _name(cascade, "profile", variant, limit=253)


def auto_variants(spec: CascadeSpec) -> list[VariantSpec]:
    return [v for v in spec.variants if v.profile.auto]


def profile_job(
    *,
    cascade: str,
    namespace: str,
    spec: CascadeSpec,
    index: int,
    key: str,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The profiling Job of `spec.variants[index]` (the worker's image, nodes and resources)."""
    variant = spec.variants[index]
    paths = variant_storage(variant)
    image = variant.image or spec.worker_image or settings.worker_image
    args = [
        "profile",
        f"--model={paths.model}",
        f"--batch-sizes={','.join(str(b) for b in batch_sizes(variant))}",
        f"--steps={variant.steps}",
        f"--guidance-scale={variant.guidance_scale:g}",
        f"--size={variant.resolution}",
        *variant.assembly(unet=paths.unet).flags(),
        f"--variant={variant.name}",
        f"--key={key}",
        "--out=/tmp/profile.json",
        "--termination-message=/dev/termination-log",
    ]
    if paths.gate is not None:
        args.insert(2, f"--gate={paths.gate}")
    container: dict[str, Any] = {
        "name": "profile",
        "image": image,
        "command": ["diffcascade-worker"],
        "args": args,
        "env": [*manifests.writable_env(), *(variant.env or [])],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "resources": manifests._with_default_requests(manifests._gpu_resources(variant), settings),
    }
    pod = add_storage(
        {"containers": [container], "restartPolicy": "Never"},
        spec=spec,
        variant=variant,
        image=image,
        settings=settings,
    )
    if not paths.fetched:
        container["env"].insert(0, {"name": "HF_HUB_OFFLINE", "value": "1"})
    # Not the worker labels: the control loop must never count a profiling pod as a worker.
    pod_labels = {
        "app.kubernetes.io/name": "diffcascade-profiler",
        "app.kubernetes.io/instance": cascade,
        LABEL_PROFILE_OF: cascade,
        manifests.LABEL_VARIANT: variant.name,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(cascade, variant.name, key),
            "namespace": namespace,
            "labels": {**pod_labels, "app.kubernetes.io/managed-by": manifests.MANAGED_BY},
            "annotations": {PROFILE_KEY: key},
        },
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": JOB_DEADLINE_S,
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {PROFILE_KEY: key}},
                "spec": manifests.harden_pod(pod),
            },
        },
    }


@dataclass(frozen=True)
class MeasuredProfile:
    """A profiling result, checked against the spec's own rules."""

    key: str
    batch_latency_ms: dict[int, float]
    thresholds: list[float] | None = None
    defer_fractions: list[float] | None = None
    accelerator: str = ""
    measured_at: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "key": self.key,
            "batchLatencyMs": {str(b): ms for b, ms in self.batch_latency_ms.items()},
            "accelerator": self.accelerator,
            "measuredAt": self.measured_at,
        }
        if self.thresholds is not None:
            doc["deferCurve"] = {
                "thresholds": self.thresholds,
                "deferFractions": self.defer_fractions,
            }
        return doc


class ProfileResultError(ValueError):
    """A profiling result that is not what `diffcascade-worker profile` writes."""


def parse_result(text: str, *, key: str) -> MeasuredProfile:
    """Check a result document (termination message or ConfigMap data)."""
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise ProfileResultError(f"the profiling result is not JSON: {error}") from None
    if not isinstance(doc, dict):
        raise ProfileResultError("the profiling result is not a JSON object")
    if doc.get("key") != key:
        raise ProfileResultError(f"the profiling result is for key {doc.get('key')!r}, not {key}")
    try:
        table = ProfileSpec.model_validate({"batchLatencyMs": doc.get("batchLatencyMs")})
        curve = None
        if doc.get("deferCurve") is not None:
            curve = DeferCurveSpec.model_validate(doc["deferCurve"])
    except ValueError as error:
        raise ProfileResultError(f"the profiling result is malformed: {error}") from None
    assert table.batch_latency_ms is not None
    if any(not math.isfinite(ms) for ms in table.batch_latency_ms.values()):
        raise ProfileResultError("the profiling result has non-finite latencies")
    return MeasuredProfile(
        key=key,
        batch_latency_ms=table.batch_latency_ms,
        thresholds=None if curve is None else curve.thresholds,
        defer_fractions=None if curve is None else curve.defer_fractions,
        accelerator=str(doc.get("accelerator") or doc.get("device") or ""),
        measured_at=str(doc.get("measuredAt") or ""),
    )


def profile_configmap(
    *, cascade: str, namespace: str, variant: str, measured: MeasuredProfile
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(cascade, variant),
            "namespace": namespace,
            "labels": manifests.labels(cascade, variant),
            "annotations": {PROFILE_KEY: measured.key},
        },
        "data": {PROFILE_DATA_KEY: json.dumps(measured.to_json(), sort_keys=True)},
    }


def with_measured(
    raw: Mapping[str, Any], measured: Mapping[str, MeasuredProfile]
) -> dict[str, Any]:
    """The raw spec with each measured variant's table (and a gate's deferCurve) replaced."""
    out = copy.deepcopy(dict(raw))
    for variant in out.get("variants") or []:
        result = measured.get(str(variant.get("name")))
        if result is None:
            continue
        profile = dict(variant.get("profile") or {})
        profile["batchLatencyMs"] = {str(b): ms for b, ms in result.batch_latency_ms.items()}
        variant["profile"] = profile
        gate = variant.get("gate")
        if isinstance(gate, dict) and result.thresholds:
            gate["deferCurve"] = {
                "thresholds": result.thresholds,
                "deferFractions": result.defer_fractions,
            }
    return out


@dataclass
class ProfilingOutcome:
    """Where profiling stands; `raw` is the spec to plan with when `done`."""

    raw: dict[str, Any]
    done: bool
    variants: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    condition: st.Condition | None = None

    def take_events(self) -> list[Event]:
        """The events not posted yet (the memo keeps the outcome between polls)."""
        events, self.events = self.events, []
        return events

    def status_fields(self) -> dict[str, Any]:
        return {"profiling": {"variants": self.variants}} if self.variants else {}


def _termination_message(pods: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """(message of a container that exited 0, else the last failure's reason/message)."""
    failure = None
    for pod in pods:
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        for cs in statuses:
            if cs.get("name") != "profile":
                continue
            done = (cs.get("state") or {}).get("terminated") or {}
            if not done:
                continue
            if done.get("exitCode") == 0 and done.get("message"):
                return str(done["message"]), None
            failure = f"{done.get('reason') or 'Error'}: {(done.get('message') or '')[-500:]}"
    return None, failure


def _job_state(job: Mapping[str, Any]) -> str:
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return "Succeeded" if cond["type"] == "Complete" else "Failed"
    if status.get("succeeded"):
        return "Succeeded"
    return "Running" if status.get("active") else "Pending"


def profiling_step(
    *,
    api: Any,
    owner: Mapping[str, Any],
    namespace: str,
    cascade: str,
    raw: Mapping[str, Any],
    spec: CascadeSpec,
    settings: OperatorSettings,
    adopt: Any,
    status: Mapping[str, Any] | None = None,
) -> ProfilingOutcome:
    """Create missing Jobs, collect finished ones into ConfigMaps, say where things stand.

    `status` is the cascade's current status: a failure is announced once, not every tick.
    """
    before = {
        str(v.get("name")): v.get("state")
        for v in ((status or {}).get("profiling") or {}).get("variants") or []
        if isinstance(v, Mapping)
    }
    measured: dict[str, MeasuredProfile] = {}
    outcome = ProfilingOutcome(raw=dict(raw), done=False)
    waiting: list[str] = []
    failed: list[str] = []
    for index, variant in enumerate(spec.variants):
        if not variant.profile.auto:
            continue
        key = profile_key(spec, variant, settings)
        name = job_name(cascade, variant.name, key)
        cm_name = configmap_name(cascade, variant.name)
        entry: dict[str, Any] = {
            "name": variant.name,
            "key": key,
            "job": name,
            "configMap": cm_name,
        }
        result = _stored(api, namespace, cm_name, key)
        if result is None:
            job = api.read_job(namespace, name)
            if job is None:
                manifest = profile_job(
                    cascade=cascade,
                    namespace=namespace,
                    spec=spec,
                    index=index,
                    key=key,
                    settings=settings,
                )
                adopt(manifest, owner)
                api.create_job(manifest)
                outcome.events.append(
                    ("Normal", "ProfilingStarted", f"{variant.name}: created Job {name}")
                )
                state = "Pending"
            else:
                state = _job_state(job)
            if state in ("Succeeded", "Failed"):
                message, failure = _termination_message(api.job_pods(namespace, name))
                if message is not None:
                    try:
                        result = parse_result(message, key=key)
                    except ProfileResultError as error:
                        state, failure = "Failed", str(error)
                    else:
                        cm = profile_configmap(
                            cascade=cascade,
                            namespace=namespace,
                            variant=variant.name,
                            measured=result,
                        )
                        adopt(cm, owner)
                        api.apply(cm)
                        outcome.events.append(
                            ("Normal", "Profiled", f"{variant.name}: {_table_text(result)}")
                        )
                elif state == "Succeeded":
                    state, failure = "Failed", "the Job left no profiling result"
                if result is None:
                    state = "Failed"
                    entry["message"] = (failure or "the profiling Job failed")[:1000]
                    if before.get(variant.name) != "Failed":
                        outcome.events.append(
                            ("Warning", "ProfilingFailed", f"{variant.name}: {entry['message']}")
                        )
            entry["state"] = state
        if result is not None:
            measured[variant.name] = result
            entry.update(
                state="Succeeded",
                batchLatencyMs={str(b): ms for b, ms in result.batch_latency_ms.items()},
                accelerator=result.accelerator,
                measuredAt=result.measured_at,
                deferCurveMeasured=result.thresholds is not None,
            )
        elif entry["state"] == "Failed":
            failed.append(f"{variant.name} ({entry.get('message', '')})")
        else:
            waiting.append(f"{variant.name} (Job {name}: {entry['state']})")
        outcome.variants.append(entry)
    if failed:
        outcome.condition = st.Condition(
            PROFILED,
            "False",
            "ProfilingFailed",
            ("failed: " + "; ".join(failed) + "; delete the Job to retry")[:1000],
        )
    elif waiting:
        outcome.condition = st.Condition(
            PROFILED, "False", "Profiling", ("measuring " + ", ".join(waiting))[:1000]
        )
    else:
        outcome.condition = st.Condition(
            PROFILED,
            "True",
            "Measured",
            "; ".join(f"{v}: {_table_text(m)}" for v, m in measured.items())[:1000],
        )
        outcome.done = True
        outcome.raw = with_measured(raw, measured)
    return outcome


def _stored(api: Any, namespace: str, name: str, key: str) -> MeasuredProfile | None:
    """The stored measurement of `key`, or None (absent, stale key, unreadable)."""
    cm = api.read_configmap(namespace, name)
    if cm is None:
        return None
    annotations = (cm.get("metadata") or {}).get("annotations") or {}
    if annotations.get(PROFILE_KEY) != key:
        return None
    try:
        return parse_result((cm.get("data") or {}).get(PROFILE_DATA_KEY, ""), key=key)
    except ProfileResultError:
        return None


def _table_text(result: MeasuredProfile) -> str:
    table = ", ".join(f"{b}: {ms:.0f}" for b, ms in result.batch_latency_ms.items())
    where = f" on {result.accelerator}" if result.accelerator else ""
    return f"batch ms {{{table}}}{where}"


# --- the reconcile side: hold children and plans until every auto variant is measured -------

POLL_S = 5.0  # how often unfinished Jobs are looked at


@dataclass
class ProfilingMemo:
    """Per cascade, in the Kopf memo: the last outcome, for the spec it was computed for."""

    digest: str | None = None
    outcome: ProfilingOutcome | None = None
    checked_at: float = 0.0


def gate(
    *,
    api: Any,
    body: Mapping[str, Any],
    memo: ProfilingMemo,
    settings: OperatorSettings,
    now: float,
    adopt: Any,
) -> ProfilingOutcome | None:
    """None when no variant has `profile.auto` (or the spec is unusable: the caller's
    load_spec reports that); else where profiling stands, with the spec to plan with."""
    raw = dict(body.get("spec") or {})
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    if memo.digest == digest and (
        memo.outcome is None or memo.outcome.done or now - memo.checked_at < POLL_S
    ):
        return memo.outcome
    memo.digest, memo.checked_at, memo.outcome = digest, now, None
    try:
        spec = parse_spec(raw)
        check_deployable(spec)
        check_spec(spec, settings)
    except InvalidSpec:
        return None
    if not auto_variants(spec):
        return None
    meta = body.get("metadata") or {}
    memo.outcome = profiling_step(
        api=api,
        owner=body,
        namespace=meta["namespace"],
        cascade=meta["name"],
        raw=raw,
        spec=spec,
        settings=settings,
        adopt=adopt,
        status=body.get("status") or {},
    )
    return memo.outcome


def waiting_status(
    outcome: ProfilingOutcome,
    *,
    status: Mapping[str, Any],
    now: float,
    generation: int | None,
) -> dict[str, Any]:
    """Status while profiling: what runs is left alone; Ready stays True only if it was."""
    assert outcome.condition is not None
    message = outcome.condition.message
    conds = [
        outcome.condition,
        st.Condition(st.PROGRESSING, "True", outcome.condition.reason, message),
    ]
    if st.condition_status(status.get("conditions"), st.READY) != "True":
        conds.append(st.Condition(st.READY, "False", outcome.condition.reason, message))
    return {
        "observedGeneration": generation,
        **outcome.status_fields(),
        "conditions": st.merge_conditions(
            status.get("conditions"), conds, now=now, generation=generation
        ),
    }


def with_profiling_status(
    fields: Mapping[str, Any],
    outcome: ProfilingOutcome | None,
    *,
    now: float,
    generation: int | None,
) -> dict[str, Any]:
    """`fields` plus the measured tables and the Profiled condition (when profiling ran)."""
    out = dict(fields)
    if outcome is None or outcome.condition is None:
        return out
    out.update(outcome.status_fields())
    out["conditions"] = st.merge_conditions(
        out.get("conditions"), [outcome.condition], now=now, generation=generation
    )
    return out
