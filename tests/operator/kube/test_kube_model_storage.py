"""Storage URIs rendered into worker pods and profiling Jobs: init container, volumes, Secrets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from diffcascade_operator.kube import manifests, profiling
from diffcascade_operator.kube.model_storage import CACHE_VOLUME, HF_HOME, variant_storage
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.spec import CascadeSpec, InvalidSpec, parse_spec

REPO = Path(__file__).resolve().parents[3]
GPU_EXAMPLE = REPO / "examples" / "sdturbo-sdv15.yaml"
SETTINGS = OperatorSettings()
KUBERNETES_VERSION = "1.30.0"


def _raw() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(GPU_EXAMPLE.read_text())["spec"]
    return spec


def _spec(**storage: Any) -> CascadeSpec:
    raw = _raw()
    if storage:
        raw["storage"] = storage
    return parse_spec(raw)


def _pod(spec: CascadeSpec, index: int = 0) -> dict[str, Any]:
    dep = manifests.deployment(
        cascade="turbo-v15",
        namespace="images",
        spec=spec,
        index=index,
        replicas=1,
        settings=SETTINGS,
    )
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    return pod


def test_hub_models_are_fetched_by_an_init_container_and_loaded_offline() -> None:
    pod = _pod(_spec())
    [init] = pod["initContainers"]
    assert init["args"] == [
        "fetch",
        "--cache-dir=/models",
        "--model=hf://stabilityai/sd-turbo",  # the pipeline: only what the worker loads of it
        "--weights-variant=fp16",
        "hf://openai/clip-vit-base-patch32",
    ]
    assert {"name": "HF_HOME", "value": HF_HOME} in init["env"]
    worker = pod["containers"][0]
    assert "--model=/models/hf/stabilityai/sd-turbo/main" in worker["args"]
    assert "--gate=/models/hf/openai/clip-vit-base-patch32/main" in worker["args"]
    assert worker["env"][0] == {"name": "HF_HUB_OFFLINE", "value": "1"}
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and mounts["/models"]["name"] == CACHE_VOLUME
    assert {m["mountPath"]: m.get("readOnly") for m in init["volumeMounts"]}["/models"] is False
    assert {"name": CACHE_VOLUME, "emptyDir": {}} in pod["volumes"]


def test_storage_secret_pvc_cache_and_s3_endpoint_reach_only_the_init_container() -> None:
    spec = _spec(
        secretName="hf-token",
        cacheClaimName="model-cache",
        s3Endpoint="http://minio.storage:9000",
        s3Region="eu-west-1",
    )
    pod = _pod(spec)
    env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    for key in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "hf-token", "key": key, "optional": True}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    worker_env = {e["name"] for e in pod["containers"][0]["env"]}
    assert not worker_env & {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY"}  # the server never sees keys
    assert {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": "model-cache"}} in pod[
        "volumes"
    ]


def test_the_operators_cache_claim_and_an_emptydir_size_limit() -> None:
    settings = OperatorSettings(model_cache_claim="shared-models")
    dep = manifests.deployment(
        cascade="c", namespace="n", spec=_spec(), index=1, replicas=0, settings=settings
    )
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": CACHE_VOLUME,
        "persistentVolumeClaim": {"claimName": "shared-models"},
    } in volumes
    assert {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": "40Gi"}} in _pod(
        _spec(cacheSizeLimit="40Gi")
    )["volumes"]


def test_pvc_uris_are_mounted_read_only_and_not_fetched() -> None:
    raw = _raw()
    raw["variants"][0]["model"] = "pvc://weights/sd-turbo"
    raw["variants"][0]["gate"]["discriminator"] = {
        "uri": "pvc://weights/gates/turbo.pt",
        "architecture": "efficientnet_v2_s",
    }
    pod = _pod(parse_spec(raw))
    assert "initContainers" not in pod
    worker = pod["containers"][0]
    assert "--model=/mnt/pvc/weights/sd-turbo" in worker["args"]
    assert "--gate=/mnt/pvc/weights/gates/turbo.pt" in worker["args"]
    assert {"name": "pvc-weights", "mountPath": "/mnt/pvc/weights", "readOnly": True} in worker[
        "volumeMounts"
    ]
    assert {
        "name": "pvc-weights",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]
    assert all(e["name"] != "HF_HUB_OFFLINE" for e in worker["env"])


def test_plain_paths_stay_as_written() -> None:
    raw = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    vs = variant_storage(parse_spec(raw).variants[0])
    assert (vs.model, vs.gate, vs.fetch, vs.claims) == (
        ".models/tiny-light",
        ".models/tiny-light/gate.pt",
        (),
        (),
    )


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (("variants", 0, "model"), "ftp://host/x", "unknown scheme"),
        (("variants", 0, "gate", "discriminator", "uri"), "s3://b/k", "bucket"),
        (("storage",), {"secretName": "Bad_Name"}, "pattern"),
        (("storage",), {"s3Endpoint": "minio:9000"}, "pattern"),
        (("variants", 0, "profile"), {"startupSeconds": 1}, "auto"),
    ],
)
def test_bad_storage_fields_are_invalid_specs(path: tuple[Any, ...], value: Any, says: str) -> None:
    raw = copy.deepcopy(_raw())
    node: Any = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(InvalidSpec, match=says):
        parse_spec(raw)


def test_the_profiling_job_runs_on_the_variants_nodes_with_the_same_storage() -> None:
    raw = _raw()
    raw["variants"][0]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    raw["variants"][0]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    spec = parse_spec(raw)
    key = profiling.profile_key(spec, spec.variants[0], SETTINGS)
    job = profiling.profile_job(
        cascade="turbo-v15", namespace="images", spec=spec, index=0, key=key, settings=SETTINGS
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    [main] = pod["containers"]
    assert main["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "--termination-message=/dev/termination-log" in main["args"]
    assert "--gate=/models/hf/openai/clip-vit-base-patch32/main" in main["args"]
    assert "--batch-sizes=1,2,4,8,16" in main["args"] and f"--key={key}" in main["args"]
    assert pod["initContainers"][0]["name"] == "fetch"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels.get("app.kubernetes.io/managed-by") is None  # never a worker pod
    assert manifests.LABEL_CASCADE not in labels


def test_the_profile_key_changes_with_what_changes_the_measurement() -> None:
    spec = _spec()
    base = profiling.profile_key(spec, spec.variants[0], SETTINGS)
    changes: tuple[tuple[str, Any], ...] = (
        ("steps", 2),
        ("resolution", 768),
        ("model", "hf://acme/turbo"),
        ("weightsVariant", None),  # the example's fp16: the fp32 files are another pipeline
        ("unet", "hf://acme/unets/fast_unet.safetensors"),
        ("scheduler", {"class": "EulerDiscreteScheduler", "config": {"timestep_spacing": "x"}}),
    )
    for field, value in changes:
        raw = _raw()
        raw["variants"][0][field] = value
        if value is None:
            del raw["variants"][0][field]
        changed = parse_spec(raw)
        assert profiling.profile_key(changed, changed.variants[0], SETTINGS) != base
    raw = _raw()
    raw["control"]["headroom"] = 1.2  # planning knobs do not re-profile
    same = parse_spec(raw)
    assert profiling.profile_key(same, same.variants[0], SETTINGS) == base
    long = profiling.job_name("c" * 60, "v" * 40, base)
    assert len(long) <= 63 and long.endswith(long[-8:])


def test_rendered_pods_jobs_and_configmaps_are_valid_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    spec = _spec(secretName="hf-token", cacheClaimName="model-cache")
    docs = [
        manifests.deployment(
            cascade="turbo-v15",
            namespace="images",
            spec=spec,
            index=i,
            replicas=1,
            settings=SETTINGS,
        )
        for i in range(2)
    ]
    for i, variant in enumerate(spec.variants):
        key = profiling.profile_key(spec, variant, SETTINGS)
        docs.append(
            profiling.profile_job(
                cascade="turbo-v15",
                namespace="images",
                spec=spec,
                index=i,
                key=key,
                settings=SETTINGS,
            )
        )
        measured = profiling.MeasuredProfile(key=key, batch_latency_ms={1: 10.0, 2: 15.0})
        docs.append(
            profiling.profile_configmap(
                cascade="turbo-v15", namespace="images", variant=variant.name, measured=measured
            )
        )
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
