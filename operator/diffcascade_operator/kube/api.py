"""The few Kubernetes calls the operator makes, behind one small class.

Children are created, or merge-patched when they exist, so applying them twice (a restart, a
resumed handler) never duplicates anything. A Deployment that exists keeps its replica count:
only the control loop sets replicas.
"""

from __future__ import annotations

import base64
import copy
import logging
from typing import Any, cast

import kubernetes

from diffcascade_operator.kube.manifests import LABEL_CASCADE, LABEL_VARIANT, TOKEN_KEY, Manifest

logger = logging.getLogger(__name__)


def load_config() -> None:
    """In-cluster service account first, then the kubeconfig (what Kopf itself logs in with)."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]


class KubeApi:
    def __init__(self, client: kubernetes.client.ApiClient | None = None) -> None:
        self.client = client or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self.policy = kubernetes.client.PolicyV1Api(self.client)
        self.networking = kubernetes.client.NetworkingV1Api(self.client)

    # --- children -------------------------------------------------------------------------

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

    def apply(self, manifest: Manifest) -> str:
        """Create, or patch what exists; returns 'created' or 'patched'."""
        try:
            self._create(manifest)
            return "created"
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        patch = copy.deepcopy(manifest)
        if patch["kind"] == "Deployment":
            patch["spec"].pop("replicas", None)  # the control loop owns replicas
        elif patch["kind"] == "Secret":
            patch.pop("stringData", None)  # the token is generated once and kept
            patch.pop("data", None)
        self._patch(patch)
        return "patched"

    def read_token(self, namespace: str, name: str) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        encoded = (secret.data or {}).get(TOKEN_KEY)
        if encoded:
            return base64.b64decode(encoded).decode()
        # An emulator (or a just-created object) may still hold stringData only.
        raw = getattr(secret, "string_data", None) or {}
        token = raw.get(TOKEN_KEY)
        return str(token) if token else None

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
