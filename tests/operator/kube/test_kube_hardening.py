"""The Kubernetes side of hardening: what a worker pod may do, who may reach it, what a cascade
may ask the operator to run, and that the children doing it are applied and pruned for real
(kmock as the API server)."""

from __future__ import annotations

import json
import math
from typing import Any

import kopf
import pytest
from diffcascade_operator.kube import manifests, reconcile
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.kube.policy import ForbiddenSpec, check_spec, image_allowed, repository
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.spec import CascadeSpec, parse_spec
from kmock_k8s import ThreadedKMock
from kube_env import Cluster
from test_kube_manifests import _plan, _spec

OPERATOR_LABELS = {"app.kubernetes.io/name": "diffcascade", "app.kubernetes.io/instance": "dc"}
SCRAPER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
CHART_SETTINGS = OperatorSettings(
    operator_namespace="ops",
    operator_pod_labels=OPERATOR_LABELS,
    scraper_peers=(SCRAPER,),
    allowed_image_registries=("ghcr.io/diffcascade", "registry.local:5000"),
    allowed_env_secrets=("hf-token",),
)


def _pod(spec: CascadeSpec | None = None, index: int = 0, **settings: Any) -> dict[str, Any]:
    dep = manifests.deployment(
        cascade="c",
        namespace="ns",
        spec=spec or _spec(),
        index=index,
        replicas=1,
        settings=OperatorSettings(**settings),
    )
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    return pod


# --- worker pods ----------------------------------------------------------------------------


def test_worker_pods_carry_no_service_account_token() -> None:
    assert _pod()["automountServiceAccountToken"] is False


def test_worker_gets_default_cpu_and_memory_requests_unless_its_variant_sets_them() -> None:
    [container] = _pod()["containers"]
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    raw = _spec().model_dump(by_alias=True, exclude_none=True)
    raw["variants"][0]["resources"] = {"requests": {"cpu": "3"}, "limits": {"memory": "9Gi"}}
    [tuned] = _pod(parse_spec(raw), worker_cpu_request="250m")["containers"]
    # A memory limit alone already makes Kubernetes request as much: no default added.
    assert tuned["resources"]["requests"] == {"cpu": "3"}
    assert tuned["resources"]["limits"]["memory"] == "9Gi"


@pytest.mark.parametrize("slo", [0.5, 3.0, 5.0, 47.3])
def test_the_drain_follows_the_slo_and_fits_in_the_grace_period(slo: float) -> None:
    raw = _spec().model_dump(by_alias=True, exclude_none=True)
    raw["sloSeconds"] = slo
    spec = parse_spec(raw)
    pod = _pod(spec)
    [container] = pod["containers"]
    drain = next(float(a.split("=", 1)[1]) for a in container["args"] if "--drain-timeout=" in a)
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert drain == math.ceil(2 * slo)  # a light pass and a deferred one
    # Kubernetes kills at the grace period, counted from the preStop hook's start.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 1


# --- NetworkPolicy and PodDisruptionBudget ------------------------------------------------------


def _policies(settings: OperatorSettings) -> dict[str, dict[str, Any]]:
    out = {}
    for child in _children_with(settings):
        if child["kind"] == "NetworkPolicy":
            out[child["metadata"]["name"]] = child
    return out


def _children_with(settings: OperatorSettings) -> list[dict[str, Any]]:
    plan = _plan(1, 1, 0.1)
    return manifests.children(
        cascade="c",
        namespace="ns",
        spec=_spec(),
        plan=plan,
        replicas=plan.replicas(),
        token="t",
        settings=settings,
    )


def test_only_the_operator_the_earlier_stage_the_router_and_the_scrapers_reach_a_stage() -> None:
    heavy = _policies(CHART_SETTINGS)["c-heavy"]["spec"]
    assert heavy["podSelector"] == {"matchLabels": manifests.selector("c", "heavy")}
    assert heavy["policyTypes"] == ["Ingress"]
    [rule] = heavy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": manifests.selector("c", "light")}},
        {"podSelector": {"matchLabels": manifests.router_selector("c")}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": OPERATOR_LABELS},
        },
        SCRAPER,
    ]


