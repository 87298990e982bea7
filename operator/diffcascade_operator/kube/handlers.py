"""Kopf wiring for DiffusionCascade: thin handlers over `reconcile`.

Run with `diffcascade operator`, or `kopf run -m diffcascade_operator.kube.handlers`.
Settings come from DIFFCASCADE_* environment variables (see `kube.settings`). Worker pods and
Deployments are kept in Kopf indices, so a control step costs no list calls.

The control loop's timer never lets an error reach Kopf and writes its status itself: Kopf ends
a timer for good when a handler's status patch fails (a 409, or errors outlasting its retries),
and a loop must outlive any apiserver outage. The liveness probe fails, naming the cascade, when
a loop stops stepping (`kube.loop_health`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from diffcascade_operator.control_metrics import CONTROL_METRICS
from diffcascade_operator.kube import manifests, reconcile
from diffcascade_operator.kube.actuator import PodInfo
from diffcascade_operator.kube.api import API_ERRORS, KubeApi, api_error_text, load_config
from diffcascade_operator.kube.loop_health import LoopHealth
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.kube.status import diff_patch
from diffcascade_operator.spec import API_GROUP, API_VERSION, PLURAL

logger = logging.getLogger(__name__)

SETTINGS = OperatorSettings.from_env()
CASCADES = (API_GROUP, API_VERSION, PLURAL)
RETRY_S = 5.0  # after an unexpected error (API down, ...); Kopf's default is 60 s
WORKERS: dict[str, Any] = {
    "app.kubernetes.io/managed-by": manifests.MANAGED_BY,
    manifests.LABEL_CASCADE: kopf.PRESENT,
}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Kopf's bookkeeping goes to annotations, so `.status` holds only what we write.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    # Kopf's own warnings about a cascade become its Events; routine INFO lines stay in logs.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 32
    # Kopf's requests (watches, its own patches) give up after ~54 s by default, and a watcher
    # that gives up at start-up ends the operator: retry apiserver errors forever instead, at
    # most every few seconds, so everything resumes soon after the apiserver answers again.
    settings.networking.error_backoffs = ApiRetries()
    # A cascade deleted while its control step runs: Kopf checks again after this long whether
    # the timer has exited before it removes its finalizer (its default, 60 s, held deletions).
    settings.background.cancellation_polling = 1.0
    load_config()
    memo["api"] = KubeApi(timeout_s=(5.0, SETTINGS.api_timeout_s))
    memo["loops"] = LoopHealth()  # shared: each cascade's memo is a shallow copy of this one
    if SETTINGS.metrics_port is not None:
        from prometheus_client import start_http_server

        started = start_http_server(SETTINGS.metrics_port, registry=CONTROL_METRICS.registry)
        memo["metrics_server"] = started[0]


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    server = memo.get("metrics_server")
    if server is not None:
        server.shutdown()
        server.server_close()


class ApiRetries:
    """Kopf's retry delays (s) after an apiserver error: 1, 1, 2, then every 2 s without end.

    Re-iterable (Kopf iterates it once per request, from several requests at a time)."""

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1.0, 1.0), itertools.repeat(2.0))


def _state(memo: kopf.Memo) -> reconcile.CascadeState:
    if "cascade" not in memo:
        memo["cascade"] = reconcile.new_state(SETTINGS)
    state: reconcile.CascadeState = memo["cascade"]
    return state


def _post(body: kopf.Body, events: list[reconcile.Event]) -> None:
    for kind, reason, message in events:
        kopf.event(body, type=kind, reason=reason, message=message)


@kopf.index("pods", labels=WORKERS)
def worker_pods(
    namespace: str | None,
    name: str,
    meta: kopf.Meta,
    spec: kopf.Spec,
    status: kopf.Status,
    **_: Any,
) -> dict[tuple[str | None, str], PodInfo]:
    return {(namespace, meta.labels[manifests.LABEL_CASCADE]): pod_info(name, meta, spec, status)}


@kopf.index("deployments", labels=WORKERS)
def worker_deployments(
    namespace: str | None, meta: kopf.Meta, spec: kopf.Spec, **_: Any
) -> dict[tuple[str | None, str], tuple[str, int | None, str | None]]:
    """(variant, replicas, controller uid): the loop counts only Deployments its cascade owns."""
    variant = meta.labels.get(manifests.LABEL_VARIANT, "")
    if meta.labels.get(manifests.LABEL_ROLE) == manifests.ROUTER_ROLE:
        variant = manifests.ROUTER_INDEX_KEY
    owner = next(
        (r.get("uid") for r in meta.get("ownerReferences") or () if r.get("controller")), None
    )
    return {
        (namespace, meta.labels[manifests.LABEL_CASCADE]): (variant, spec.get("replicas"), owner)
    }


@kopf.index(*CASCADES)
def cascade_intervals(
    namespace: str | None, name: str, meta: kopf.Meta, spec: kopf.Spec, **_: Any
) -> dict[tuple[str | None, str], float] | None:
    """Each live cascade's control interval: the cascades whose loops the probe checks."""
    if meta.get("deletionTimestamp") is not None:
        return None
    return {(namespace, name): interval_of(spec)}


