"""Applying children against the emulated API: idempotent, replicas and token preserved, and
only ever to objects the cascade controls."""

from __future__ import annotations

import socket
import time
from typing import Any

import kubernetes
import pytest
from diffcascade_operator.kube.api import API_ERRORS, ChildConflict, KubeApi, TimeoutApiClient
from kmock_k8s import ThreadedKMock
from kube_env import Cluster, adopted
from test_kube_manifests import _children, _plan


def test_applying_twice_patches_in_place_keeping_replicas_and_the_token(
    k8s: ThreadedKMock,
) -> None:
    api, cluster = KubeApi(), Cluster()
    first = adopted(_children(_plan(1, 1, 0.1)).values(), namespace="apply")
    results = [api.apply(c) for c in first]
    uid = cluster.apps.read_namespaced_deployment("c-light", "apply").metadata.uid
    api.scale("apply", "c-light", 3)  # the control loop's doing

    again = _children(_plan(1, 1, 0.2))
    again["Secret/c-token"]["stringData"] = {"token": "another"}
    results_again = [api.apply(c) for c in adopted(again.values(), namespace="apply")]

    dep = cluster.apps.read_namespaced_deployment("c-light", "apply")
    assert set(results) == {"created"} and set(results_again) == {"patched"}
    assert dep.metadata.uid == uid
    assert dep.spec.replicas == 3
    owner = {"kind": "DiffusionCascade", "name": "c", "uid": "owner-uid"}
    assert api.read_token("apply", "c-token", owner=owner) == "t0k"
    assert api.read_token("apply", "missing-token", owner=owner) is None
    assert len(cluster.apps.list_namespaced_deployment("apply").items) == 3  # 2 stages, router


def test_pruning_removes_only_dropped_variants_owned_by_this_cascade(k8s: ThreadedKMock) -> None:
    api, cluster, ns = KubeApi(), Cluster(), "prune"
    for child in adopted(_children(_plan(1, 1, 0.1)).values(), namespace=ns):
        api.apply(child)
    foreign = _children(_plan(1, 1, 0.1))["Deployment/c-heavy"]
    foreign["metadata"].update(namespace=ns, name="c-heavy-manual")
    cluster.apps.create_namespaced_deployment(ns, foreign)  # same labels, no owner: survives

    removed = api.prune(ns, "c", owner_uid="owner-uid", keep={"light"})

    names = {d.metadata.name for d in cluster.apps.list_namespaced_deployment(ns).items}
    assert sorted(removed) == [
        "Deployment/c-heavy",
        "NetworkPolicy/c-heavy",
        "PodDisruptionBudget/c-heavy",
        "Service/c-heavy",
    ]
    assert names == {"c-light", "c-heavy-manual", "c"}  # the router is no variant: it stays


# --- names taken by someone else (issue 16) ---------------------------------------------------


def _foreign_service(cluster: Cluster, ns: str, name: str) -> None:
    cluster.core.create_namespaced_service(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": {"app": "payments"}},
            "spec": {
                "selector": {"app": "payments"},
                "ports": [{"name": "https", "port": 443, "targetPort": 8443}],
            },
        },
    )


def test_an_object_the_cascade_does_not_control_is_never_patched(k8s: ThreadedKMock) -> None:
    api, cluster, ns = KubeApi(), Cluster(), "taken"
    _foreign_service(cluster, ns, "c-light")
    before = cluster.core.read_namespaced_service("c-light", ns).to_dict()
    children = adopted(_children(_plan(1, 1, 0.1)).values(), namespace=ns)
    service = next(
        c for c in children if c["kind"] == "Service" and c["metadata"]["name"] == "c-light"
    )

    with pytest.raises(ChildConflict) as caught:
        api.existing(children)
    with pytest.raises(ChildConflict):
        api.apply(service)  # the create-then-409 path checks the owner too

    assert caught.value.conflicts == ["Service c-light already exists and has no controlling owner"]
    after = cluster.core.read_namespaced_service("c-light", ns).to_dict()
    assert after["spec"] == before["spec"] and after["metadata"]["labels"] == {"app": "payments"}
    assert after["metadata"]["owner_references"] is None


def _renamed(cascade: str, variant: str) -> list[dict[str, Any]]:
    """Variant `light`'s Deployment, Service, PDB and NetworkPolicy, named `cascade-variant`."""
    children = [
        c for c in _children(_plan(1, 1, 0.1)).values() if c["metadata"]["name"] == "c-light"
    ]
    for child in children:
        child["metadata"]["name"] = f"{cascade}-{variant}"
    return children


def test_another_cascades_child_is_a_conflict_an_earlier_same_named_cascades_is_not(
    k8s: ThreadedKMock,
) -> None:
    api, ns = KubeApi(), "collide"
    # Cascade `a` with variant `b-light` and cascade `a-b` with variant `light` both name their
    # Deployment, Service, PDB and NetworkPolicy `a-b-light`.
    for child in adopted(_renamed("a", "b-light"), namespace=ns, cascade="a", uid="u1"):
        assert api.apply(child) == "created"

    with pytest.raises(ChildConflict) as caught:
        api.existing(adopted(_renamed("a-b", "light"), namespace=ns, cascade="a-b", uid="u2"))

    assert len(caught.value.conflicts) == 4
    assert "Deployment a-b-light already exists and is controlled by DiffusionCascade/a" in str(
        caught.value
    )
    # Cascade `a` deleted and created again (a new uid) before the garbage collector removed
    # its children: they are its own.
    again = adopted(_renamed("a", "b-light"), namespace=ns, cascade="a", uid="u3")
    assert all(obj is not None for obj in api.existing(again).values())
    assert {api.apply(c) for c in again} == {"patched"}


def test_the_token_is_read_only_from_the_cascades_own_secret(k8s: ThreadedKMock) -> None:
    api, cluster, ns = KubeApi(), Cluster(), "tokens"
    cluster.core.create_namespaced_secret(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "c-token"},
            "stringData": {"token": "someone-elses"},
        },
    )
    owner = {"kind": "DiffusionCascade", "name": "c", "uid": "owner-uid"}
    assert api.read_token(ns, "c-token", owner=owner) is None


def test_a_call_to_an_apiserver_that_never_answers_times_out() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    config.retries = False
    api = KubeApi(TimeoutApiClient(config, timeout_s=(0.5, 0.5)))
    started = time.monotonic()
    try:
        with pytest.raises(API_ERRORS):
            api.apps.read_namespaced_deployment("any", "timeouts")
    finally:
        silent.close()
    assert time.monotonic() - started < 5