def test_the_router_takes_any_client_unless_clients_are_named_and_stages_take_none() -> None:
    policies = _policies(CHART_SETTINGS)
    [rule] = policies["c"]["spec"]["ingress"]  # the router: the cascade's endpoint
    assert "from" not in rule
    [entry] = policies["c-light"]["spec"]["ingress"]
    assert {"podSelector": {"matchLabels": manifests.router_selector("c")}} in entry["from"]
    clients = {"namespaceSelector": {"matchLabels": {"team": "a"}}}
    named = OperatorSettings(**{**CHART_SETTINGS.__dict__, "client_peers": (clients,)})
    [rule] = _policies(named)["c"]["spec"]["ingress"]
    assert clients in rule["from"] and SCRAPER in rule["from"]
    [entry] = _policies(named)["c-light"]["spec"]["ingress"]
    assert clients not in entry["from"]  # a client reaches the stages through the router


def test_without_a_router_the_entry_stage_takes_any_client_unless_clients_are_named() -> None:
    bare = OperatorSettings(**{**CHART_SETTINGS.__dict__, "router": False})
    [rule] = _policies(bare)["c-light"]["spec"]["ingress"]
    assert "from" not in rule  # the cascade's endpoint
    clients = {"namespaceSelector": {"matchLabels": {"team": "a"}}}
    named = OperatorSettings(**{**bare.__dict__, "client_peers": (clients,)})
    [rule] = _policies(named)["c-light"]["spec"]["ingress"]
    assert clients in rule["from"] and SCRAPER in rule["from"]


def test_the_scraper_selector_and_the_policy_switch_come_from_the_environment() -> None:
    env = {
        "DIFFCASCADE_SCRAPER_PEERS": json.dumps([SCRAPER]),
        "DIFFCASCADE_OPERATOR_NAMESPACE": "ops",
        "DIFFCASCADE_OPERATOR_POD_LABELS": json.dumps(OPERATOR_LABELS),
        "DIFFCASCADE_ALLOWED_IMAGE_REGISTRIES": "ghcr.io/diffcascade registry.local:5000",
    }
    settings = OperatorSettings.from_env(env)
    assert settings.scraper_peers == (SCRAPER,)
    assert settings.operator_pod_labels == OPERATOR_LABELS
    assert settings.allowed_image_registries == ("ghcr.io/diffcascade", "registry.local:5000")
    off = OperatorSettings.from_env({"DIFFCASCADE_NETWORK_POLICY": "false"})
    assert not [c for c in _children_with(off) if c["kind"] == "NetworkPolicy"]
    with pytest.raises(ValueError, match="SCRAPER_PEERS must be a JSON list"):
        OperatorSettings.from_env({"DIFFCASCADE_SCRAPER_PEERS": "{}"})


def test_every_variant_and_the_router_get_a_disruption_budget_of_one_pod() -> None:
    budgets = {c["metadata"]["name"]: c for c in _children_with(CHART_SETTINGS)
               if c["kind"] == "PodDisruptionBudget"}  # fmt: skip
    assert set(budgets) == {"c-light", "c-heavy", "c"}
    assert budgets["c"]["spec"]["selector"] == {"matchLabels": manifests.router_selector("c")}
    spec = budgets["c-heavy"]["spec"]
    assert spec["selector"] == {"matchLabels": manifests.selector("c", "heavy")}
    assert spec["maxUnavailable"] == 1
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_budgets_and_policies_are_applied_and_pruned_with_their_variant(
    k8s: ThreadedKMock,
) -> None:
    api, ns = KubeApi(), "harden-prune"
    owner = {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": "c", "namespace": ns, "uid": "owner-uid"},
    }
    children = _children_with(CHART_SETTINGS)
    for child in children:
        child["metadata"]["namespace"] = ns
    kopf.adopt(children, owner=owner)  # type: ignore[arg-type]
    assert {api.apply(c) for c in children} == {"created"}
    assert {api.apply(c) for c in children} == {"patched"}
    assert len(api.policy.list_namespaced_pod_disruption_budget(ns).items) == 3  # + router

    removed = api.prune(ns, "c", owner_uid="owner-uid", keep={"light"})

    assert sorted(removed) == [
        "Deployment/c-heavy",
        "NetworkPolicy/c-heavy",
        "PodDisruptionBudget/c-heavy",
        "Service/c-heavy",
    ]
    left = api.networking.list_namespaced_network_policy(ns).items
    assert sorted(p.metadata.name for p in left) == ["c", "c-light"]


