"""The children of a cascade as plain dicts: pure functions, no API calls.

Each variant gets a Deployment `<cascade>-<variant>` and a Service of the same name; the
cascade gets a Secret `<cascade>-token` (the config API's bearer token), a ConfigMap
`<cascade>-plan` (the latest plan) and its pre-generation router: a Deployment, Service,
PodDisruptionBudget and NetworkPolicy all named `<cascade>`, the Service being the one stable
URL clients use whatever stage the plan enters at. Workers (and router pods) read their
threshold and batch size (entry, heavy stage and share) from the ConfigMap through env vars,
which Kubernetes resolves only when a container starts: a new plan reaches running pods by
the config PUT, reaches new pods through the ConfigMap, and never changes the pod template,
so plan changes never roll pods.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from diffcascade_worker.protocol import PATH_HEALTHZ, PATH_METRICS, PATH_READYZ, RouterConfig

from diffcascade_operator.kube.model_storage import add_storage, variant_storage
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.plan import Plan
from diffcascade_operator.spec import CascadeSpec, VariantSpec, variant_object_name
from diffcascade_operator.worker_config import WorkerFiles, checks_api_keys, serve_args
from diffcascade_operator.worker_config import plan_id as plan_id  # one meaning everywhere

Manifest = dict[str, Any]

LABEL_CASCADE = "diffcascade.dev/cascade"
LABEL_VARIANT = "diffcascade.dev/variant"
LABEL_ROLE = "diffcascade.dev/role"  # `router` on the router's objects (workers carry none)
ROUTER_ROLE = "router"
ROUTER_NAME = "diffcascade-router"
#: The router Deployment's key where Deployments are indexed by variant (no variant has it).
ROUTER_INDEX_KEY = "@router"
MANAGED_BY = "diffcascade-operator"
WORKER_NAME = "diffcascade-worker"
TOKEN_KEY = "token"
PLAN_KEY = "plan.json"
PORT_NAME = "http"
PRESTOP_SLEEP_S = 5  # lets endpoints drop the pod before SIGTERM starts the drain
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# The root filesystem is read-only; these emptyDirs are where a worker may write.
TMP_DIR = "/tmp"
CACHE_DIR = "/var/cache/diffcascade"  # model hub, torch and compiler caches
WORKER_UID = 10001  # the worker image's user (worker/Dockerfile)
API_KEYS_DIR = "/var/run/diffcascade/api-keys"  # spec.apiKeys' Secret, where keys are checked
API_KEYS_VOLUME = "api-keys"


def deployment_name(cascade: str, variant: str) -> str:
    return variant_object_name(cascade, variant)


def service_name(cascade: str, variant: str) -> str:
    return variant_object_name(cascade, variant)


def secret_name(cascade: str) -> str:
    return f"{cascade}-token"


def configmap_name(cascade: str) -> str:
    return f"{cascade}-plan"


def threshold_key(variant: str) -> str:
    return f"{variant}.threshold"


def batch_size_key(variant: str) -> str:
    return f"{variant}.batchSize"


#: ConfigMap keys a router pod reads at start (env), and the env variables they feed.
ROUTER_KEYS = {
    "router.entryUrl": ("DIFFCASCADE_ENTRY_URL", "entry_url"),
    "router.entryVariant": ("DIFFCASCADE_ENTRY_VARIANT", "entry_variant"),
    "router.heavyUrl": ("DIFFCASCADE_HEAVY_URL", "heavy_url"),
    "router.heavyVariant": ("DIFFCASCADE_HEAVY_VARIANT", "heavy_variant"),
    "router.share": ("DIFFCASCADE_ROUTER_SHARE", "router_share"),
}


def router_name(cascade: str) -> str:
    """The router's Deployment, Service, PodDisruptionBudget and NetworkPolicy."""
    return cascade


