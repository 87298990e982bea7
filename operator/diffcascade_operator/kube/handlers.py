"""Kopf wiring for DiffusionCascade: thin handlers over `reconcile`.

Run with `diffcascade operator`, or `kopf run -m diffcascade_operator.kube.handlers`.
Settings come from DIFFCASCADE_* environment variables (see `kube.settings`). Worker pods and
Deployments are kept in Kopf indices, so a control step costs no list calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from diffcascade_operator.control_metrics import CONTROL_METRICS
from diffcascade_operator.kube import manifests, reconcile
from diffcascade_operator.kube.actuator import PodInfo
from diffcascade_operator.kube.api import KubeApi, load_config
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.kube.status import diff_patch
from diffcascade_operator.spec import API_GROUP, API_VERSION, PLURAL

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
    load_config()
    memo["api"] = KubeApi()
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
) -> dict[tuple[str | None, str], tuple[str, int | None]]:
    variant = meta.labels.get(manifests.LABEL_VARIANT, "")
    if meta.labels.get(manifests.LABEL_ROLE) == manifests.ROUTER_ROLE:
        variant = manifests.ROUTER_INDEX_KEY
    return {(namespace, meta.labels[manifests.LABEL_CASCADE]): (variant, spec.get("replicas"))}


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
    body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, namespace: str | None, name: str, **kw: Any
) -> None:
    key = (namespace, name)
    pods: kopf.Index[tuple[str | None, str], PodInfo] = kw["worker_pods"]
    deployments: kopf.Index[tuple[str | None, str], tuple[str, int | None]] = kw[
        "worker_deployments"
    ]
    outcome = reconcile.control_step(
        api=memo["api"],
        body=body,
        state=_state(memo),
        pods=list(pods.get(key, [])),
        deployment_replicas=dict(deployments.get(key, [])),
        settings=SETTINGS,
    )
    if outcome is not None:
        patch.status.update(diff_patch(body.get("status") or {}, outcome.status))
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