# --- what a cascade may ask for -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("ghcr.io/diffcascade/worker:0.1.0", "ghcr.io/diffcascade/worker"),
        ("python:3.11", "docker.io/library/python"),
        ("me/worker", "docker.io/me/worker"),
        ("localhost:5000/w@sha256:" + "a" * 64, "localhost:5000/w"),
    ],
)
def test_image_references_are_read_with_their_registry(image: str, repo: str) -> None:
    assert repository(image) == repo


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("ghcr.io/diffcascade/worker:1", True),
        ("registry.local:5000/any/thing", True),
        ("ghcr.io/diffcascade-evil/worker:1", False),  # a whole path component must match
        ("ghcr.io.evil.example/diffcascade/worker", False),
        ("ghcr.io/other/worker", False),
        ("diffcascade/worker", False),  # docker.io
    ],
)
def test_image_allowlist_matches_whole_components(image: str, allowed: bool) -> None:
    assert image_allowed(image, CHART_SETTINGS.allowed_image_registries) is allowed


def _with(**variant: Any) -> CascadeSpec:
    raw = _spec().model_dump(by_alias=True, exclude_none=True)
    raw["variants"][1].update(variant)
    return parse_spec(raw)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"image": "evil.example/miner:latest"}, "not from an allowed registry"),
        ({"image": "Not An Image"}, "is not an image reference"),
        (
            {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]},
            "reads Secret 'db'",
        ),
        ({"env": [{"name": "DIFFCASCADE_TOKEN", "value": "known"}]}, "set by the operator"),
    ],
)
def test_the_policy_refuses_images_and_env_outside_the_allowlists(
    variant: dict[str, Any], message: str
) -> None:
    with pytest.raises(ForbiddenSpec, match=message):
        check_spec(_with(**variant), CHART_SETTINGS)


def test_the_storage_secret_is_held_to_the_same_allowlist() -> None:
    raw = _spec().model_dump(by_alias=True, exclude_none=True)
    raw["storage"] = {"secretName": "other-team-keys"}
    with pytest.raises(ForbiddenSpec, match=r"spec\.storage\.secretName"):
        check_spec(parse_spec(raw), CHART_SETTINGS)
    raw["storage"] = {"secretName": "hf-token"}
    check_spec(parse_spec(raw), CHART_SETTINGS)


def test_without_the_chart_the_operator_restricts_nothing_but_its_own_env_names() -> None:
    anything = {"name": "X", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}
    check_spec(_with(image="anything.example/w:1", env=[anything]), OperatorSettings())
    with pytest.raises(ForbiddenSpec, match="set by the operator"):
        check_spec(_with(env=[{"name": "diffcascade_token", "value": "x"}]), OperatorSettings())
    chart = OperatorSettings.from_env({"DIFFCASCADE_ALLOWED_ENV_SECRETS": ""})
    with pytest.raises(ForbiddenSpec, match="reads Secret 'db'"):
        check_spec(_with(env=[anything]), chart)


def test_the_policy_allows_listed_registries_secrets_and_the_operators_own_image() -> None:
    ok_env = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "t"}}},
        {"name": "PLAIN", "value": "1"},
    ]
    check_spec(_with(image="registry.local:5000/w:1", env=ok_env), CHART_SETTINGS)
    check_spec(_with(image=CHART_SETTINGS.worker_image), CHART_SETTINGS)


