"""Worker pods (and the operator's own) pass Pod Security "restricted", every check of it.

The pod templates are the ones the operator renders for the example cascades and the one the
chart renders for the operator; `pod_security` transcribes the upstream admission checks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from diffcascade_operator.kube import manifests
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.spec import CascadeSpec, load_manifest
from packaging_support import CHART_DIR, EXAMPLES_DIR, KUBERNETES_VERSION, load_yaml
from pod_security import RESTRICTED, violations

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
SETTINGS = OperatorSettings()


def _spec(path: Path) -> CascadeSpec:
    return load_manifest(load_yaml(path))[1]


def _worker_templates(path: Path) -> list[dict[str, Any]]:
    spec = _spec(path)
    return [
        manifests.deployment(
            cascade="c", namespace="ns", spec=spec, index=i, replicas=1, settings=SETTINGS
        )["spec"]["template"]
        for i in range(len(spec.variants))
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_worker_pods_pass_every_restricted_check(path: Path) -> None:
    for template in _worker_templates(path):
        assert violations(template) == {}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_router_pods_pass_every_restricted_check(path: Path) -> None:
    router = manifests.router_deployment(
        cascade="c", namespace="ns", spec=_spec(path), settings=SETTINGS
    )
    assert violations(router["spec"]["template"]) == {}
    assert router["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("router", [True, False], ids=["router", "no-router"])
def test_pods_that_mount_the_api_keys_pass_every_restricted_check(router: bool) -> None:
    raw = load_yaml(EXAMPLES_DIR / "tiny-cpu.yaml")
    raw["spec"]["apiKeys"] = {"secretName": "client-keys"}
    spec = load_manifest(raw)[1]
    settings = OperatorSettings(router=router)
    templates = [
        manifests.deployment(
            cascade="c", namespace="ns", spec=spec, index=i, replicas=1, settings=settings
        )["spec"]["template"]
        for i in range(len(spec.variants))
    ]
    if router:
        deployment = manifests.router_deployment(
            cascade="c", namespace="ns", spec=spec, settings=settings
        )
        templates.append(deployment["spec"]["template"])
    keyed = [
        t
        for t in templates
        if manifests.API_KEYS_DIR in " ".join(t["spec"]["containers"][0]["args"])
    ]
    assert len(keyed) == (1 if router else len(spec.variants))
    for template in templates:
        assert violations(template) == {}


def test_the_operator_pod_passes_every_restricted_check() -> None:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render({}, name="dc", namespace="ops", is_install=True)
    [deployment] = [
        d
        for name, text in rendered.items()
        if not name.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d and d.get("kind") == "Deployment"
    ]
    assert violations(deployment["spec"]["template"]) == {}


def test_the_checker_covers_the_whole_profile() -> None:
    assert len(RESTRICTED) == len({c.__name__ for c in RESTRICTED}) == 18


# Each mutation breaks exactly the checks named: the checker can fail, check by check.
_MUTATIONS: dict[str, tuple[str, Any]] = {
    "windowsHostProcess": ("ctx.windowsOptions", {"hostProcess": True}),
    "hostNamespaces": ("pod.hostPID", True),
    "privileged": ("ctx.privileged", True),
    "capabilities_baseline": ("ctx.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "hostPathVolumes": ("volume", {"name": "h", "hostPath": {"path": "/"}}),
    "hostPorts": ("port", {"containerPort": 80, "hostPort": 80}),
    "appArmorProfile": ("ctx.appArmorProfile", {"type": "Unconfined"}),
    "seLinuxOptions": ("ctx.seLinuxOptions", {"type": "spc_t"}),
    "procMount": ("ctx.procMount", "Unmasked"),
    "seccompProfile_baseline": ("ctx.seccompProfile", {"type": "Unconfined"}),
    "sysctls": ("podctx.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
    "hostProbesAndHostLifecycle": ("probe.host", "10.0.0.1"),
    "restrictedVolumes": ("volume", {"name": "n", "nfs": {"server": "s", "path": "/"}}),
    "allowPrivilegeEscalation": ("ctx.allowPrivilegeEscalation", None),
    "runAsNonRoot": ("ctx.runAsNonRoot", False),
    "runAsUser": ("ctx.runAsUser", 0),
    "seccompProfile_restricted": ("podctx.seccompProfile", None),
    "capabilities_restricted": ("ctx.capabilities", {"drop": ["NET_RAW"]}),
}
_ALSO = {
    "hostPathVolumes": {"restrictedVolumes"},
    "capabilities_baseline": {"capabilities_restricted"},
    "seccompProfile_baseline": {"seccompProfile_restricted"},
}


def _mutate(template: dict[str, Any], where: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(template)
    spec = out["spec"]
    container = spec["containers"][0]
    kind, _, key = where.partition(".")
    target = {
        "ctx": container.setdefault("securityContext", {}),
        "podctx": spec.setdefault("securityContext", {}),
        "pod": spec,
    }.get(kind)
    if target is not None:
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    elif kind == "volume":
        spec.setdefault("volumes", []).append(value)
    elif kind == "port":
        container.setdefault("ports", []).append(value)
    elif kind == "probe":
        container["readinessProbe"]["httpGet"]["host"] = value
    return out


@pytest.mark.parametrize("check", list(_MUTATIONS))
def test_each_check_refuses_its_violation(check: str) -> None:
    [template, *_] = _worker_templates(EXAMPLES_DIR / "tiny-cpu.yaml")
    failed = violations(_mutate(template, *_MUTATIONS[check]))
    assert set(failed) == {check} | _ALSO.get(check, set()), failed


def test_the_pre_hardening_worker_pod_fails_four_restricted_checks() -> None:
    """What the operator rendered before: no security contexts at all."""
    [template, *_] = _worker_templates(EXAMPLES_DIR / "tiny-cpu.yaml")
    bare = copy.deepcopy(template)
    bare["spec"].pop("securityContext")
    for container in bare["spec"]["containers"]:
        container.pop("securityContext")
    assert set(violations(bare)) == {
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile_restricted",
        "capabilities_restricted",
    }


def test_worker_root_filesystem_is_read_only_with_writable_tmp_and_caches() -> None:
    [template, *_] = _worker_templates(EXAMPLES_DIR / "sdturbo-sdv15.yaml")
    pod = template["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in manifests_containers(pod):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[manifests.TMP_DIR] == "tmp" and mounts[manifests.CACHE_DIR] == "cache"
        assert all("emptyDir" in volumes[name] for name in mounts.values())
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TMPDIR"] == env["HOME"] == manifests.TMP_DIR
        assert env["XDG_CACHE_HOME"] == manifests.CACHE_DIR
        assert env["HF_HOME"]  # the model fetcher keeps its own: the model cache volume
    [worker] = pod["containers"]
    assert {"name": "HF_HOME", "value": f"{manifests.CACHE_DIR}/huggingface"} in worker["env"]


def test_a_variant_env_wins_over_the_writable_defaults_without_duplicates() -> None:
    raw = load_yaml(EXAMPLES_DIR / "tiny-cpu.yaml")
    raw["spec"]["variants"][0]["env"] = [{"name": "HF_HOME", "value": "/mnt/hub"}]
    spec = load_manifest(raw)[1]
    dep = manifests.deployment(
        cascade="c", namespace="ns", spec=spec, index=0, replicas=1, settings=SETTINGS
    )
    [worker] = dep["spec"]["template"]["spec"]["containers"]
    assert [e["value"] for e in worker["env"] if e["name"] == "HF_HOME"] == ["/mnt/hub"]


def manifests_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_init_containers_are_hardened_too() -> None:
    pod = manifests.harden_pod(
        {"initContainers": [{"name": "fetch", "image": "i"}], "containers": [{"name": "w"}]}
    )
    assert violations({"spec": pod}) == {}
    [init] = pod["initContainers"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_child_the_operator_renders_is_valid_kubernetes(path: Path) -> None:
    from diffcascade_operator.plan import Plan, SolverOutcome, SolverStatus, VariantAllocation

    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    spec = _spec(path)
    plan = Plan(
        variants=tuple(
            VariantAllocation(v.name, 1, 1, 0.5 if i + 1 < len(spec.variants) else None)
            for i, v in enumerate(spec.variants)
        ),
        threshold=0.5,
        defer_fraction=0.5,
        demand_qps=1.0,
        predicted_latency_s=1.0,
        predicted_throughput_qps=1.0,
        predicted_fid=None,
        solver=SolverOutcome(SolverStatus.INITIAL, 0.0),
        reason="test",
        decided_at=0.0,
    )
    settings = OperatorSettings(
        operator_namespace="ops",
        operator_pod_labels={"app.kubernetes.io/name": "diffcascade"},
        scraper_peers=({"podSelector": {"matchLabels": {"app": "prometheus"}}},),
    )
    children = manifests.children(
        cascade="c",
        namespace="ns",
        spec=spec,
        plan=plan,
        replicas=plan.replicas(),
        token="t",
        settings=settings,
    )
    kinds = {c["kind"] for c in children}
    assert {"NetworkPolicy", "PodDisruptionBudget", "Deployment"} <= kinds
    for child in children:
        kubernetes_validate.validate(child, KUBERNETES_VERSION, strict=True)