def interval_of(spec: Mapping[str, Any]) -> float:
    if SETTINGS.interval_s is not None:
        return SETTINGS.interval_s
    try:
        value = float((spec.get("control") or {}).get("intervalSeconds", 5.0))
    except (TypeError, ValueError):
        return 5.0
    return value if math.isfinite(value) and value > 0 else 5.0


@kopf.on.probe(id="controlLoops")
def control_loops(memo: kopf.Memo, **kw: Any) -> str:
    """Fails (HTTP 500 from Kopf's liveness endpoint, the reason logged) when a loop stalls."""
    index: kopf.Index[tuple[str | None, str], float] = kw["cascade_intervals"]
    intervals = {key: max(index[key]) for key in index}
    health: LoopHealth = memo["loops"]
    stalled = health.stalled(
        intervals, stall_intervals=SETTINGS.stall_intervals, stall_min_s=SETTINGS.stall_min_s
    )
    if stalled:
        message = "control loop stalled: " + " | ".join(stalled)
        logger.error(message)
        raise kopf.PermanentError(message)
    return f"{len(intervals)} control loops stepping"


@kopf.on.resume(*CASCADES, backoff=RETRY_S)
@kopf.on.create(*CASCADES, backoff=RETRY_S)
@kopf.on.update(*CASCADES, field="spec", backoff=RETRY_S)
def apply_children(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    fields, events = reconcile.apply_children(
        api=memo["api"], body=body, state=_state(memo), settings=SETTINGS
    )
    patch.status.update(diff_patch(body.get("status") or {}, fields))
    _post(body, events)


@kopf.timer(
    *CASCADES, interval=SETTINGS.tick_s, initial_delay=SETTINGS.tick_s, sharp=True, backoff=RETRY_S
)
def control_loop(
    body: kopf.Body, memo: kopf.Memo, namespace: str | None, name: str, uid: str | None, **kw: Any
) -> None:
    """One control step when the interval has passed. Returns normally whatever happens (see
    the module doc): errors are logged, the status says them, the next tick tries again."""
    key = (namespace, name)
    health: LoopHealth = memo["loops"]
    pods: kopf.Index[tuple[str | None, str], PodInfo] = kw["worker_pods"]
    deployments: kopf.Index[tuple[str | None, str], tuple[str, int | None, str | None]] = kw[
        "worker_deployments"
    ]
    owned = {v: n for v, n, owner in deployments.get(key, []) if owner == uid}
    health.step_started(key)
    try:
        outcome = reconcile.control_step(
            api=memo["api"],
            body=body,
            state=_state(memo),
            pods=list(pods.get(key, [])),
            deployment_replicas=owned,
            settings=SETTINGS,
        )
        if outcome is None:
            health.step_skipped(key)
            return
        error = reconcile.write_status(memo["api"], body, outcome.status)
        _post(body, outcome.events)
        spec = _state(memo).spec
        CONTROL_METRICS.record(
            namespace=namespace or "",
            cascade=name,
            status=outcome.status,
            variants=[v.name for v in spec.variants] if spec is not None else [],
            slo_seconds=spec.slo_seconds if spec is not None else None,
            solved=outcome.decide_ms > 0,
        )
        health.step_done(key, error=error)
    except API_ERRORS as exc:  # a read the step could not do without: alive, waiting
        health.step_done(key, error=api_error_text(exc))
        logger.warning("[%s/%s] control step: %s", namespace, name, api_error_text(exc))
    except Exception as exc:  # the operator's own error: logged, and counted against liveness
        health.step_failed(key, f"{type(exc).__name__}: {exc}"[:500])
        logger.exception("[%s/%s] control step failed", namespace, name)


@kopf.on.delete(*CASCADES, optional=True)
def forget_metrics(namespace: str | None, name: str, **_: Any) -> None:
    CONTROL_METRICS.forget(namespace=namespace or "", cascade=name)


def pod_info(
    name: str, meta: Mapping[str, Any], spec: Mapping[str, Any], status: Mapping[str, Any]
) -> PodInfo:
    """A worker pod as the control loop sees it; the port is the container's `http` port."""
    port = SETTINGS.worker_port
    for container in spec.get("containers") or ():
        for p in container.get("ports") or ():
            if p.get("name") == manifests.PORT_NAME and p.get("containerPort"):
                port = int(p["containerPort"])
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    return PodInfo(
        name=name,
        uid=str(meta.get("uid") or name),
        variant=str((meta.get("labels") or {}).get(manifests.LABEL_VARIANT, "")),
        ip=status.get("podIP"),
        port=port,
        ready=ready and status.get("phase", "Running") == "Running",
        deleting=meta.get("deletionTimestamp") is not None,
        role=str((meta.get("labels") or {}).get(manifests.LABEL_ROLE) or "worker"),
    )