def test_a_forbidden_cascade_gets_a_condition_and_an_event_and_no_children(
    k8s: ThreadedKMock,
) -> None:
    ns = "harden-forbidden"
    raw = _with(image="evil.example/miner:latest").model_dump(by_alias=True, exclude_none=True)
    body = {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": "c", "namespace": ns, "uid": "u", "generation": 1},
        "spec": raw,
    }
    state = reconcile.new_state(CHART_SETTINGS)
    fields, events = reconcile.apply_children(
        api=KubeApi(), body=body, state=state, settings=CHART_SETTINGS, now=1.0
    )
    conditions = {c["type"]: c for c in fields["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == conditions["Degraded"]["reason"] == "Forbidden"
    assert "evil.example/miner:latest" in conditions["Degraded"]["message"]
    [(kind, reason, message)] = events
    assert (kind, reason) == ("Warning", "Forbidden") and "allowed registry" in message
    assert Cluster().apps.list_namespaced_deployment(ns).items == []
    outcome = reconcile.control_step(
        api=KubeApi(),
        body=body,
        state=state,
        pods=[],
        deployment_replicas={},
        settings=CHART_SETTINGS,
        now=2.0,
    )
    assert outcome is not None and outcome.events == []
    assert Cluster().apps.list_namespaced_deployment(ns).items == []


# --- client API keys --------------------------------------------------------------------------


def _with_api_keys(secret: str = "client-keys") -> CascadeSpec:
    raw = _spec().model_dump(by_alias=True, exclude_none=True)
    raw["apiKeys"] = {"secretName": secret}
    return parse_spec(raw)


def _router_pod(spec: CascadeSpec, **settings: Any) -> dict[str, Any]:
    dep = manifests.router_deployment(
        cascade="c", namespace="ns", spec=spec, settings=OperatorSettings(**settings)
    )
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    return pod


def _checks_keys(pod: dict[str, Any]) -> bool:
    """The pod mounts the keys Secret where its `--api-keys` points (both, or neither)."""
    [container] = pod["containers"]
    args = " ".join(container["args"]).replace("=", " ")
    told = f"--api-keys {manifests.API_KEYS_DIR}" in args
    volumes = [v for v in pod["volumes"] if v["name"] == manifests.API_KEYS_VOLUME]
    mounts = [m for m in container["volumeMounts"] if m["name"] == manifests.API_KEYS_VOLUME]
    assert told == bool(volumes) == bool(mounts), (told, volumes, mounts)
    if told:
        [volume], [mount] = volumes, mounts
        assert volume["secret"] == {"secretName": "client-keys", "defaultMode": 0o440}
        assert mount == {
            "name": manifests.API_KEYS_VOLUME,
            "mountPath": manifests.API_KEYS_DIR,
            "readOnly": True,
        }
    return told


def test_with_the_router_only_the_router_mounts_the_api_keys_and_checks_them() -> None:
    """Hybrid plans may enter at any stage and send prompts straight to heavy: the router is
    the one door (the stages' NetworkPolicy admits no client), so it checks every prompt."""
    spec = _with_api_keys()
    assert _checks_keys(_router_pod(spec)) is True
    assert [_checks_keys(_pod(spec, index=i)) for i in (0, 1)] == [False, False]
    unkeyed = [_router_pod(_spec()), _pod(_spec(), index=0), _pod(_spec(), index=1)]
    assert not any(_checks_keys(pod) for pod in unkeyed)


@pytest.mark.parametrize(
    ("settings", "router_checks"),
    [({"router": False}, None), ({"network_policy": False}, True)],
    ids=["no-router", "no-network-policy"],
)
def test_without_the_router_or_its_network_policy_every_stage_checks_the_api_keys(
    settings: dict[str, Any], router_checks: bool | None
) -> None:
    spec = _with_api_keys()
    assert [_checks_keys(_pod(spec, index=i, **settings)) for i in (0, 1)] == [True, True]
    routers = manifests.router_children(
        cascade="c", namespace="ns", spec=spec, settings=OperatorSettings(**settings)
    )
    if router_checks is None:
        assert routers == []
    else:
        assert _checks_keys(_router_pod(spec, **settings)) is router_checks


def test_the_api_keys_secret_is_held_to_the_same_allowlist() -> None:
    """Mounted into a pod whose image the author may choose, it is a Secret the author reads."""
    with pytest.raises(ForbiddenSpec, match=r"spec\.apiKeys\.secretName"):
        check_spec(_with_api_keys("other-team-keys"), CHART_SETTINGS)
    check_spec(_with_api_keys("hf-token"), CHART_SETTINGS)


@pytest.mark.parametrize("router", [True, False], ids=["router", "no-router"])
def test_the_api_keys_secret_reaches_the_deployments_that_check_keys_through_the_api(
    k8s: ThreadedKMock, router: bool
) -> None:
    ns = f"harden-api-keys-{str(router).lower()}"
    settings = OperatorSettings(allowed_env_secrets=("client-keys",), router=router)
    body = {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": "c", "namespace": ns, "uid": "u", "generation": 1},
        "spec": _with_api_keys().model_dump(by_alias=True, exclude_none=True),
    }
    reconcile.apply_children(
        api=KubeApi(), body=body, state=reconcile.new_state(settings), settings=settings, now=1.0
    )
    apps = Cluster().apps
    pods = {
        d.metadata.name: d.spec.template.spec for d in apps.list_namespaced_deployment(ns).items
    }
    keyed = {
        name
        for name, pod in pods.items()
        if [v.secret.secret_name for v in pod.volumes if v.secret] == ["client-keys"]
        and manifests.API_KEYS_DIR in " ".join(pod.containers[0].args)
    }
    assert keyed == ({"c"} if router else {"c-light", "c-heavy"})
    assert set(pods) == {"c-light", "c-heavy"} | ({"c"} if router else set())
