"""What a cascade's author may ask the operator to run: allowed images and env variables.

The operator, not the author, creates the worker pods, so whoever may create a cascade would
otherwise run any image and read any Secret of the namespace with the operator's rights. The
chart sets the allowlists (`allowedImageRegistries`, `allowedEnvSecrets`); a cascade outside
them is refused with a status condition and an Event, and nothing it names is created.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.spec import CascadeSpec, InvalidSpec

#: The env names the operator sets on every worker (token, plan, worker settings).
RESERVED_ENV_PREFIX = "DIFFCASCADE_"

# The reference grammar of the distribution project (docker/distribution reference/regexp.go),
# written out: [domain/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?"
)
DEFAULT_REGISTRY = "docker.io"


class ForbiddenSpec(InvalidSpec):
    """A well-formed spec that asks for what this operator's policy does not allow."""


def repository(image: str) -> str:
    """`registry/path` of an image reference, the registry made explicit (docker.io default).

    Raises ValueError for what is not an image reference."""
    match = _REFERENCE.fullmatch(image.strip())
    if match is None:
        raise ValueError(f"{image!r} is not an image reference")
    name = match["name"]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return f"{first.lower()}/{rest}"
    return f"{DEFAULT_REGISTRY}/{name if rest else 'library/' + name}"


def _prefix(entry: str) -> str:
    entry = entry.strip().rstrip("/").lower()
    first, _, rest = entry.partition("/")
    if first in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return DEFAULT_REGISTRY + (f"/{rest}" if rest else "")
    return entry


def image_allowed(image: str, allowed: Iterable[str]) -> bool:
    """True when `image` lies under one of the `allowed` registries or registry/path prefixes
    (a whole path component must match: `ghcr.io/acme` does not allow `ghcr.io/acme-evil`)."""
    repo = repository(image)
    return any(repo == p or repo.startswith(p + "/") for p in map(_prefix, allowed) if p)


def _image_problems(spec: CascadeSpec, settings: OperatorSettings) -> list[str]:
    fields: list[tuple[str, str]] = []
    if spec.worker_image:
        fields.append(("spec.workerImage", spec.worker_image))
    fields += [
        (f"spec.variants[{i}].image", v.image) for i, v in enumerate(spec.variants) if v.image
    ]
    problems = []
    for path, image in fields:
        try:
            repository(image)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        allowed = settings.allowed_image_registries
        if allowed and image != settings.worker_image and not image_allowed(image, allowed):
            problems.append(
                f"{path}: image {image!r} is not from an allowed registry "
                f"({', '.join(allowed)}; the chart's allowedImageRegistries)"
            )
    return problems


def _secret_allowed(name: object, settings: OperatorSettings) -> bool:
    allowed = settings.allowed_env_secrets
    return allowed is None or name in allowed


def _env_problems(spec: CascadeSpec, settings: OperatorSettings) -> list[str]:
    problems = []
    storage_secret = getattr(spec.storage, "secret_name", None) if spec.storage else None
    if storage_secret and not _secret_allowed(storage_secret, settings):
        problems.append(
            f"spec.storage.secretName: Secret {storage_secret!r} is not in the operator's "
            "allowedEnvSecrets"
        )
    keys_secret = spec.api_keys.secret_name if spec.api_keys else None
    if keys_secret and not _secret_allowed(keys_secret, settings):
        problems.append(
            f"spec.apiKeys.secretName: Secret {keys_secret!r} is not in the operator's "
            "allowedEnvSecrets"
        )
    for i, variant in enumerate(spec.variants):
        for j, var in enumerate(variant.env or []):
            path = f"spec.variants[{i}].env[{j}]"
            name = var.get("name")
            if not isinstance(name, str) or not name:
                problems.append(f"{path}: needs a name")
                continue
            if name.upper().startswith(RESERVED_ENV_PREFIX):
                problems.append(f"{path}: {name} is set by the operator and cannot be overridden")
            source = var.get("valueFrom") or {}
            if not isinstance(source, dict):
                problems.append(f"{path}: valueFrom must be an object")
                continue
            ref = source.get("secretKeyRef")
            if ref is not None:
                secret = ref.get("name") if isinstance(ref, dict) else None
                if not _secret_allowed(secret, settings):
                    problems.append(
                        f"{path}: {name} reads Secret {secret!r}, which is not in the "
                        "operator's allowedEnvSecrets"
                    )
    return problems


def policy_problems(spec: CascadeSpec, settings: OperatorSettings) -> Sequence[str]:
    """Everything in `spec` the operator's policy refuses (empty: allowed)."""
    return [*_image_problems(spec, settings), *_env_problems(spec, settings)]


def check_spec(spec: CascadeSpec, settings: OperatorSettings) -> None:
    """Raise ForbiddenSpec naming every refused field."""
    problems = policy_problems(spec, settings)
    if problems:
        raise ForbiddenSpec("; ".join(problems))
