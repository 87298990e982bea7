"""How a worker pod gets its model, gate and curve: cache volume, fetch init container, mounts.

KServe's storage initializer, for diffcascade: every remote URI of a variant (hf://, http(s)://,
s3://, a bare hub id) is fetched by an init container (`diffcascade-worker fetch`, the worker
image) into the model cache volume, mounted at /models in both containers; pvc:// claims are
mounted read-only at /mnt/pvc/<claim> and read in place. The serving container is given the
local paths (`storage.local_path`, the same function the init container writes with) and
HF_HUB_OFFLINE=1, so it never reaches the hub. The hub token and S3 keys come from the
Secret named in `spec.storage.secretName`, each key optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffcascade_worker.storage.uris import CACHE_MOUNT, PVC_MOUNT, Scheme, local_path, parse_uri

from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.spec import CascadeSpec, VariantSpec

CACHE_VOLUME = "model-cache"
HF_HOME = f"{CACHE_MOUNT}/.huggingface"  # the hub cache lives on the model cache volume
#: Keys read from the storage Secret when present (secretKeyRef optional: true).
SECRET_KEYS = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def claim_volume(claim: str) -> str:
    return f"pvc-{claim}"[:63].rstrip("-.")


@dataclass(frozen=True)
class VariantStorage:
    """What one variant's pods load, as paths inside the pod, and what gets them there."""

    model: str
    gate: str | None
    fetch: tuple[str, ...]  # URIs the init container fetches, in order
    claims: tuple[str, ...]  # PVCs mounted read-only
    unet: str | None = None  # the replacement UNet's path in the pod
    fetch_args: tuple[str, ...] = ()  # `fetch` arguments after --cache-dir

    @property
    def fetched(self) -> bool:
        return bool(self.fetch)


def variant_storage(variant: VariantSpec) -> VariantStorage:
    """Paths in the pod, and a `fetch` told what the worker will load of the pipeline: the
    same assembly flags as the worker's (weights variant, safety checker, replaced UNet), so
    it downloads only those files (`diffcascade_worker.storage.pipeline_files`)."""
    gate = variant.gate.discriminator if variant.gate is not None else None
    model = parse_uri(variant.model, bare_hub_ids=True)
    unet = parse_uri(variant.unet) if variant.unet is not None else None
    gate_uri = parse_uri(gate.uri) if gate is not None else None
    parsed = [p for p in (model, unet, gate_uri) if p is not None]
    fetch = tuple(dict.fromkeys(p.raw for p in parsed if p.needs_fetch))
    claims = tuple(dict.fromkeys(p.host for p in parsed if p.scheme is Scheme.PVC))
    assembly = variant.assembly()
    args: list[str] = []
    if model.needs_fetch:
        args.append(f"--model={model.raw}")
        # The replacement's flag also tells fetch to skip the base's UNet weights.
        args += assembly.flags(for_fetch=True)
    elif unet is not None and unet.needs_fetch:
        args.append(f"--unet={unet.raw}")
    if gate_uri is not None and gate_uri.needs_fetch and gate_uri.raw not in args:
        args.append(gate_uri.raw)
    return VariantStorage(
        model=local_path(model),
        gate=local_path(gate_uri) if gate_uri is not None else None,
        fetch=fetch,
        claims=claims,
        unet=local_path(unet) if unet is not None else None,
        fetch_args=tuple(args),
    )


def cache_volume(spec: CascadeSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The spec's PVC, else the operator's (Helm value), else an emptyDir per pod."""
    storage = spec.storage
    claim = (storage.cache_claim_name if storage else None) or settings.model_cache_claim
    if claim:
        return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    empty: dict[str, Any] = {}
    if storage is not None and storage.cache_size_limit:
        empty["sizeLimit"] = storage.cache_size_limit
    return {"name": CACHE_VOLUME, "emptyDir": empty}


def fetch_env(spec: CascadeSpec) -> list[dict[str, Any]]:
    """Credentials (from the storage Secret, each optional) and the S3 endpoint for `fetch`."""
    storage = spec.storage
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        {"name": "TMPDIR", "value": "/tmp"},
    ]
    if storage is None:
        return env
    if storage.secret_name:
        env += [
            {
                "name": key,
                "valueFrom": {
                    "secretKeyRef": {"name": storage.secret_name, "key": key, "optional": True}
                },
            }
            for key in SECRET_KEYS
        ]
    if storage.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.s3_endpoint})
    if storage.s3_region:
        env.append({"name": "AWS_REGION", "value": storage.s3_region})
    return env


def volume_mounts(vs: VariantStorage, *, read_only: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT, "readOnly": read_only}
    ]
    mounts += [
        {"name": claim_volume(c), "mountPath": f"{PVC_MOUNT}/{c}", "readOnly": True}
        for c in vs.claims
    ]
    return mounts


def fetch_container(*, image: str, spec: CascadeSpec, vs: VariantStorage) -> dict[str, Any]:
    return {
        "name": "fetch",
        "image": image,
        "command": ["diffcascade-worker"],
        "args": ["fetch", f"--cache-dir={CACHE_MOUNT}", *vs.fetch_args],
        "env": fetch_env(spec),
        "volumeMounts": volume_mounts(vs, read_only=False),
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
    }


def add_storage(
    pod: dict[str, Any],
    *,
    spec: CascadeSpec,
    variant: VariantSpec,
    image: str,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """Add the cache volume, claims, the fetch init container and the mounts to a pod spec
    whose first container loads the variant; returns the pod spec."""
    vs = variant_storage(variant)
    volumes = pod.setdefault("volumes", [])
    volumes.append(cache_volume(spec, settings))
    volumes += [
        {"name": claim_volume(c), "persistentVolumeClaim": {"claimName": c, "readOnly": True}}
        for c in vs.claims
    ]
    main = pod["containers"][0]
    main.setdefault("volumeMounts", []).extend(volume_mounts(vs, read_only=True))
    if vs.fetched:
        pod.setdefault("initContainers", []).insert(
            0, fetch_container(image=image, spec=spec, vs=vs)
        )
        # Loaded from the cache only: a serving pod never reaches the hub.
        main.setdefault("env", []).insert(0, {"name": "HF_HUB_OFFLINE", "value": "1"})
    if variant.node_selector:
        pod["nodeSelector"] = dict(variant.node_selector)
    if variant.tolerations:
        pod["tolerations"] = [dict(t) for t in variant.tolerations]
    return pod