def labels(cascade: str, variant: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": WORKER_NAME,
        "app.kubernetes.io/instance": cascade,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_CASCADE: cascade,
    }
    if variant is not None:
        out["app.kubernetes.io/component"] = variant
        out[LABEL_VARIANT] = variant
    return out


def selector(cascade: str, variant: str) -> dict[str, str]:
    return {LABEL_CASCADE: cascade, LABEL_VARIANT: variant}


def stage_url(*, cascade: str, namespace: str, variant: str, port: int) -> str:
    """The in-cluster base URL of a variant's Service."""
    return f"http://{service_name(cascade, variant)}.{namespace}.svc:{port}"


def drain_seconds(spec: CascadeSpec) -> int:
    """A request accepted just before SIGTERM may take up to two SLOs (light + deferred)."""
    return math.ceil(2 * spec.slo_seconds)


def grace_period_seconds(spec: CascadeSpec, settings: OperatorSettings) -> int:
    return PRESTOP_SLEEP_S + drain_seconds(spec) + math.ceil(settings.drain_margin_s)


def _gpu_resources(variant: VariantSpec) -> dict[str, Any]:
    """The spec's resources plus `nvidia.com/gpu: gpusPerReplica`; quantities as strings."""
    resources: dict[str, Any] = {
        section: {k: str(v) for k, v in (values or {}).items()}
        for section, values in (variant.resources or {}).items()
        if section in ("limits", "requests")
    }
    if variant.gpus_per_replica > 0:
        resources.setdefault("limits", {}).setdefault(
            "nvidia.com/gpu", str(variant.gpus_per_replica)
        )
    return {k: v for k, v in resources.items() if v}


