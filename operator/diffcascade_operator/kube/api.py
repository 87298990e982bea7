"""The few Kubernetes calls the operator makes, behind one small class.

Children are created, or merge-patched when they exist, so applying them twice (a restart, a
resumed handler) never duplicates anything. A Deployment that exists keeps its replica count:
only the control loop sets replicas. An object is patched only when this cascade controls it
(its controller owner reference): a name that is taken by anything else is a `ChildConflict`,
and nothing is changed. Every call has a timeout, so a stalled connection to the apiserver
cannot hold a control loop.
"""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kubernetes
import urllib3

from diffcascade_operator.kube.manifests import LABEL_CASCADE, LABEL_VARIANT, TOKEN_KEY, Manifest
from diffcascade_operator.spec import API_GROUP, API_VERSION, KIND, PLURAL

logger = logging.getLogger(__name__)

#: What a call to the apiserver raises when it fails: an HTTP error status, or no answer at all
#: (refused, reset, timed out).
API_ERRORS: tuple[type[Exception], ...] = (
    kubernetes.client.ApiException,
    urllib3.exceptions.HTTPError,
)
#: (connect, read) seconds of every call that does not set its own.
DEFAULT_TIMEOUT_S = (5.0, 15.0)


def api_error_text(exc: BaseException) -> str:
    """One line for a status condition or a log: the HTTP status and reason, or the error."""
    if isinstance(exc, kubernetes.client.ApiException):
        return f"Kubernetes API: {exc.status} {exc.reason}"
    return f"Kubernetes API: {type(exc).__name__}: {exc}"[:500]


class ChildConflict(Exception):
    """Objects with the names of this cascade's children exist and belong to something else."""

    def __init__(self, conflicts: list[str]) -> None:
        self.conflicts = conflicts
        super().__init__("; ".join(conflicts))


