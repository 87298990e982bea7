"""Rendering children: pure functions, so plain asserts on the dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffcascade_operator.kube import manifests
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation
from diffcascade_operator.spec import CascadeSpec, parse_spec
from kube_env import cascade_manifest

MODELS = {"light": Path("/models/light"), "heavy": Path("/models/heavy")}
SETTINGS = OperatorSettings()


def _spec(**control: Any) -> CascadeSpec:
    raw = cascade_manifest("c", models=MODELS)["spec"]
    raw["variants"][0]["gate"]["deferCurve"] = {"thresholds": [0, 1], "deferFractions": [0, 1]}
    raw["control"].update(control)
    return parse_spec(raw)


def _plan(light: int, heavy: int, threshold: float, batch: int = 1) -> Plan:
    return Plan(
        variants=(
            VariantAllocation("light", light, batch, threshold),
            VariantAllocation("heavy", heavy, batch, None),
        ),
        threshold=threshold,
        defer_fraction=0.5,
        demand_qps=1.0,
        predicted_latency_s=1.0,
        predicted_throughput_qps=2.0,
        predicted_fid=17.0,
        solver=SolverOutcome(SolverStatus.OPTIMAL, 1.0),
        reason="test",
        decided_at=0.0,
    )


def _children(plan: Plan, spec: CascadeSpec | None = None) -> dict[str, dict[str, Any]]:
    rendered = manifests.children(
        cascade="c",
        namespace="ns",
        spec=spec or _spec(),
        plan=plan,
        replicas=plan.replicas(),
        token="t0k",
        settings=SETTINGS,
    )
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in rendered}


def test_a_new_plan_changes_replicas_and_configmap_but_never_the_pod_template() -> None:
    low, high = _children(_plan(1, 1, 0.09)), _children(_plan(2, 3, 0.05, batch=2))
    for variant in ("light", "heavy"):
        key = f"Deployment/c-{variant}"
        assert low[key]["spec"]["template"] == high[key]["spec"]["template"]
    assert low["Deployment/c-light"]["spec"]["replicas"] == 1
    assert high["Deployment/c-heavy"]["spec"]["replicas"] == 3
    assert low["ConfigMap/c-plan"]["data"]["light.threshold"] == "0.09"
    assert high["ConfigMap/c-plan"]["data"]["light.threshold"] == "0.05"
    assert high["ConfigMap/c-plan"]["data"]["heavy.batchSize"] == "2"


def test_worker_pods_get_gpus_probes_drain_and_a_grace_period_above_two_slos() -> None:
    dep = _children(_plan(1, 1, 0.1))["Deployment/c-light"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["failureThreshold"] * 10 >= 600
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > 2 * 5  # sloSeconds = 5
    assert "--drain-timeout=10" in container["args"]
    env = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    assert env["DIFFCASCADE_TOKEN"]["secretKeyRef"]["name"] == "c-token"
    assert env["DIFFCASCADE_THRESHOLD"]["configMapKeyRef"] == {
        "name": "c-plan",
        "key": "light.threshold",
    }
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_stages_are_labelled_selected_and_chained_through_services() -> None:
    children = _children(_plan(1, 1, 0.1))
    light, heavy = children["Deployment/c-light"], children["Deployment/c-heavy"]
    labels = light["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "diffcascade-operator"
    assert labels["app.kubernetes.io/component"] == "light"
    assert light["spec"]["selector"]["matchLabels"] == {
        "diffcascade.dev/cascade": "c",
        "diffcascade.dev/variant": "light",
    }
    light_args = light["spec"]["template"]["spec"]["containers"][0]["args"]
    heavy_args = heavy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--next-stage-url=http://c-heavy.ns.svc:8000" in light_args
    assert not any(a.startswith("--next-stage-url") for a in heavy_args)
    assert any(a.startswith("--gate=") for a in light_args)
    assert children["Service/c-heavy"]["spec"]["selector"]["diffcascade.dev/variant"] == "heavy"
    assert children["Secret/c-token"]["stringData"] == {"token": "t0k"}


@pytest.mark.parametrize("gpus", [0, 2])
def test_gpu_limit_follows_gpus_per_replica(gpus: int) -> None:
    raw = cascade_manifest("c", models=MODELS)["spec"]
    raw["variants"][0]["gate"]["deferCurve"] = {"thresholds": [0, 1], "deferFractions": [0, 1]}
    raw["variants"][1]["gpusPerReplica"] = gpus
    raw["variants"][1]["maxReplicas"] = 4  # gpusPerReplica 0 needs it
    raw["variants"][1]["resources"] = {"requests": {"memory": "8Gi", "cpu": 2}}
    dep = _children(_plan(1, 1, 0.1), parse_spec(raw))["Deployment/c-heavy"]
    resources = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"memory": "8Gi", "cpu": "2"}
    assert resources.get("limits", {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_plan_id_ignores_replicas_and_follows_what_workers_are_told() -> None:
    assert manifests.plan_id(_plan(1, 1, 0.1)) == manifests.plan_id(_plan(4, 5, 0.1))
    assert manifests.plan_id(_plan(1, 1, 0.1)) != manifests.plan_id(_plan(1, 1, 0.2))


# --- the pre-generation router -----------------------------------------------------------------


def test_the_cascade_service_is_the_router_and_runs_from_the_operator_image() -> None:
    children = _children(_plan(1, 1, 0.1))
    service = children["Service/c"]
    assert service["spec"]["selector"] == {
        manifests.LABEL_CASCADE: "c",
        manifests.LABEL_ROLE: "router",
    }
    router = children["Deployment/c"]
    pod = router["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == SETTINGS.router_image
    assert container["command"] == ["diffcascade-worker"]
    assert container["args"][0] == "route"
    allowed = [
        a for i, a in enumerate(container["args"]) if container["args"][i - 1] == "--allowed-stage"
    ]
    assert allowed == [
        "http://c-light.ns.svc:8000",
        "http://c-heavy.ns.svc:8000",
    ]
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["DIFFCASCADE_TOKEN"]["secretKeyRef"]["name"] == "c-token"
    assert env["DIFFCASCADE_ENTRY_URL"]["configMapKeyRef"] == {
        "name": "c-plan",
        "key": "router.entryUrl",
    }
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert router["spec"]["replicas"] == SETTINGS.router_replicas
    # The router pods are not worker pods: no variant label, so no worker selector takes them.
    labels = router["spec"]["template"]["metadata"]["labels"]
    assert manifests.LABEL_VARIANT not in labels
    assert children["PodDisruptionBudget/c"]["spec"]["maxUnavailable"] == 1


def test_plan_configmap_tells_a_new_router_pod_the_entry_heavy_stage_and_share() -> None:
    data = _children(_plan(1, 1, 0.1))["ConfigMap/c-plan"]["data"]
    # Plans name no entry stage or share yet: the first variant, r = 0.
    assert data["router.entryUrl"] == "http://c-light.ns.svc:8000"
    assert data["router.entryVariant"] == "light"
    assert data["router.heavyUrl"] == "http://c-heavy.ns.svc:8000"
    assert data["router.heavyVariant"] == "heavy"
    assert data["router.share"] == "0"


def test_stages_take_the_router_not_the_clients_and_the_router_takes_the_clients() -> None:
    clients = ({"namespaceSelector": {"matchLabels": {"team": "apps"}}},)
    settings = OperatorSettings(
        client_peers=clients,
        operator_namespace="ops",
        operator_pod_labels={"app": "op"},
    )
    rendered = manifests.children(
        cascade="c",
        namespace="ns",
        spec=_spec(),
        plan=_plan(1, 1, 0.1),
        replicas={"light": 1, "heavy": 1},
        token="t",
        settings=settings,
    )
    policies = {
        c["metadata"]["name"]: c["spec"]["ingress"][0]
        for c in rendered
        if c["kind"] == "NetworkPolicy"
    }
    router_peer = {"podSelector": {"matchLabels": manifests.router_selector("c")}}
    for stage in ("c-light", "c-heavy"):
        assert router_peer in policies[stage]["from"]
        assert clients[0] not in policies[stage]["from"]
    assert clients[0] in policies["c"]["from"]
    assert policies["c"]["ports"] == [{"protocol": "TCP", "port": settings.router_port}]


def test_without_the_router_the_entry_stage_takes_the_clients_as_before() -> None:
    settings = OperatorSettings(router=False)
    rendered = manifests.children(
        cascade="c",
        namespace="ns",
        spec=_spec(),
        plan=_plan(1, 1, 0.1),
        replicas={"light": 1, "heavy": 1},
        token="t",
        settings=settings,
    )
    names = {f"{c['kind']}/{c['metadata']['name']}" for c in rendered}
    assert not any(name.endswith("/c") for name in names)
    light = next(
        c for c in rendered if c["kind"] == "NetworkPolicy" and c["metadata"]["name"] == "c-light"
    )
    assert "from" not in light["spec"]["ingress"][0]
