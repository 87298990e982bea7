"""A cascade never takes over an object by name, and names its children validly (issue 16).

The operator used to patch any existing object with a child's name and make the cascade its
controlling owner: cascade `payments` with variant `api` rewrote Service `payments-api`,
cascade `default` with variant `deny` turned NetworkPolicy `default-deny` into an allow rule,
cascade `hf` adopted Secret `hf-token` (and deleting the cascade would have let the garbage
collector delete them). Emulator gap: kmock runs no garbage collector, so what deletion would
do is checked through owner references.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from diffcascade_operator.kube import reconcile
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.kube.settings import OperatorSettings
from kmock_k8s import ThreadedKMock
from kopf._core.intents.registries import SmartOperatorRegistry
from kopf.testing import KopfRunner
from kube_env import HANDLERS, Cluster, cascade_manifest, environment, operator_env, wait_for

MODELS = {"light": Path("/models/light"), "heavy": Path("/models/heavy")}
SETTINGS = OperatorSettings()
LOGS = Path(tempfile.gettempdir()) / "diffcascade-operator-tests"


def _curve_inline(manifest: dict[str, Any]) -> dict[str, Any]:
    """The kube_env cascade with an inline curve (no file to read) and named variants."""
    gate = manifest["spec"]["variants"][0].setdefault("gate", {})
    gate["deferCurve"] = {"thresholds": [0.0, 1.0], "deferFractions": [0.0, 1.0]}
    return manifest


def _cascade(cluster: Cluster, ns: str, name: str, first_variant: str = "light") -> dict[str, Any]:
    manifest = _curve_inline(cascade_manifest(name, models=MODELS))
    manifest["spec"]["variants"][0]["name"] = first_variant
    cluster.create_cascade(ns, manifest)
    return cluster.cascade(ns, name)


def _foreign_objects(cluster: Cluster, ns: str) -> None:
    """What another team had in the namespace before any cascade."""
    cluster.core.create_namespaced_service(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "payments-api", "labels": {"app": "payments"}},
            "spec": {
                "selector": {"app": "payments"},
                "ports": [{"name": "https", "port": 443, "targetPort": 8443}],
            },
        },
    )
    cluster.core.create_namespaced_secret(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hf-token"},
            "stringData": {"HF_TOKEN": "hf_secret", "token": "not-yours"},
        },
    )
    kubernetes.client.NetworkingV1Api().create_namespaced_network_policy(
        ns,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []},
        },
    )


def _foreign_state(cluster: Cluster, ns: str) -> dict[str, Any]:
    net = kubernetes.client.NetworkingV1Api()
    objects = {
        "Service/payments-api": cluster.core.read_namespaced_service("payments-api", ns),
        "Secret/hf-token": cluster.core.read_namespaced_secret("hf-token", ns),
        "NetworkPolicy/default-deny": net.read_namespaced_network_policy("default-deny", ns),
    }
    return {
        key: {
            "labels": obj.metadata.labels,
            "owners": obj.metadata.owner_references,
            "spec": obj.spec.to_dict() if getattr(obj, "spec", None) else None,
            "data": getattr(obj, "string_data", None) or getattr(obj, "data", None),
        }
        for key, obj in objects.items()
    }


@contextlib.contextmanager
def _keep_log(runner: KopfRunner, name: str) -> Iterator[None]:
    try:
        yield
    finally:
        LOGS.mkdir(exist_ok=True)
        (LOGS / f"operator-{name}-{time.time():.0f}.log").write_text(runner.output)


def _conditions(fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in fields["conditions"]}


def test_a_cascade_whose_child_name_is_taken_changes_nothing_and_says_so(
    k8s: ThreadedKMock,
) -> None:
    cluster, ns = Cluster(), "conflict-unit"
    _foreign_objects(cluster, ns)
    before = _foreign_state(cluster, ns)
    body = _cascade(cluster, ns, "payments", first_variant="api")
    state = reconcile.new_state(SETTINGS)

    fields, events = reconcile.apply_children(
        api=KubeApi(), body=body, state=state, settings=SETTINGS, now=1.0
    )
    outcome = reconcile.control_step(
        api=KubeApi(),
        body={**body, "status": fields},
        state=state,
        pods=[],
        deployment_replicas={},
        settings=SETTINGS,
        now=2.0,
    )

    conditions = _conditions(fields)
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == conditions["Degraded"]["reason"] == "NameConflict"
    assert (
        "Service payments-api already exists and has no controlling owner"
        in (conditions["Ready"]["message"])
    )
    [(kind, reason, message)] = events
    assert (kind, reason) == ("Warning", "NameConflict") and "payments-api" in message
    assert outcome is not None and outcome.events == []  # told once, not on every step
    assert _conditions(outcome.status)["Ready"]["reason"] == "NameConflict"
    assert _foreign_state(cluster, ns) == before
    # Nothing of the cascade's was created either (the check comes before any write).
    assert cluster.apps.list_namespaced_deployment(ns).items == []
    assert [s.metadata.name for s in cluster.core.list_namespaced_secret(ns).items] == ["hf-token"]


@pytest.mark.parametrize(
    ("name", "variant", "says"),
    [
        ("1abc", "light", "must start with a lowercase letter"),
        ("my.cascade", "light", "no dots"),
        ("a" * 64, "light", "at most 63 characters"),
        ("a" * 30, "l" * 40, "must fit in 63"),
    ],
    ids=["digit-first", "dotted", "64-characters", "cascade-plus-variant-71"],
)
def test_a_name_the_children_cannot_carry_is_invalid_and_creates_nothing(
    k8s: ThreadedKMock, name: str, variant: str, says: str
) -> None:
    cluster, ns = Cluster(), "names"
    body = _cascade(cluster, ns, name, first_variant=variant)
    state = reconcile.new_state(SETTINGS)

    fields, events = reconcile.apply_children(
        api=KubeApi(), body=body, state=state, settings=SETTINGS, now=1.0
    )

    ready = _conditions(fields)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert says in ready["message"]
    assert [(k, r) for k, r, _ in events] == [("Warning", "InvalidSpec")]
    assert cluster.apps.list_namespaced_deployment(ns).items == []


@pytest.mark.slow
def test_the_operator_adopts_nothing_it_does_not_own(k8s: ThreadedKMock) -> None:
    """The attack's reproduction with the unmodified operator: three cascades whose children
    would be named like existing objects, and two cascades whose children collide."""
    cluster, ns = Cluster(), "team"
    _foreign_objects(cluster, ns)
    before = _foreign_state(cluster, ns)
    env = operator_env(prometheus_url=None, tick=0.5)
    with environment(env):
        runner = KopfRunner(
            ["run", "--standalone", "--all-namespaces", str(HANDLERS)],
            timeout=60,
            registry=SmartOperatorRegistry(),
        )
        with _keep_log(runner, "name-conflicts"), runner:
            _cascade(cluster, ns, "payments", first_variant="api")
            _cascade(cluster, ns, "hf", first_variant="light")
            _cascade(cluster, ns, "default", first_variant="deny")
            _cascade(cluster, ns, "a", first_variant="b-light")
            wait_for(lambda: cluster.replicas(ns, "a-b-light"), what="cascade a's children")
            _cascade(cluster, ns, "a-b", first_variant="light")

            def refused(name: str) -> dict[str, Any] | None:
                ready = cluster.condition(ns, name, "Ready")
                return ready if ready and ready["reason"] == "NameConflict" else None

            refusals = {
                n: wait_for(lambda n=n: refused(n)) for n in ("payments", "hf", "default", "a-b")
            }
            time.sleep(2)  # a few control steps: they must leave everything alone as well
            after = _foreign_state(cluster, ns)
            events = {e.involved_object.name for e in cluster.events(ns, "NameConflict")}
            a_uid = cluster.cascade(ns, "a")["metadata"]["uid"]
            a_light = cluster.apps.read_namespaced_deployment("a-b-light", ns)
            for name in ("payments", "hf", "default", "a", "a-b"):
                cluster.delete_cascade(ns, name)
    assert after == before
    assert "Service payments-api" in refusals["payments"]["message"]
    assert "Secret hf-token" in refusals["hf"]["message"]
    assert "NetworkPolicy default-deny" in refusals["default"]["message"]
    assert (
        "Deployment a-b-light already exists and is controlled by DiffusionCascade/a"
        in (refusals["a-b"]["message"])
    )
    assert events == {"payments", "hf", "default", "a-b"}
    assert [r.uid for r in a_light.metadata.owner_references] == [a_uid]