def controller_ref(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The controlling owner reference of an object (as a camelCase dict), or None."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return cast(Mapping[str, Any], ref)
    return None


def same_controller(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether `existing` is controlled by the owner `wanted` names: the same object (uid), or
    a DiffusionCascade of the same name in the same namespace (an earlier incarnation of it,
    whose children the garbage collector has not removed yet)."""
    ref = controller_ref(existing)
    if ref is None:
        return False
    if ref.get("uid") == wanted.get("uid"):
        return True
    return (
        ref.get("kind") == KIND == wanted.get("kind")
        and str(ref.get("apiVersion", "")).split("/")[0] == API_GROUP
        and ref.get("name") == wanted.get("name")
    )


def describe_conflict(manifest: Mapping[str, Any], existing: Mapping[str, Any]) -> str:
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    ref = controller_ref(existing)
    whose = (
        "has no controlling owner"
        if ref is None
        else f"is controlled by {ref.get('kind')}/{ref.get('name')}"
    )
    return f"{kind} {name} already exists and {whose}"


def secret_token(secret: Mapping[str, Any] | None) -> str | None:
    """The config-API token held by a Secret (as a plain dict), or None."""
    if secret is None:
        return None
    encoded = (secret.get("data") or {}).get(TOKEN_KEY)
    if encoded:
        return base64.b64decode(encoded).decode()
    # An emulator (or a just-created object) may still hold stringData only.
    token = (secret.get("stringData") or {}).get(TOKEN_KEY)
    return str(token) if token else None


class _TimeoutRest(kubernetes.client.rest.RESTClientObject):  # type: ignore[misc]
    """The client's HTTP layer, with a timeout on every request that sets none."""

    def __init__(
        self, configuration: kubernetes.client.Configuration, timeout_s: tuple[float, float]
    ) -> None:
        super().__init__(configuration)
        self.timeout_s = timeout_s

    def request(  # type: ignore[no-untyped-def]
        self, method, url, headers=None, body=None, post_params=None, _request_timeout=None
    ):
        return super().request(  # type: ignore[no-untyped-call]
            method,
            url,
            headers=headers,
            body=body,
            post_params=post_params,
            _request_timeout=_request_timeout or self.timeout_s,
        )


class TimeoutApiClient(kubernetes.client.ApiClient):
    """An ApiClient whose requests time out (connect, read seconds) unless they say otherwise."""

    def __init__(
        self,
        configuration: kubernetes.client.Configuration | None = None,
        *,
        timeout_s: tuple[float, float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(configuration)
        self.rest_client = _TimeoutRest(self.configuration, timeout_s)


def load_config() -> None:
    """In-cluster service account first, then the kubeconfig (what Kopf itself logs in with)."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]


class KubeApi:
    def __init__(
        self,
        client: kubernetes.client.ApiClient | None = None,
        *,
        timeout_s: tuple[float, float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.client = client or TimeoutApiClient(timeout_s=timeout_s)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.policy = kubernetes.client.PolicyV1Api(self.client)
        self.networking = kubernetes.client.NetworkingV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    # --- the cascade's own status -----------------------------------------------------------

    def patch_status(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        """Merge-patch the cascade's status (the operator writes it itself: see handlers)."""
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": dict(fields)}
        )

    # --- children -------------------------------------------------------------------------

    def read(self, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """The object a manifest names, as the apiserver has it (camelCase), or None."""
        ns, name, kind = (
            manifest["metadata"]["namespace"],
            manifest["metadata"]["name"],
            manifest["kind"],
        )
        readers = {
            "Deployment": self.apps.read_namespaced_deployment,
            "Service": self.core.read_namespaced_service,
            "Secret": self.core.read_namespaced_secret,
            "ConfigMap": self.core.read_namespaced_config_map,
            "PodDisruptionBudget": self.policy.read_namespaced_pod_disruption_budget,
            "NetworkPolicy": self.networking.read_namespaced_network_policy,
        }
        if kind not in readers:
            raise ValueError(f"cannot read a {kind}")
        try:
            return self._plain(readers[kind](name, ns))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def existing(self, children: Iterable[Manifest]) -> dict[str, dict[str, Any] | None]:
        """What exists of `children`, by `Kind/name`; ChildConflict if any of it is not
        controlled by the owner the manifests name (then nothing may be applied)."""
        found: dict[str, dict[str, Any] | None] = {}
        conflicts: list[str] = []
        for child in children:
            obj = self.read(child)
            found[f"{child['kind']}/{child['metadata']['name']}"] = obj
            if obj is not None and not same_controller(obj, _wanted_owner(child)):
                conflicts.append(describe_conflict(child, obj))
        if conflicts:
            raise ChildConflict(conflicts)
        return found

    def _create(self, manifest: Manifest) -> None:
        ns, kind = manifest["metadata"]["namespace"], manifest["kind"]
        if kind == "Deployment":
            self.apps.create_namespaced_deployment(ns, cast(Any, manifest))
        elif kind == "Service":
            self.core.create_namespaced_service(ns, cast(Any, manifest))
        elif kind == "Secret":
            self.core.create_namespaced_secret(ns, cast(Any, manifest))
        elif kind == "ConfigMap":
            self.core.create_namespaced_config_map(ns, cast(Any, manifest))
        elif kind == "PodDisruptionBudget":
            self.policy.create_namespaced_pod_disruption_budget(ns, cast(Any, manifest))
        elif kind == "NetworkPolicy":
            self.networking.create_namespaced_network_policy(ns, cast(Any, manifest))
        else:
            raise ValueError(f"cannot create a {kind}")

    def _patch(self, manifest: Manifest) -> None:
        ns, name, kind = (
            manifest["metadata"]["namespace"],
            manifest["metadata"]["name"],
            manifest["kind"],
        )
        if kind == "Deployment":
            self.apps.patch_namespaced_deployment(name, ns, manifest)
        elif kind == "Service":
            self.core.patch_namespaced_service(name, ns, manifest)
        elif kind == "Secret":
            self.core.patch_namespaced_secret(name, ns, manifest)
        elif kind == "ConfigMap":
            self.core.patch_namespaced_config_map(name, ns, manifest)
        elif kind == "PodDisruptionBudget":
            self.policy.patch_namespaced_pod_disruption_budget(name, ns, manifest)
        elif kind == "NetworkPolicy":
            self.networking.patch_namespaced_network_policy(name, ns, manifest)
        else:
            raise ValueError(f"cannot patch a {kind}")

    def apply(self, manifest: Manifest, *, existing: Mapping[str, Any] | None = None) -> str:
        """Create, or patch what exists and is controlled by the manifest's owner; returns
        'created' or 'patched'. `existing`: the object as just read (None: not there, or
        unknown). An object controlled by anything else raises ChildConflict, untouched."""
        wanted = _wanted_owner(manifest)
        if existing is None:
            try:
                self._create(manifest)
                return "created"
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise
            existing = self.read(manifest)
            if existing is None:  # created and deleted by someone else meanwhile: try again later
                raise kubernetes.client.ApiException(status=409, reason="Conflict")
        if not same_controller(existing, wanted):
            raise ChildConflict([describe_conflict(manifest, existing)])
        patch = copy.deepcopy(manifest)
        if patch["kind"] == "Deployment":
            patch["spec"].pop("replicas", None)  # the control loop owns replicas
        elif patch["kind"] == "Secret":
            patch.pop("stringData", None)  # the token is generated once and kept
            patch.pop("data", None)
        self._patch(patch)
        return "patched"

    def read_token(self, namespace: str, name: str, *, owner: Mapping[str, Any]) -> str | None:
        """The token of the cascade's Secret; None when it is missing or not the cascade's
        own (a Secret of that name made by anyone else is never read)."""
        try:
            secret = self._plain(self.core.read_namespaced_secret(name, namespace))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if not same_controller(secret, owner):
            return None
        return secret_token(secret)

    def prune(self, namespace: str, cascade: str, *, owner_uid: str, keep: set[str]) -> list[str]:
        """Delete this cascade's per-variant children of variants no longer in its spec.

        Only children whose controlling owner is `owner_uid`; labels are matched here too, so
        a server that ignores label selectors cannot widen the deletion.
        """
        selector = f"{LABEL_CASCADE}={cascade}"
        deleted: list[str] = []
        kinds = (
            (
                "Deployment",
                self.apps.list_namespaced_deployment,
                self.apps.delete_namespaced_deployment,
            ),
            ("Service", self.core.list_namespaced_service, self.core.delete_namespaced_service),
            (
                "PodDisruptionBudget",
                self.policy.list_namespaced_pod_disruption_budget,
                self.policy.delete_namespaced_pod_disruption_budget,
            ),
            (
                "NetworkPolicy",
                self.networking.list_namespaced_network_policy,
                self.networking.delete_namespaced_network_policy,
            ),
        )
        for kind, list_fn, delete_fn in kinds:
            for item in list_fn(namespace, label_selector=selector).items:
                md = item.metadata
                if md is None or md.name is None:
                    continue
                labels = md.labels or {}
                refs = md.owner_references or []
                variant = labels.get(LABEL_VARIANT)
                if (
                    labels.get(LABEL_CASCADE) == cascade
                    and variant is not None
                    and variant not in keep
                    and any(r.uid == owner_uid and r.controller for r in refs)
                ):
                    delete_fn(md.name, namespace)
                    deleted.append(f"{kind}/{md.name}")
        return deleted

    # --- control loop ---------------------------------------------------------------------

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment(name, namespace, {"spec": {"replicas": replicas}})

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})

    def patch_configmap_data(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.core.patch_namespaced_config_map(name, namespace, body)

    # --- profiling Jobs (kube.profiling) --------------------------------------------------

    def _plain(self, obj: Any) -> dict[str, Any]:
        """A client model as the JSON dict the API server sent (camelCase keys)."""
        plain = self.client.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return cast(dict[str, Any], plain)

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded (the storage Secret of a remote curve file); None if absent."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        raw = getattr(secret, "string_data", None) or {}  # an emulator may keep stringData
        return {**{str(k): str(v) for k, v in raw.items()}, **data}

    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(self.core.read_namespaced_config_map(name, namespace))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        batch = kubernetes.client.BatchV1Api(self.client)
        try:
            return self._plain(batch.read_namespaced_job(name, namespace))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_job(self, manifest: Manifest) -> None:
        """Create a Job; one that exists already (a restart between create and read) is kept."""
        batch = kubernetes.client.BatchV1Api(self.client)
        try:
            batch.create_namespaced_job(manifest["metadata"]["namespace"], cast(Any, manifest))
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The Job's pods (label `job-name`, set by the Job controller; matched here too)."""
        selector = f"job-name={job}"
        items = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        pods = [self._plain(p) for p in items]
        return [
            p
            for p in pods
            if ((p.get("metadata") or {}).get("labels") or {}).get("job-name") == job
        ]


def _wanted_owner(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = controller_ref(manifest)
    if ref is None:
        raise ValueError(
            f"{manifest['kind']} {manifest['metadata']['name']} has no controller owner: "
            "children are applied only with their cascade's owner reference (kopf.adopt)"
        )
    return ref
