"""Applying children against the emulated API: idempotent, replicas and token preserved."""

from __future__ import annotations

import kopf
from diffcascade_operator.kube.api import KubeApi
from kmock_k8s import ThreadedKMock
from kube_env import Cluster
from test_kube_manifests import _children, _plan


def test_applying_twice_patches_in_place_keeping_replicas_and_the_token(
    k8s: ThreadedKMock,
) -> None:
    api, cluster = KubeApi(), Cluster()
    first = _children(_plan(1, 1, 0.1))
    for child in first.values():
        child["metadata"]["namespace"] = "apply"
    results = [api.apply(c) for c in first.values()]
    uid = cluster.apps.read_namespaced_deployment("c-light", "apply").metadata.uid
    api.scale("apply", "c-light", 3)  # the control loop's doing

    again = _children(_plan(1, 1, 0.2))
    for child in again.values():
        child["metadata"]["namespace"] = "apply"
    again["Secret/c-token"]["stringData"] = {"token": "another"}
    results_again = [api.apply(c) for c in again.values()]

    dep = cluster.apps.read_namespaced_deployment("c-light", "apply")
    assert set(results) == {"created"} and set(results_again) == {"patched"}
    assert dep.metadata.uid == uid
    assert dep.spec.replicas == 3
    assert api.read_token("apply", "c-token") == "t0k"
    assert api.read_token("apply", "missing-token") is None
    assert len(cluster.apps.list_namespaced_deployment("apply").items) == 3  # 2 stages, router


def test_pruning_removes_only_dropped_variants_owned_by_this_cascade(k8s: ThreadedKMock) -> None:
    api, cluster, ns = KubeApi(), Cluster(), "prune"
    owner = {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": "c", "namespace": ns, "uid": "owner-uid"},
    }
    children = list(_children(_plan(1, 1, 0.1)).values())
    for child in children:
        child["metadata"]["namespace"] = ns
    kopf.adopt(children, owner=owner)  # type: ignore[arg-type]
    for child in children:
        api.apply(child)
    foreign = _children(_plan(1, 1, 0.1))["Deployment/c-heavy"]
    foreign["metadata"].update(namespace=ns, name="c-heavy-manual")
    api.apply(foreign)  # same labels, no owner: must survive

    removed = api.prune(ns, "c", owner_uid="owner-uid", keep={"light"})

    names = {d.metadata.name for d in cluster.apps.list_namespaced_deployment(ns).items}
    assert sorted(removed) == [
        "Deployment/c-heavy",
        "NetworkPolicy/c-heavy",
        "PodDisruptionBudget/c-heavy",
        "Service/c-heavy",
    ]
    assert names == {"c-light", "c-heavy-manual", "c"}  # the router is no variant: it stays
