"""`diffcascade up` on a cascade whose models are storage URIs: fetch them as a pod would.

In a cluster a `fetch` init container puts every hf://, http(s):// and s3:// artefact of a
variant into the model cache and the worker loads the local copy; here `up` calls the same
function (`diffcascade_worker.storage.uris.fetch`) into a cache folder on this machine, then
runs the cascade with the fetched paths. A `deferCurve.path` URI is fetched the way the
operator fetches it (`kube.curve_files`). `pvc://` has no meaning off a cluster and is refused.
Credentials come from this environment: HF_TOKEN, AWS_* (and `spec.storage.s3Endpoint`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffcascade_worker.storage.uris import (
    Credentials,
    Scheme,
    StorageError,
    fetch,
    parse_uri,
)

#: Where `up` keeps fetched models unless told otherwise (`--cache-dir`), under the working
#: directory beside the tiny models.
DEFAULT_CACHE = Path(".models") / "fetched"


class FetchFailed(ValueError):
    """A model URI that could not be fetched; the message names the variant and why."""


@dataclass(frozen=True)
class Fetched:
    variant: str
    field: str  # model, gate
    uri: str
    path: Path


def _credentials(spec: Mapping[str, Any]) -> Credentials:
    storage = spec.get("storage") or {}
    base = Credentials.from_env()
    endpoint = storage.get("s3Endpoint") or base.s3_endpoint
    region = storage.get("s3Region") or base.s3_region
    return Credentials(**{**base.__dict__, "s3_endpoint": endpoint, "s3_region": region})


def remote_uris(document: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(variant, field, URI) of every artefact a pod would fetch (nothing for local paths)."""
    found = []
    for variant in (document.get("spec") or {}).get("variants") or []:
        if not isinstance(variant, Mapping):
            continue
        name = str(variant.get("name"))
        fields = [("model", variant.get("model"), True)]
        gate = (variant.get("gate") or {}).get("discriminator") or {}
        fields.append(("gate", gate.get("uri"), False))
        for field, value, bare in fields:
            if not isinstance(value, str):
                continue
            try:
                parsed = parse_uri(value, bare_hub_ids=bare)
            except StorageError:
                continue  # the spec's own validation names a malformed URI
            if parsed.needs_fetch or parsed.scheme is Scheme.PVC:
                found.append((name, field, value))
    return found


def fetch_cascade_models(
    document: Mapping[str, Any],
    *,
    cache_dir: Path,
    on_fetch: Callable[[str, str, str], None] | None = None,
    credentials: Credentials | None = None,
) -> tuple[dict[str, Any], list[Fetched]]:
    """A copy of the DiffusionCascade `document` whose remote models and gates point at their
    fetched copies under `cache_dir` (fetched once: a finished fetch is not repeated)."""
    out = copy.deepcopy(dict(document))
    spec = out.get("spec") or {}
    todo = remote_uris(out)
    if not todo:
        return out, []
    credentials = credentials or _credentials(spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    variants = {str(v.get("name")): v for v in spec.get("variants") or []}
    done: list[Fetched] = []
    for name, field, uri in todo:
        if parse_uri(uri, bare_hub_ids=field == "model").scheme is Scheme.PVC:
            raise FetchFailed(
                f"variant {name}: {field} {uri} is on a PersistentVolumeClaim, which only a "
                "cluster mounts; copy it here and give its path"
            )
        if on_fetch is not None:
            on_fetch(name, field, uri)
        try:
            path = fetch(uri, cache_dir=cache_dir.resolve(), credentials=credentials)
        except (StorageError, OSError) as exc:
            raise FetchFailed(f"variant {name}: cannot fetch {field} {uri}: {exc}") from None
        variant = variants[name]
        if field == "model":
            variant["model"] = str(path)
        else:
            variant["gate"]["discriminator"]["uri"] = str(path)
        done.append(Fetched(name, field, uri, path))
    return out, done


class _NoCluster:
    """The curve fetch reads no Secret off a cluster: credentials come from this environment."""

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return None


def fetch_curves(document: Mapping[str, Any], *, cache_dir: Path) -> dict[str, Any]:
    """`document` with each remote `gate.deferCurve.path` replaced by its fetched file."""
    from diffcascade_operator.kube.curve_files import resolve_curve_uris
    from diffcascade_operator.spec import InvalidSpec

    out = copy.deepcopy(dict(document))
    try:
        out["spec"] = resolve_curve_uris(
            out.get("spec") or {}, api=_NoCluster(), namespace="", cache_dir=cache_dir
        )
    except InvalidSpec as exc:
        raise FetchFailed(str(exc)) from None
    return out
