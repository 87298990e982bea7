"""Applies a plan: replica counts, pod deletion cost before scale-down, config PUTs, ConfigMap.

The config PUT goes to every ready pod that has not yet acknowledged the plan's id, so a
steady plan costs no HTTP calls and a pod that missed one (new, or briefly unreachable) is
caught up on the next tick. Router pods get the plan's router document the same way (entry
stage, heavy stage, router share: `router_config.router_view` reads them from the plan).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from diffcascade_worker.protocol import PATH_CONFIG, PATH_METRICS, PATH_ROUTER_CONFIG, RouterConfig

from diffcascade_operator.kube import manifests
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.metrics_source import parse_worker_metrics
from diffcascade_operator.plan import Plan
from diffcascade_operator.router_config import router_config_id
from diffcascade_operator.spec import CascadeSpec
from diffcascade_operator.worker_config import StageUrl, config_update

logger = logging.getLogger(__name__)

_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="diffcascade-push")
_HTTP = httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))


@dataclass(frozen=True)
class PodInfo:
    """What the control loop needs to know about one worker pod."""

    name: str
    uid: str
    variant: str
    ip: str | None
    port: int
    ready: bool
    deleting: bool = False
    role: str = "worker"  # or manifests.ROUTER_ROLE: a router pod (no variant)

    @property
    def url(self) -> str | None:
        return f"http://{self.ip}:{self.port}" if self.ip else None

    @property
    def serving(self) -> bool:
        return self.ready and not self.deleting and self.ip is not None


@dataclass(frozen=True)
class ApplyResult:
    scaled: dict[str, tuple[int, int]]  # variant -> (before, after)
    pushed_ok: int
    push_failures: tuple[str, ...]  # "pod: error"
    serving: int  # ready worker pods the plan should reach
    acknowledged: int  # of those, pods that hold the current plan id
    routers_serving: int = 0  # ready router pods
    routers_acknowledged: int = 0  # of those, pods that hold the current router document


def _put(
    url: str, body: str, token: str | None, timeout: float, path: str = PATH_CONFIG
) -> str | None:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = _HTTP.put(f"{url}{path}", content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code >= 300:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return None


def _load(url: str, timeout: float) -> float | None:
    """Queue depth + in-flight requests of one worker, or None if it does not answer."""
    try:
        response = _HTTP.get(f"{url}{PATH_METRICS}", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    sample = parse_worker_metrics(response.text)
    return sample.queue_depth + sample.inflight


def deletion_costs(loads: Mapping[str, float | None]) -> dict[str, str]:
    """pod -> pod-deletion-cost: idle pods cheapest, silent pods cheaper still."""
    return {
        pod: str(-1 if load is None else min(round(load * 100), 2**31 - 1))
        for pod, load in loads.items()
    }


def push_config(
    *,
    pods: Sequence[PodInfo],
    plan: Plan,
    spec: CascadeSpec,
    plan_id: str,
    token: str | None,
    acknowledged: MutableMapping[str, str],
    timeout_s: float,
    stage_url: StageUrl,
) -> tuple[int, tuple[str, ...]]:
    """PUT the plan to serving pods that lack it; updates `acknowledged` (pod uid -> plan id).

    The body is `worker_config.config_update`, what the one-machine actuator pushes too."""
    by_variant = {a.name: a for a in plan.variants}
    todo = [
        p
        for p in pods
        if p.serving
        and p.role != manifests.ROUTER_ROLE
        and p.variant in by_variant
        and acknowledged.get(p.uid) != plan_id
    ]
    bodies = {
        name: config_update(plan, name, spec=spec, stage_url=stage_url).model_dump_json(
            exclude_none=True
        )
        for name in by_variant
    }
    if not todo:
        return 0, ()
    results = list(
        _POOL.map(
            lambda p: (p, _put(p.url or "", bodies[p.variant], token, timeout_s)),
            todo,
        )
    )
    failures: list[str] = []
    ok = 0
    for pod, error in results:
        if error is None:
            acknowledged[pod.uid] = plan_id
            ok += 1
        else:
            failures.append(f"{pod.name}: {error}")
    return ok, tuple(failures)


def push_router(
    *,
    pods: Sequence[PodInfo],
    config: RouterConfig,
    token: str | None,
    acknowledged: MutableMapping[str, str],
    timeout_s: float,
) -> tuple[int, tuple[str, ...]]:
    """PUT the router document to ready router pods that do not hold it yet."""
    document_id = router_config_id(config)
    todo = [
        p
        for p in pods
        if p.serving and p.role == manifests.ROUTER_ROLE and acknowledged.get(p.uid) != document_id
    ]
    if not todo:
        return 0, ()
    body = config.model_dump_json()
    results = list(
        _POOL.map(
            lambda p: (p, _put(p.url or "", body, token, timeout_s, PATH_ROUTER_CONFIG)), todo
        )
    )
    failures = [f"{pod.name}: {error}" for pod, error in results if error is not None]
    for pod, error in results:
        if error is None:
            acknowledged[pod.uid] = document_id
    return len(todo) - len(failures), tuple(failures)


def apply_plan(
    *,
    api: KubeApi,
    namespace: str,
    cascade: str,
    spec: CascadeSpec,
    plan: Plan,
    current_replicas: Mapping[str, int | None],
    pods: Sequence[PodInfo],
    token: str | None,
    acknowledged: MutableMapping[str, str],
    configmap_plan_id: str | None,
    timeout_s: float,
    port: int,
    router: RouterConfig | None = None,
) -> ApplyResult:
    """Bring the cluster to `plan`. `current_replicas[v]` is None when unknown (then set);
    `router` is the document the router pods get (None: the operator runs no router)."""
    plan_id = manifests.plan_id(plan)
    if configmap_plan_id != plan_id:
        cm = manifests.configmap(
            cascade=cascade, namespace=namespace, plan=plan, spec=spec, router=router
        )
        api.patch_configmap_data(namespace, cm["metadata"]["name"], cm)
    scaled: dict[str, tuple[int, int]] = {}
    for allocation in plan.variants:
        before = current_replicas.get(allocation.name)
        if before == allocation.replicas:
            continue
        if before is not None and allocation.replicas < before:
            victims = [p for p in pods if p.variant == allocation.name and not p.deleting]
            loads = dict(
                _POOL.map(
                    lambda p: (p.name, _load(p.url, timeout_s) if p.url else None),
                    victims,
                )
            )
            for pod, cost in deletion_costs(loads).items():
                api.annotate_pod(namespace, pod, {manifests.DELETION_COST: cost})
        api.scale(
            namespace, manifests.deployment_name(cascade, allocation.name), allocation.replicas
        )
        scaled[allocation.name] = (before if before is not None else -1, allocation.replicas)
    ok, failures = push_config(
        pods=pods,
        plan=plan,
        spec=spec,
        plan_id=plan_id,
        token=token,
        acknowledged=acknowledged,
        timeout_s=timeout_s,
        stage_url=lambda variant: manifests.stage_url(
            cascade=cascade, namespace=namespace, variant=variant, port=port
        ),
    )
    routers = [p for p in pods if p.serving and p.role == manifests.ROUTER_ROLE]
    routers_acked = 0
    if router is not None:
        router_ok, router_failures = push_router(
            pods=routers,
            config=router,
            token=token,
            acknowledged=acknowledged,
            timeout_s=timeout_s,
        )
        ok += router_ok
        failures = (*failures, *router_failures)
        document_id = router_config_id(router)
        routers_acked = sum(1 for p in routers if acknowledged.get(p.uid) == document_id)
    serving = [p for p in pods if p.serving and p.role != manifests.ROUTER_ROLE]
    live = {p.uid for p in pods}
    for uid in [u for u in acknowledged if u not in live]:
        del acknowledged[uid]
    return ApplyResult(
        scaled=scaled,
        pushed_ok=ok,
        push_failures=failures,
        serving=len(serving),
        acknowledged=sum(1 for p in serving if acknowledged.get(p.uid) == plan_id),
        routers_serving=len(routers),
        routers_acknowledged=routers_acked,
    )