def _with_default_requests(resources: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """Every worker asks for some CPU and memory, so the scheduler and eviction see it."""
    out = {k: dict(v) for k, v in resources.items()}
    requests = out.setdefault("requests", {})
    limits = out.get("limits", {})
    for name, default in (
        ("cpu", settings.worker_cpu_request),
        ("memory", settings.worker_memory_request),
    ):
        # A limit alone makes Kubernetes request the same amount: keep that behaviour.
        if name not in requests and name not in limits:
            requests[name] = default
    return out


def pod_security_context() -> dict[str, Any]:
    """Pod Security "restricted": non-root, the runtime's default seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def writable_env() -> list[dict[str, Any]]:
    """Point HOME, temp files and caches at the writable volumes."""
    return [
        {"name": "HOME", "value": TMP_DIR},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TORCH_HOME", "value": f"{CACHE_DIR}/torch"},
    ]


def harden_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """Make a worker pod spec pass Pod Security "restricted" with a read-only root: security
    contexts on every container (init containers too), writable emptyDirs for /tmp and the
    caches with the env pointing there (what a container sets itself wins), and no
    service-account token (workers never call the Kubernetes API)."""
    pod["automountServiceAccountToken"] = False
    pod["enableServiceLinks"] = False
    pod["securityContext"] = {**pod_security_context(), **pod.get("securityContext", {})}
    volumes = pod.setdefault("volumes", [])
    names = {v["name"] for v in volumes}
    for name in ("tmp", "cache"):
        if name not in names:
            volumes.append({"name": name, "emptyDir": {}})
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        container["securityContext"] = {
            **container_security_context(),
            **container.get("securityContext", {}),
        }
        env = container.setdefault("env", [])
        own = {e.get("name") for e in env}
        env += [e for e in writable_env() if e["name"] not in own]
        mounts = container.setdefault("volumeMounts", [])
        paths = {m["mountPath"] for m in mounts}
        for name, path in (("tmp", TMP_DIR), ("cache", CACHE_DIR)):
            if path not in paths:
                mounts.append({"name": name, "mountPath": path})
    return pod


def checks_keys(spec: CascadeSpec, stage: str | None, settings: OperatorSettings) -> bool:
    """Whether `stage` (None: the router) checks client API keys: `checks_api_keys` under
    this operator's settings (the router when it runs one and the stages' NetworkPolicies
    admit no client; otherwise every stage)."""
    return checks_api_keys(
        spec, stage, router=settings.router, stages_closed=settings.network_policy
    )


def _worker_args(
    *, cascade: str, namespace: str, spec: CascadeSpec, index: int, settings: OperatorSettings
) -> list[str]:
    variant = spec.variants[index]
    port = settings.worker_port
    keyed = checks_keys(spec, variant.name, settings)
    paths = variant_storage(variant)  # storage URIs -> where the fetch init container puts them
    return [
        "serve",
        *serve_args(
            spec,
            variant.name,
            cascade=cascade,
            files=WorkerFiles(
                model=paths.model,
                gate=paths.gate,
                unet=paths.unet,
                api_keys=API_KEYS_DIR if keyed else None,
            ),
            stage_url=lambda name: stage_url(
                cascade=cascade, namespace=namespace, variant=name, port=port
            ),
            extra={"host": "0.0.0.0", "port": str(port), "drain-timeout": str(drain_seconds(spec))},
        ),
    ]


def add_api_keys(
    pod: dict[str, Any], *, spec: CascadeSpec, stage: str | None, settings: OperatorSettings
) -> dict[str, Any]:
    """Mount spec.apiKeys' Secret (read-only, the pod's group only) at API_KEYS_DIR, where
    `--api-keys` points, into a pod of `stage` (None: the router) when it checks keys
    (`checks_keys`); other pods are returned unchanged."""
    if spec.api_keys is None or not checks_keys(spec, stage, settings):
        return pod
    pod.setdefault("volumes", []).append(
        {
            "name": API_KEYS_VOLUME,
            "secret": {"secretName": spec.api_keys.secret_name, "defaultMode": 0o440},
        }
    )
    pod["containers"][0].setdefault("volumeMounts", []).append(
        {"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True}
    )
    return pod


def _probe(path: str, *, period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def deployment(
    *,
    cascade: str,
    namespace: str,
    spec: CascadeSpec,
    index: int,
    replicas: int,
    settings: OperatorSettings,
) -> Manifest:
    """The worker Deployment of `spec.variants[index]` with `replicas` pods."""
    variant = spec.variants[index]
    port = settings.worker_port
    cm = configmap_name(cascade)
    env: list[dict[str, Any]] = [
        {
            "name": "DIFFCASCADE_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(cascade), "key": TOKEN_KEY}},
        },
        {
            "name": "DIFFCASCADE_THRESHOLD",
            "valueFrom": {"configMapKeyRef": {"name": cm, "key": threshold_key(variant.name)}},
        },
        {
            "name": "DIFFCASCADE_BATCH_SIZE",
            "valueFrom": {"configMapKeyRef": {"name": cm, "key": batch_size_key(variant.name)}},
        },
        *(variant.env or []),
    ]
    # Startup may include downloading and loading a multi-GB pipeline.
    startup_budget = max(600.0, 4 * variant.profile.startup_seconds)
    image = variant.image or spec.worker_image or settings.worker_image
    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        "command": ["diffcascade-worker"],
        "args": _worker_args(
            cascade=cascade, namespace=namespace, spec=spec, index=index, settings=settings
        ),
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": _probe(PATH_READYZ, period=2, failures=1),
        "livenessProbe": _probe(PATH_HEALTHZ, period=10, failures=3, timeout=5),
        "startupProbe": _probe(PATH_HEALTHZ, period=10, failures=math.ceil(startup_budget / 10)),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
    }
    container["resources"] = _with_default_requests(_gpu_resources(variant), settings)
    pod_labels = labels(cascade, variant.name)
    pod_spec = harden_pod(
        add_storage(
            {
                "containers": [container],
                "terminationGracePeriodSeconds": grace_period_seconds(spec, settings),
            },
            spec=spec,
            variant=variant,
            image=image,
            settings=settings,
        )
    )
    add_api_keys(pod_spec, spec=spec, stage=variant.name, settings=settings)
    return _deployment(
        name=deployment_name(cascade, variant.name),
        namespace=namespace,
        labels=pod_labels,
        selector=selector(cascade, variant.name),
        replicas=replicas,
        port=port,
        pod_spec=pod_spec,
    )


def _deployment(
    *,
    name: str,
    namespace: str,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int,
    port: int,
    pod_spec: Manifest,
) -> Manifest:
    """A Deployment whose pods Prometheus scrapes on `port`; a worker's and a router's."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            # New pods must be ready before old ones go: a rollout never drops capacity.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": PATH_METRICS,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(*, cascade: str, namespace: str, variant: str, settings: OperatorSettings) -> Manifest:
    port = settings.worker_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(cascade, variant),
            "namespace": namespace,
            "labels": labels(cascade, variant),
        },
        "spec": {
            "selector": selector(cascade, variant),
            "ports": [{"name": PORT_NAME, "port": port, "targetPort": PORT_NAME}],
        },
    }


