"""`diffcascade render`: the operator's own manifests for a cascade, under the chart's values.

Every rendered object is validated against the Kubernetes schemas (kubernetes-validate); the
chart-values-to-settings mapping is checked against the real Helm engine in
tests/packaging/test_helm_chart.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from diffcascade_operator.cli import main
from diffcascade_operator.kube.render import TOKEN_PLACEHOLDER, UID_PLACEHOLDER

REPO = Path(__file__).resolve().parents[3]
GPU_EXAMPLE = REPO / "examples" / "sdturbo-sdv15.yaml"
DIGEST = "sha256:" + "ab" * 32


def _render(*args: str) -> tuple[int, str, list[dict[str, Any]]]:
    result = CliRunner().invoke(main, ["render", *args])
    docs = [d for d in yaml.safe_load_all(result.stdout) if d] if result.exit_code == 0 else []
    return result.exit_code, result.output, docs


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


def test_render_prints_every_child_of_the_gpu_example_valid_and_owned() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    code, output, docs = _render(str(GPU_EXAMPLE), "-n", "images")
    assert code == 0, output
    assert _kinds(docs) == [
        "Job/" + docs[0]["metadata"]["name"],
        "Job/" + docs[1]["metadata"]["name"],
        "Secret/turbo-v15-token",
        "ConfigMap/turbo-v15-plan",
        "Service/turbo-v15-sd-turbo",
        "NetworkPolicy/turbo-v15-sd-turbo",
        "PodDisruptionBudget/turbo-v15-sd-turbo",
        "Deployment/turbo-v15-sd-turbo",
        "Service/turbo-v15-sd-v1-5",
        "NetworkPolicy/turbo-v15-sd-v1-5",
        "PodDisruptionBudget/turbo-v15-sd-v1-5",
        "Deployment/turbo-v15-sd-v1-5",
        "Service/turbo-v15",  # the pre-generation router: the cascade's one stable endpoint
        "NetworkPolicy/turbo-v15",
        "PodDisruptionBudget/turbo-v15",
        "Deployment/turbo-v15",
    ]
    assert docs[0]["metadata"]["name"].startswith("turbo-v15-profile-sd-turbo-")
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        assert doc["metadata"]["namespace"] == "images"
        [owner] = doc["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "DiffusionCascade",
            "turbo-v15",
            UID_PLACEHOLDER,
        )
    assert docs[2]["stringData"]["token"] == TOKEN_PLACEHOLDER
    deployment = docs[7]["spec"]["template"]["spec"]
    assert deployment["containers"][0]["image"] == "ghcr.io/diffcascade/worker:0.1.0"
    assert [c["name"] for c in deployment["initContainers"]] == ["fetch"]
    # The operator's pods are let in by the chart's release labels (release `diffcascade`).
    peers = docs[9]["spec"]["ingress"][0]["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "diffcascade-system"}},
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "diffcascade",
                "app.kubernetes.io/instance": "diffcascade",
                "app.kubernetes.io/component": "operator",
            }
        },
    } in peers
    assert output.startswith("# profile.auto (sd-turbo, sd-v1-5): the Jobs run first")


def test_render_applies_the_values_file_over_the_chart_defaults(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "workerImage": {"repository": "registry.example.com/ml/worker", "digest": DIGEST},
                "allowedImageRegistries": ["registry.example.com/ml"],
                "networkPolicy": {"enabled": False},
                "modelCache": {"claimName": "models"},
                "workerResources": {"requests": {"cpu": "4", "memory": "16Gi"}},
            }
        )
    )
    code, output, docs = _render(str(GPU_EXAMPLE), "--values", str(values), "-n", "images")
    assert code == 0, output
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    [worker] = deployment["containers"]
    assert worker["image"] == f"registry.example.com/ml/worker@{DIGEST}"
    assert worker["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    cache = next(v for v in deployment["volumes"] if v["name"] == "model-cache")
    assert cache["persistentVolumeClaim"] == {"claimName": "models"}


def test_render_refuses_what_the_operators_policy_refuses(tmp_path: Path) -> None:
    doc = yaml.safe_load(GPU_EXAMPLE.read_text())
    doc["spec"]["variants"][0]["image"] = "docker.io/someone/worker:latest"
    cascade = tmp_path / "cascade.yaml"
    cascade.write_text(yaml.safe_dump(doc))
    code, output, _ = _render(str(cascade))
    assert code == 1
    assert "refused by the operator's policy" in output
    assert "spec.variants[0].image: image 'docker.io/someone/worker:latest' is not from an" in (
        output
    )


def test_render_names_an_invalid_spec_and_a_file_that_is_no_cascade(tmp_path: Path) -> None:
    doc = yaml.safe_load(GPU_EXAMPLE.read_text())
    doc["spec"]["sloSeconds"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    code, output, _ = _render(str(bad))
    assert code == 1 and "the spec is invalid" in output and "sloSeconds" in output
    other = tmp_path / "deployment.yaml"
    other.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    code, output, _ = _render(str(other))
    assert code == 1 and "not a DiffusionCascade" in output


@pytest.mark.parametrize("name", ["1abc", "my.cascade", "c" * 60])
def test_render_refuses_a_cascade_name_no_child_could_take_as_the_operator_does(
    tmp_path: Path, name: str
) -> None:
    doc = yaml.safe_load(GPU_EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    cascade = tmp_path / "cascade.yaml"
    cascade.write_text(yaml.safe_dump(doc))
    code, output, _ = _render(str(cascade))
    assert code == 1 and "the spec is invalid" in output
    assert "metadata.name" in output or "must fit in 63" in " ".join(output.split())


def test_render_runs_the_router_the_values_ask_for(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "router": {
                    "replicas": 3,
                    "port": 9000,
                    "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}},
                    "scorer": "rule",
                    "explorationShare": 0.2,
                }
            }
        )
    )
    code, output, docs = _render(str(GPU_EXAMPLE), "--values", str(values), "-n", "images")
    assert code == 0, output
    router = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "turbo-v15"
    )
    [container] = router["spec"]["template"]["spec"]["containers"]
    assert router["spec"]["replicas"] == 3
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "128Mi"}
    args = container["args"]
    assert args[args.index("--scorer") + 1] == "rule"
    assert args[args.index("--exploration-share") + 1] == "0.2"
    assert args[args.index("--port") + 1] == "9000"
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "turbo-v15"
    )
    assert service["spec"]["ports"][0]["port"] == 9000

    values.write_text(yaml.safe_dump({"router": {"enabled": False}}))
    code, output, docs = _render(str(GPU_EXAMPLE), "--values", str(values), "-n", "images")
    assert code == 0, output
    assert not [d for d in docs if d["metadata"]["name"] == "turbo-v15"]


def test_render_refuses_bad_router_values_with_the_charts_message(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"router": {"scorer": "fastest"}}))
    code, output, _ = _render(str(GPU_EXAMPLE), "--values", str(values))
    assert code == 1
    assert 'router.scorer must be learned, rule or none, not "fastest"' in output
