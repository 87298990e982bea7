"""The unmodified operator (KopfRunner) under exactly the chart's RBAC: kmock answers 403 to
any request of the operator's that the rendered ClusterRole does not grant.

The static check (tests/packaging, every API call in the operator's code) says what the
operator can ask for; this one watches what it does ask for through a spec change that prunes
a variant, the case the chart once forgot. The test's own requests carry their own
User-Agent and are not authorized (they play the cluster admin).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from conftest import KUBECONFIG
from kmock_k8s import StampingEmulator, ThreadedKMock
from kopf._core.intents.registries import SmartOperatorRegistry
from kopf.testing import KopfRunner
from kube_env import (
    CRD_PATH,
    GROUP,
    HANDLERS,
    PLURAL,
    REPO,
    VERSION,
    Cluster,
    cascade_manifest,
    environment,
    operator_env,
    wait_for,
    write_kubeconfig,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")

pytestmark = pytest.mark.slow

ADMIN_AGENT = "diffcascade-rbac-test-admin"
Call = tuple[str, str, str]


def chart_rules() -> list[dict[str, Any]]:
    """The rules of the ClusterRole the chart renders by default (all namespaces)."""
    with helm.Chart.load(REPO / "helm" / "diffcascade") as chart:
        rendered = chart.render({}, name="dc", namespace="ops", is_install=True)
    docs = [
        d
        for name, text in rendered.items()
        if not name.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    [role] = [d for d in docs if d["kind"] == "ClusterRole"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def request_call(request: Any) -> Call | None:
    """(group, resource[/subresource], verb) of a request as RBAC sees it; None: discovery."""
    res = request.resource
    if res is None or request.action is None or not res.plural:
        return None
    action, method = request.action, str(request.method).upper()
    if action == kmock.action.UPDATE:
        verb = "patch" if method.endswith("PATCH") else "update"
    elif action == kmock.action.DELETE:
        verb = "delete" if request.name else "deletecollection"
    else:
        verb = {
            kmock.action.LIST: "list",
            kmock.action.WATCH: "watch",
            kmock.action.FETCH: "get",
            kmock.action.CREATE: "create",
        }[action]
    resource = res.plural + (f"/{request.subresource}" if request.subresource else "")
    return res.group or "", resource, verb


class AuthorizingEmulator(StampingEmulator):  # type: ignore[misc]
    rules: list[dict[str, Any]] = []
    seen: set[Call] = set()
    denied: list[str] = []

    async def _handle(self, request: Any) -> Any:
        agent = (request.headers or {}).get("User-Agent", "")
        call = request_call(request)
        if call is not None and agent != ADMIN_AGENT:
            group, resource, verb = call
            allowed = any(
                group in r.get("apiGroups", [])
                and resource in r.get("resources", [])
                and verb in r.get("verbs", [])
                for r in self.rules
            )
            self.seen.add(call)
            if not allowed:
                self.denied.append(f"{verb} {group}/{resource} {request.name or ''}")
                raise kmock.KubernetesError(
                    status=403, reason="Forbidden", message=f"RBAC: {call} is not granted"
                )
        return await super()._handle(request)


class AdminCluster(Cluster):
    def __init__(self) -> None:
        client = kubernetes.client.ApiClient()
        client.user_agent = ADMIN_AGENT
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.core = kubernetes.client.CoreV1Api(client)


@pytest.fixture(scope="module")
def authorizing_k8s() -> Iterator[ThreadedKMock]:
    AuthorizingEmulator.rules = chart_rules()
    with ThreadedKMock(AuthorizingEmulator) as srv:
        write_kubeconfig(KUBECONFIG, srv.url)
        crd = yaml.safe_load(CRD_PATH.read_text())
        srv.call(lambda emu: emu.register_crd(crd))
        kubernetes.config.load_kube_config(config_file=str(KUBECONFIG))
        yield srv


def _cascade() -> dict[str, Any]:
    manifest = cascade_manifest("tiny", models={"light": Path("/m/l"), "heavy": Path("/m/h")})
    gate = manifest["spec"]["variants"][0]["gate"]
    gate["deferCurve"] = {"thresholds": [0, 1], "deferFractions": [0, 1]}
    return manifest


def test_the_operator_never_asks_for_what_the_chart_does_not_grant(
    authorizing_k8s: ThreadedKMock,
) -> None:
    ns, admin = "rbac", AdminCluster()
    admin.create_cascade(ns, _cascade())
    AuthorizingEmulator.seen.clear()
    AuthorizingEmulator.denied.clear()
    with environment(operator_env(prometheus_url=None)):
        runner = KopfRunner(
            ["run", "--standalone", "--all-namespaces", str(HANDLERS)],
            timeout=60,
            registry=SmartOperatorRegistry(),
        )
        with runner:
            wait_for(lambda: admin.replicas(ns, "tiny-heavy") is not None, what="heavy")
            wait_for(lambda: admin.status(ns, "tiny").get("allocation"), what="a control step")
            spec = _cascade()["spec"]
            spec["variants"][1]["name"] = "heavy-b"  # the old heavy stage must be pruned
            admin.patch_spec(ns, "tiny", {"variants": spec["variants"]})
            wait_for(lambda: admin.events(ns, "ChildrenRemoved"), timeout=30, what="a prune")
            time.sleep(1.5)  # a few more control ticks under the new spec
            left = {d.metadata.name for d in admin.apps.list_namespaced_deployment(ns).items}
            admin.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "tiny")
            wait_for(
                lambda: (
                    not admin.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
                        "items"
                    ]
                ),
                what="the cascade released by Kopf",
            )
    assert runner.exception is None, runner.output[-2000:]
    assert AuthorizingEmulator.denied == [], AuthorizingEmulator.denied
    seen = AuthorizingEmulator.seen
    assert ("apps", "deployments", "delete") in seen  # the prune happened, and was allowed
    assert ("policy", "poddisruptionbudgets", "delete") in seen
    assert (GROUP, f"{PLURAL}/status", "patch") in seen or (GROUP, PLURAL, "patch") in seen
    assert left == {"tiny-light", "tiny-heavy-b", "tiny"}  # stages and the router