def disruption_budget(*, cascade: str, namespace: str, variant: str) -> Manifest:
    """A node drain takes one pod of a variant at a time; a pod that is not ready anyway may
    always go, so a broken pod never blocks a drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": deployment_name(cascade, variant),
            "namespace": namespace,
            "labels": labels(cascade, variant),
        },
        "spec": {
            "selector": {"matchLabels": selector(cascade, variant)},
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def operator_peer(settings: OperatorSettings) -> dict[str, Any] | None:
    """The operator's pods as a NetworkPolicy peer (None when it does not know where it runs,
    e.g. outside the cluster)."""
    if not settings.operator_namespace or not settings.operator_pod_labels:
        return None
    return {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}
        },
        "podSelector": {"matchLabels": dict(settings.operator_pod_labels)},
    }


def network_policy(
    *, cascade: str, namespace: str, spec: CascadeSpec, index: int, settings: OperatorSettings
) -> Manifest:
    """Who may reach a variant's port (generation and config API alike): the operator, the
    scrapers, the earlier stages of this cascade (a plan may skip a stage) and the cascade's
    router; without a router, the entry stage also takes its clients (any source unless
    settings.client_peers names them)."""
    variant = spec.variants[index].name
    peers: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": selector(cascade, earlier.name)}}
        for earlier in spec.variants[:index]
    ]
    if settings.router:
        # The router may send a prompt to any stage: the plan chooses the entry and heavy ones.
        peers.append({"podSelector": {"matchLabels": router_selector(cascade)}})
    operator = operator_peer(settings)
    if operator is not None:
        peers.append(operator)
    peers += [dict(p) for p in settings.scraper_peers]
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": settings.worker_port}]}
    if settings.router:
        rule["from"] = peers  # clients reach the stages through the router only
    elif index > 0 or settings.client_peers:
        rule["from"] = peers + [dict(p) for p in settings.client_peers]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": deployment_name(cascade, variant),
            "namespace": namespace,
            "labels": labels(cascade, variant),
        },
        "spec": {
            "podSelector": {"matchLabels": selector(cascade, variant)},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


def secret(*, cascade: str, namespace: str, token: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(cascade),
            "namespace": namespace,
            "labels": labels(cascade),
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def plan_data(
    plan: Plan, *, spec: CascadeSpec, router: RouterConfig | None = None
) -> dict[str, str]:
    """ConfigMap data: per variant threshold and batch size (read at pod start), the router's
    entry, heavy stage and share (read at router pod start) + the plan."""
    data: dict[str, str] = {}
    if router is not None:
        values = router.model_dump()
        for key, (_env, field) in ROUTER_KEYS.items():
            value = values[field]
            data[key] = (
                "" if value is None else f"{value:.6g}" if field == "router_share" else value
            )
    for allocation in plan.variants:
        threshold = allocation.threshold if allocation.threshold is not None else 0.0
        data[threshold_key(allocation.name)] = f"{threshold:.6g}"
        data[batch_size_key(allocation.name)] = str(allocation.batch_size)
    document = {
        "planId": plan_id(plan),
        "threshold": plan.threshold,
        "demandQps": plan.demand_qps,
        "sloSeconds": spec.slo_seconds,
        "variants": [
            {
                "name": a.name,
                "replicas": a.replicas,
                "batchSize": a.batch_size,
                "threshold": a.threshold,
            }
            for a in plan.variants
        ],
        "reason": plan.reason,
    }
    data[PLAN_KEY] = json.dumps(document, sort_keys=True)
    return data


def configmap(
    *,
    cascade: str,
    namespace: str,
    plan: Plan,
    spec: CascadeSpec,
    router: RouterConfig | None = None,
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(cascade),
            "namespace": namespace,
            "labels": labels(cascade),
            "annotations": {"diffcascade.dev/plan-id": plan_id(plan)},
        },
        "data": plan_data(plan, spec=spec, router=router),
    }


def children(
    *,
    cascade: str,
    namespace: str,
    spec: CascadeSpec,
    plan: Plan,
    replicas: Mapping[str, int],
    token: str,
    settings: OperatorSettings,
) -> list[Manifest]:
    """Every child, in creation order: Secret and ConfigMap before the pods that read them."""
    out = [
        secret(cascade=cascade, namespace=namespace, token=token),
        configmap(
            cascade=cascade,
            namespace=namespace,
            plan=plan,
            spec=spec,
            router=router_document(
                cascade=cascade, namespace=namespace, plan=plan, spec=spec, settings=settings
            ),
        ),
    ]
    for index, variant in enumerate(spec.variants):
        out.append(
            service(cascade=cascade, namespace=namespace, variant=variant.name, settings=settings)
        )
        if settings.network_policy:
            out.append(
                network_policy(
                    cascade=cascade, namespace=namespace, spec=spec, index=index, settings=settings
                )
            )
        out.append(disruption_budget(cascade=cascade, namespace=namespace, variant=variant.name))
        out.append(
            deployment(
                cascade=cascade,
                namespace=namespace,
                spec=spec,
                index=index,
                replicas=replicas.get(variant.name, 0),
                settings=settings,
            )
        )
    # After the stages: a router that starts first would answer 503 until they exist.
    out += router_children(cascade=cascade, namespace=namespace, spec=spec, settings=settings)
    return out


# --- the pre-generation router -----------------------------------------------------------------


def router_labels(cascade: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": ROUTER_NAME,
        "app.kubernetes.io/instance": cascade,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": ROUTER_ROLE,
        LABEL_CASCADE: cascade,
        LABEL_ROLE: ROUTER_ROLE,
    }


def router_selector(cascade: str) -> dict[str, str]:
    return {LABEL_CASCADE: cascade, LABEL_ROLE: ROUTER_ROLE}


def router_document(
    *,
    cascade: str,
    namespace: str,
    plan: Plan | None,
    spec: CascadeSpec,
    settings: OperatorSettings,
) -> RouterConfig | None:
    """What the router pods are told for `plan` (None when the operator runs no router)."""
    if not settings.router:
        return None
    from diffcascade_operator.router_config import router_config

    return router_config(
        plan,
        spec,
        stage_url=lambda variant: stage_url(
            cascade=cascade, namespace=namespace, variant=variant, port=settings.worker_port
        ),
        exploration=settings.router_exploration,
        scorer=settings.router_scorer,
        plan_id=None if plan is None else plan_id(plan),
    )


def router_deployment(
    *, cascade: str, namespace: str, spec: CascadeSpec, settings: OperatorSettings
) -> Manifest:
    """The router pods: the operator image (torch-free) running `diffcascade-worker route`.

    Entry stage, heavy stage and share come from the plan ConfigMap at start (a new pod routes
    by the latest plan before its first push); the operator pushes every later plan."""
    cm = configmap_name(cascade)
    port = settings.router_port
    stages = [
        stage_url(cascade=cascade, namespace=namespace, variant=v.name, port=settings.worker_port)
        for v in spec.variants
    ]
    env: list[dict[str, Any]] = [
        {
            "name": "DIFFCASCADE_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(cascade), "key": TOKEN_KEY}},
        },
        *(
            {"name": name, "valueFrom": {"configMapKeyRef": {"name": cm, "key": key}}}
            for key, (name, _field) in ROUTER_KEYS.items()
        ),
    ]
    args = [
        "route",
        "--cascade",
        cascade,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--exploration-share",
        f"{settings.router_exploration:g}",
        "--scorer",
        settings.router_scorer,
        "--drain-timeout",
        str(drain_seconds(spec)),
        *(arg for url in stages for arg in ("--allowed-stage", url)),
    ]
    if checks_keys(spec, None, settings):
        args += ["--api-keys", API_KEYS_DIR]  # the Secret, mounted below
    container: dict[str, Any] = {
        "name": "router",
        "image": settings.router_image,
        "command": ["diffcascade-worker"],
        "args": args,
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": _probe(PATH_READYZ, period=2, failures=1),
        "livenessProbe": _probe(PATH_HEALTHZ, period=10, failures=3, timeout=5),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "resources": {
            "requests": {
                "cpu": settings.router_cpu_request,
                "memory": settings.router_memory_request,
            }
        },
    }
    pod_spec = harden_pod(
        {
            "containers": [container],
            "terminationGracePeriodSeconds": grace_period_seconds(spec, settings),
        }
    )
    return _deployment(
        name=router_name(cascade),
        namespace=namespace,
        labels=router_labels(cascade),
        selector=router_selector(cascade),
        replicas=settings.router_replicas,
        port=port,
        pod_spec=add_api_keys(pod_spec, spec=spec, stage=None, settings=settings),
    )


def router_service(*, cascade: str, namespace: str, settings: OperatorSettings) -> Manifest:
    """`<cascade>`: the cascade's one stable URL, whatever stage the plan enters at."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": router_name(cascade),
            "namespace": namespace,
            "labels": router_labels(cascade),
        },
        "spec": {
            "selector": router_selector(cascade),
            "ports": [{"name": PORT_NAME, "port": settings.router_port, "targetPort": PORT_NAME}],
        },
    }


