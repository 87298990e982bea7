"""The Helm chart renders, lints and validates with the real Helm engine, for each values set.

helm-python-sdk binds Helm v4's Go SDK (a shared library in the wheel) through ctypes: no
helm binary and no network. Every rendered manifest is validated by kubernetes-validate
against the Kubernetes OpenAPI schemas it ships; the two kinds those schemas lack (the
Prometheus Operator's PodMonitor, Kopf's peering objects) are checked explicitly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import operator_api_calls
import pytest
import yaml
from operator_api_calls import Call
from packaging_support import (
    CHART_DIR,
    CRD_PATH,
    KUBERNETES_VERSION,
    load_yaml,
    schema_errors,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")

Doc = dict[str, Any]
RELEASE, NAMESPACE = "dc", "diffcascade-system"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "namespaced-monitoring": {
        "watchNamespaces": ["team-a"],
        "serviceMonitor": {"enabled": True},
    },
    "peering": {"peering": {"standalone": False, "name": "dc-peering"}},
    "namespaced-peering": {
        "watchNamespaces": ["team-a", "team-b"],
        "peering": {"standalone": False},
    },
    "tuned": {
        "image": {"tag": "dev", "pullPolicy": "Never"},
        "workerImage": {"repository": "diffcascade-worker", "tag": "e2e"},
        "prometheus": {"url": ""},
        "controlIntervalSeconds": 2,
        "logLevel": "debug",
        "extraEnv": [{"name": "DIFFCASCADE_TICK_SECONDS", "value": "0.5"}],
        "dispatch": "round-robin",
        "router": {
            "replicas": 3,
            "port": 9000,
            "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}},
            "scorer": "rule",
            "explorationShare": 0,
        },
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "ops", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "locked-down": {
        "nameOverride": "dc-op",
        "workerImage": {
            "repository": "registry.example.com/worker",
            "digest": "sha256:" + "0" * 64,
        },
        "allowedImageRegistries": ["registry.example.com"],
        "allowedEnvSecrets": ["hf-token", "s3-keys"],
        "modelCache": {"claimName": "models"},
        "workerResources": {"requests": {"cpu": 2, "memory": "8Gi"}},
        "networkPolicy": {"enabled": False, "clients": [{"podSelector": {}}]},
        "router": {"enabled": False, "scorer": "none"},
    },
    "dashboard-and-alerts": {
        "serviceMonitor": {"enabled": True},
        "grafanaDashboard": {"enabled": True, "namespace": "grafana"},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
    },
    "external-service-account": {
        "serviceAccount": {"create": False, "name": "ops-bot"},
        "rbac": {"create": False},
    },
}


def render(values: dict[str, Any]) -> list[Doc]:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[Doc] = []
    for name, text in sorted(rendered.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    text: str = rendered["diffcascade/templates/NOTES.txt"]
    return text


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


# --- chart files ----------------------------------------------------------------------------


def test_chart_crd_is_a_byte_identical_copy_of_crds() -> None:
    chart_crd = CHART_DIR / "crds" / CRD_PATH.name
    assert not chart_crd.is_symlink(), "helm package does not follow symlinks: copy the file"
    assert chart_crd.read_bytes() == CRD_PATH.read_bytes(), (
        "helm/diffcascade/crds/ is stale: cp crds/diffusioncascade.yaml helm/diffcascade/crds/"
    )


def test_chart_loads_with_its_crds_and_metadata() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        meta = chart.metadata
        crd_names = {next(yaml.safe_load_all(c["data"]))["metadata"]["name"] for c in chart.crds}
    assert (meta["apiVersion"], meta["name"], meta["appVersion"]) == ("v2", "diffcascade", "0.1.0")
    assert "diffusioncascades.diffcascade.dev" in crd_names


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_chart_lints_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "diffcascade"
    shutil.copytree(CHART_DIR, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: {{ .Values.nope.missing }\n")
    report = helm.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


# --- rendered manifests ---------------------------------------------------------------------

PEERING_CRDS = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all(
    (CHART_DIR / "crds" / "kopf-peering.yaml").read_text())}  # fmt: skip


def _validate_pod_monitor(doc: Doc) -> None:
    # monitoring.coreos.com is not in kubernetes-validate's schemas: check what Prometheus
    # Operator needs and what the operator's PromQL depends on.
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
    [endpoint] = spec["podMetricsEndpoints"]
    if doc["metadata"]["name"].endswith("-operator"):  # the control loop's own series
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
        assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    else:  # the workers and the routers
        assert spec["selector"] == {
            "matchExpressions": [
                {
                    "key": "app.kubernetes.io/name",
                    "operator": "In",
                    "values": ["diffcascade-worker", "diffcascade-router"],
                }
            ]
        }
        assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+(ms|s|m)", endpoint["interval"])


def _validate_prometheus_rule(doc: Doc) -> None:
    # Not in kubernetes-validate's schemas either; promtool checks the rules themselves
    # (tests/packaging/test_chart_monitoring.py).
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc["spec"]) == {"groups"}
    for group in doc["spec"]["groups"]:
        assert group["name"] and group["rules"]


def _validate_peering(doc: Doc) -> None:
    crd = PEERING_CRDS[doc["kind"]]
    assert doc["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert ("namespace" in doc["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    body = {k: v for k, v in doc.items() if k not in {"apiVersion", "kind", "metadata"}}
    assert schema_errors(schema, body) == []


SPECIAL_KINDS = {
    "PodMonitor": _validate_pod_monitor,
    "PrometheusRule": _validate_prometheus_rule,
    "KopfPeering": _validate_peering,
    "ClusterKopfPeering": _validate_peering,
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_every_rendered_manifest_is_valid_kubernetes(values: dict[str, Any]) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        check = SPECIAL_KINDS.get(doc["kind"])
        if check is not None:
            check(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def _operator(values: dict[str, Any]) -> tuple[Doc, Doc]:
    [deployment] = by_kind(render(values), "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_operator_runs_once_and_never_overlaps() -> None:
    deployment, _ = _operator({})
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_operator_runs_unprivileged() -> None:
    deployment, container = _operator({})
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_operator_command_from_default_values() -> None:
    deployment, container = _operator({})
    assert container["command"] == ["diffcascade", "operator"]
    assert container["args"] == [
        "--all-namespaces",
        "--standalone",
        "--prometheus-url=http://prometheus-operated.monitoring.svc:9090",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=8081",
    ]
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    assert container["ports"] == [
        {"name": "health", "containerPort": 8080},
        {"name": "metrics", "containerPort": 8081},
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DIFFCASCADE_WORKER_IMAGE"] == "ghcr.io/diffcascade/worker:0.1.0"
    assert container["image"] == "ghcr.io/diffcascade/operator:0.1.0"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "dc-diffcascade"


def test_operator_command_from_tuned_values() -> None:
    values = VALUE_SETS["tuned"] | {"watchNamespaces": ["team-a", "team-b"]}
    _, container = _operator(values | {"peering": {"standalone": False, "name": "p"}})
    assert container["args"] == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--peering",
        "--peering-name=p",
        "--priority=0",
        "--interval=2",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=8081",
        "--debug",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DIFFCASCADE_WORKER_IMAGE"] == "diffcascade-worker:e2e"
    assert env["DIFFCASCADE_ROUTER_IMAGE"] == container["image"]  # the router: this image
    assert env["DIFFCASCADE_TICK_SECONDS"] == "0.5"
    assert container["imagePullPolicy"] == "Never"


def test_monitor_is_rendered_only_when_enabled() -> None:
    assert by_kind(render({}), "PodMonitor") == []
    monitor, operator = by_kind(render(VALUE_SETS["monitoring"]), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert operator["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert operator["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    scoped, _ = by_kind(render(VALUE_SETS["namespaced-monitoring"]), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    without = {**VALUE_SETS["monitoring"], "metrics": {"enabled": False}}
    assert [m["metadata"]["name"] for m in by_kind(render(without), "PodMonitor")] == [
        f"{RELEASE}-diffcascade-workers"
    ]


def test_peering_objects_only_with_peering() -> None:
    assert not [d for d in render({}) if "Peering" in d["kind"]]
    [cluster] = by_kind(render(VALUE_SETS["peering"]), "ClusterKopfPeering")
    assert cluster["metadata"]["name"] == "dc-peering"
    namespaced = by_kind(render(VALUE_SETS["namespaced-peering"]), "KopfPeering")
    assert sorted(d["metadata"]["namespace"] for d in namespaced) == ["team-a", "team-b"]


def test_external_service_account_renders_no_rbac() -> None:
    docs = render(VALUE_SETS["external-service-account"])
    assert {d["kind"] for d in docs} == {"Deployment"}
    [deployment] = by_kind(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops-bot"


def test_notes_show_how_to_watch_decisions() -> None:
    text = notes({})
    assert "kubectl get dcas" in text and "kubectl describe dcas" in text
    assert "team-a" in notes(VALUE_SETS["namespaced"])


# --- RBAC -----------------------------------------------------------------------------------

Rule = dict[str, Any]


def _allows(rules: list[Rule], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
    )


def _cluster_wide_rules(values: dict[str, Any]) -> list[Rule]:
    [role] = by_kind(render(values), "ClusterRole")
    rules: list[Rule] = role["rules"]
    return rules


def test_rbac_is_cluster_wide_by_default() -> None:
    docs = render({})
    assert by_kind(docs, "Role") == []
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dc-diffcascade", "namespace": NAMESPACE}
    ]
    rules = _cluster_wide_rules({})
    assert _allows(rules, "", "namespaces", "watch")
    assert _allows(rules, "apiextensions.k8s.io", "customresourcedefinitions", "watch")


def test_rbac_with_watched_namespaces_is_a_role_per_namespace() -> None:
    docs = render(VALUE_SETS["namespaced"])
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == [
        "team-a",
        "team-b",
    ]
    [cluster_role] = by_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        }
    ]


def test_rbac_is_least_privilege() -> None:
    for values in VALUE_SETS.values():
        for doc in by_kind(render(values), "ClusterRole") + by_kind(render(values), "Role"):
            for rule in doc["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert "deletecollection" not in rule["verbs"], rule
                assert not (
                    {"secrets"} & set(rule["resources"]) and {"list", "watch"} & set(rule["verbs"])
                ), rule
    rules = _cluster_wide_rules({})
    assert not any("kopf.dev" in r["apiGroups"] for r in rules)
    assert _allows(
        _cluster_wide_rules(VALUE_SETS["peering"]), "kopf.dev", "clusterkopfpeerings", "patch"
    )


def test_rbac_lets_kopf_serve_cascades_and_post_events() -> None:
    for rules in (
        _cluster_wide_rules({}),
        by_kind(render(VALUE_SETS["namespaced"]), "Role")[0]["rules"],
    ):
        for verb in ("get", "list", "watch", "patch"):
            assert _allows(rules, "diffcascade.dev", "diffusioncascades", verb)
        assert _allows(rules, "diffcascade.dev", "diffusioncascades/status", "patch")
        for group in ("", "events.k8s.io"):
            assert _allows(rules, group, "events", "create")


@pytest.fixture(scope="module")
def operator_calls() -> set[Call]:
    return operator_api_calls.operator_calls()


def test_the_derived_calls_include_what_prune_passes_around_by_reference() -> None:
    calls = {c.method for c in operator_api_calls.client_calls(["diffcascade_operator.kube.api"])}
    assert {"delete_namespaced_deployment", "delete_namespaced_service"} <= calls
    assert operator_api_calls.rbac_of_request(
        "/apis/apps/v1/namespaces/{namespace}/deployments/{name}", "DELETE"
    ) == ("apps", "deployments", "delete")
    assert operator_api_calls.rbac_of_request("/api/v1/namespaces/{namespace}/pods", "GET") == (
        "",
        "pods",
        "list",
    )


def test_rbac_covers_every_api_call_the_operator_can_make(operator_calls: set[Call]) -> None:
    assert ("apps", "deployments", "delete") in operator_calls  # prune()
    assert ("diffcascade.dev", "diffusioncascades/status", "patch") in operator_calls  # Kopf
    namespaced_rules = by_kind(render(VALUE_SETS["namespaced"]), "Role")[0]["rules"]
    for rules in (_cluster_wide_rules({}), namespaced_rules):
        missing = sorted(c for c in operator_calls if not _allows(rules, *c))
        assert missing == [], f"the chart's RBAC does not allow {missing}"


def test_rbac_grants_delete_only_on_what_the_operator_deletes(operator_calls: set[Call]) -> None:
    deleted = {(g, r) for g, r, v in operator_calls if v in ("delete", "deletecollection")}
    for values in VALUE_SETS.values():
        docs = render(values)
        for doc in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            for rule in doc["rules"]:
                if "delete" in rule["verbs"] or "deletecollection" in rule["verbs"]:
                    granted = {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
                    assert granted <= deleted, rule


def test_values_file_documents_every_top_level_key() -> None:
    text = (CHART_DIR / "values.yaml").read_text()
    values = load_yaml(CHART_DIR / "values.yaml")
    for key in ("image", "workerImage", "watchNamespaces", "peering", "prometheus",
                "controlIntervalSeconds", "logLevel", "serviceAccount", "rbac", "serviceMonitor",
                "podSecurityContext", "securityContext", "resources", "nodeSelector",
                "tolerations", "affinity", "allowedImageRegistries", "allowedEnvSecrets",
                "workerResources", "networkPolicy", "metrics", "grafanaDashboard",
                "prometheusRule", "dispatch", "router"):  # fmt: skip
        assert key in values, key
    assert all(k[0].islower() and "_" not in k for k in values)
    assert text.count("# --") >= 10


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_operator_cli_accepts_the_rendered_arguments(values: dict[str, Any]) -> None:
    from diffcascade_operator.kube.cli import operator_command

    _, container = _operator(values)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert container["command"] == ["diffcascade", "operator"]
    with operator_command.make_context("operator", list(container["args"])) as ctx:
        params = ctx.params
    assert params["standalone"] == values.get("peering", {}).get("standalone", True)
    assert params["namespaces"] == tuple(values.get("watchNamespaces", []))
    assert params["all_namespaces"] is not bool(values.get("watchNamespaces"))
    assert env["DIFFCASCADE_WORKER_IMAGE"].endswith((":0.1.0", ":e2e", "@sha256:" + "0" * 64))


def test_the_dispatch_the_allocator_plans_for_is_a_value() -> None:
    from diffcascade_operator.queueing import Dispatch

    _, defaults = _operator_settings({})
    _, ipvs = _operator_settings({"dispatch": "round-robin"})
    assert (defaults.dispatch, ipvs.dispatch) == (Dispatch.RANDOM, Dispatch.ROUND_ROBIN)
    with pytest.raises(helm.HelmError, match="dispatch must be random, round-robin or least"):
        render({"dispatch": "fastest"})


ROUTER_FIELDS = ("router", "router_replicas", "router_port", "router_cpu_request",
                 "router_memory_request", "router_scorer", "router_exploration")  # fmt: skip


def test_the_router_is_switched_sized_and_chosen_by_values() -> None:
    from diffcascade_operator.kube.settings import OperatorSettings

    def router(settings: Any) -> tuple[Any, ...]:
        return tuple(getattr(settings, f) for f in ROUTER_FIELDS)

    _, defaults = _operator_settings({})
    assert router(defaults) == router(OperatorSettings())  # the chart keeps the operator's
    _, tuned = _operator_settings(VALUE_SETS["tuned"])
    assert router(tuned) == (True, 3, 9000, "250m", "128Mi", "rule", 0.0)
    _, off = _operator_settings(VALUE_SETS["locked-down"])
    assert (off.router, off.router_scorer) == (False, "none")


BAD_ROUTER_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"scorer": "fastest"}, 'router.scorer must be learned, rule or none, not "fastest"'),
    ({"replicas": 0}, 'router.replicas must be a whole number of at least 1, not "0"'),
    ({"replicas": 1.5}, 'router.replicas must be a whole number of at least 1, not "1.5"'),
    ({"replicas": "two"}, 'router.replicas must be a whole number of at least 1, not "two"'),
    ({"port": 70000}, 'router.port must be a port number from 1 to 65535, not "70000"'),
    ({"explorationShare": -0.1}, 'must be a number from 0 to 0.5, not "-0.1"'),
    ({"explorationShare": 1}, 'router.explorationShare must be a number from 0 to 0.5, not "1"'),
    ({"explorationShare": "x"}, 'router.explorationShare must be a number from 0 to 0.5, not "x"'),
]


@pytest.mark.parametrize(
    ("router", "message"),
    BAD_ROUTER_VALUES,
    ids=[",".join(f"{k}={v}" for k, v in r.items()) for r, _ in BAD_ROUTER_VALUES],
)
def test_bad_router_values_fail_helm_and_diffcascade_render_alike(
    router: dict[str, Any], message: str
) -> None:
    from diffcascade_operator.kube.render import RenderError, chart_env, merge_values

    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render({"router": router})
    values = merge_values(load_yaml(CHART_DIR / "values.yaml"), {"router": router})
    with pytest.raises(RenderError, match=re.escape(message)):
        chart_env(values, release=RELEASE, namespace=NAMESPACE, app_version="0.1.0")


def test_the_chart_allows_the_exploration_shares_the_router_accepts() -> None:
    from diffcascade_worker.protocol import MAX_EXPLORATION_SHARE

    _, settings = _operator_settings({"router": {"explorationShare": MAX_EXPLORATION_SHARE}})
    assert settings.router_exploration == MAX_EXPLORATION_SHARE
    with pytest.raises(helm.HelmError, match=r"router\.explorationShare must be a number"):
        render({"router": {"explorationShare": MAX_EXPLORATION_SHARE + 0.01}})


def test_unknown_log_level_fails_the_render_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmError, match="logLevel must be info, verbose or debug"):
        render({"logLevel": "warning"})


def test_packaged_chart_carries_the_crd(tmp_path: Path) -> None:
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with helm.Chart.load(archive) as chart:
        packaged = {c["name"]: c["data"] for c in chart.crds}
    assert packaged["crds/diffusioncascade.yaml"] == CRD_PATH.read_text()


# --- what the chart tells the operator about hardening --------------------------------------


def _operator_settings(values: dict[str, Any]) -> Any:
    from diffcascade_operator.kube.settings import OperatorSettings

    deployment, container = _operator(values)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for e in container["env"]:
        if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[e["name"]] = NAMESPACE  # what the kubelet resolves
    return deployment, OperatorSettings.from_env(env)


def test_worker_network_policies_let_in_the_operator_pod_the_chart_runs() -> None:
    deployment, settings = _operator_settings({})
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert settings.operator_namespace == NAMESPACE
    assert settings.operator_pod_labels
    assert settings.operator_pod_labels.items() <= pod_labels.items()
    assert settings.network_policy is True
    [scraper] = settings.scraper_peers
    assert scraper["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def test_scraper_and_client_selectors_and_allowlists_are_values() -> None:
    scraper = {"podSelector": {"matchLabels": {"app": "vmagent"}}}
    _, settings = _operator_settings(
        {
            "networkPolicy": {"enabled": False, "scrapers": [scraper], "clients": [scraper]},
            "allowedImageRegistries": ["registry.local:5000", "ghcr.io/acme"],
            "allowedEnvSecrets": ["hf-token"],
            "workerResources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
        }
    )
    assert settings.network_policy is False
    assert settings.scraper_peers == settings.client_peers == (scraper,)
    assert settings.allowed_image_registries == ("registry.local:5000", "ghcr.io/acme")
    assert settings.allowed_env_secrets == ("hf-token",)
    assert (settings.worker_cpu_request, settings.worker_memory_request) == ("250m", "1Gi")
    _, defaults = _operator_settings({})
    assert defaults.allowed_image_registries == ("ghcr.io/diffcascade",)
    assert defaults.allowed_env_secrets == ()


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_images_are_pinned_by_digest_when_one_is_given() -> None:
    _, container = _operator({"image": {"digest": DIGEST}, "workerImage": {"digest": DIGEST}})
    assert container["image"] == f"ghcr.io/diffcascade/operator@{DIGEST}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DIFFCASCADE_WORKER_IMAGE"] == f"ghcr.io/diffcascade/worker@{DIGEST}"
    values = load_yaml(CHART_DIR / "values.yaml")
    assert values["image"]["digest"] == values["workerImage"]["digest"] == ""
    assert "digest" in (CHART_DIR / "values.yaml").read_text().split("workerImage:")[0]


def test_a_malformed_digest_fails_the_render_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmError, match=r"workerImage.digest must be sha256:<64 hex"):
        render({"workerImage": {"digest": "latest"}})


_FLAG_ENV = {
    "--prometheus-url": "DIFFCASCADE_PROMETHEUS_URL",
    "--interval": "DIFFCASCADE_INTERVAL",
    "--metrics-port": "DIFFCASCADE_METRICS_PORT",
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_render_command_reads_the_values_as_the_charts_operator_does(
    values: dict[str, Any],
) -> None:
    """`diffcascade render` maps chart values to the operator's settings itself (no Helm on a
    user's path): what it derives must be what the chart hands the operator."""
    from diffcascade_operator.kube.render import chart_env, merge_values

    _, container = _operator(values)
    given: dict[str, str] = {}
    for entry in container["env"]:
        if not entry["name"].startswith("DIFFCASCADE_"):
            continue
        if "valueFrom" in entry:  # the pod's own namespace
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            given[entry["name"]] = NAMESPACE
        else:
            given[entry["name"]] = entry["value"]
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag in _FLAG_ENV:  # the CLI copies these flags into the environment
            given[_FLAG_ENV[flag]] = value
    chart = load_yaml(CHART_DIR / "Chart.yaml")
    derived = chart_env(
        merge_values(load_yaml(CHART_DIR / "values.yaml"), values),
        release=RELEASE,
        namespace=NAMESPACE,
        app_version=chart["appVersion"],
    )
    assert derived == given