def router_disruption_budget(*, cascade: str, namespace: str) -> Manifest:
    """A drain takes one router pod at a time, so the entry URL keeps answering."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": router_name(cascade),
            "namespace": namespace,
            "labels": router_labels(cascade),
        },
        "spec": {
            "selector": {"matchLabels": router_selector(cascade)},
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def router_network_policy(*, cascade: str, namespace: str, settings: OperatorSettings) -> Manifest:
    """The router takes the clients (any source unless settings.client_peers names them),
    the operator (its plan pushes) and the scrapers."""
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": settings.router_port}]}
    if settings.client_peers:
        peers = [dict(p) for p in settings.client_peers]
        operator = operator_peer(settings)
        if operator is not None:
            peers.append(operator)
        rule["from"] = peers + [dict(p) for p in settings.scraper_peers]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": router_name(cascade),
            "namespace": namespace,
            "labels": router_labels(cascade),
        },
        "spec": {
            "podSelector": {"matchLabels": router_selector(cascade)},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


def router_children(
    *, cascade: str, namespace: str, spec: CascadeSpec, settings: OperatorSettings
) -> list[Manifest]:
    if not settings.router:
        return []
    out = [router_service(cascade=cascade, namespace=namespace, settings=settings)]
    if settings.network_policy:
        out.append(router_network_policy(cascade=cascade, namespace=namespace, settings=settings))
    out.append(router_disruption_budget(cascade=cascade, namespace=namespace))
    out.append(
        router_deployment(cascade=cascade, namespace=namespace, spec=spec, settings=settings)
    )
    return out
