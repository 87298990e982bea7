"""Deferral-curve files named by a storage URI: fetched by the operator, which plans with them.

`gate.deferCurve.path` may be a file in the operator's pod, or an `http(s)://` file (a hub
repo's file is `https://huggingface.co/ORG/NAME/resolve/REVISION/FILE`, sent with HF_TOKEN)
or an `s3://` object, with the credentials of `spec.storage.secretName`. The curve is small
JSON and the operator, not a worker, reads it, so the operator fetches it itself into a local
cache (once per URI: change the URI to change the curve) and plans with the local copy.
`pvc://` is refused: the operator does not mount its cascades' claims.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffcascade_worker.storage.uris import (
    Credentials,
    Scheme,
    StorageError,
    fetch,
    parse_uri,
)

from diffcascade_operator.spec import InvalidSpec

CACHE_DIR = Path(tempfile.gettempdir()) / "diffcascade-curves"
FETCH_TIMEOUT_S = 10.0  # a control step must not hang on a slow store


def _credentials(raw: Mapping[str, Any], *, api: Any, namespace: str) -> Credentials:
    storage = raw.get("storage") or {}
    secret = storage.get("secretName")
    data: dict[str, str] = {}
    if secret:
        data = api.read_secret_data(namespace, secret) or {}
    base = Credentials.from_env(data)
    return Credentials(
        hf_token=base.hf_token,
        s3_access_key=base.s3_access_key,
        s3_secret_key=base.s3_secret_key,
        s3_session_token=base.s3_session_token,
        s3_endpoint=storage.get("s3Endpoint") or None,
        s3_region=storage.get("s3Region") or base.s3_region,
    )


def resolve_curve_uris(
    raw: Mapping[str, Any], *, api: Any, namespace: str, cache_dir: Path = CACHE_DIR
) -> dict[str, Any]:
    """`raw` with each remote `deferCurve.path` replaced by its fetched local file.

    InvalidSpec names the variant and why (a bad URI, a pvc:// path, a failed download)."""
    out = copy.deepcopy(dict(raw))
    credentials: Credentials | None = None
    for variant in out.get("variants") or []:
        curve = (
            ((variant.get("gate") or {}).get("deferCurve") or {})
            if isinstance(variant, dict)
            else {}
        )
        path = curve.get("path") if isinstance(curve, dict) else None
        if not isinstance(path, str) or "://" not in path:
            continue
        where = f"variants[{variant.get('name')}].gate.deferCurve.path"
        try:
            uri = parse_uri(path)
            if uri.scheme is Scheme.PVC:
                raise StorageError(f"{path}: the operator cannot read a PVC; use http(s), hf or s3")
            if credentials is None:
                credentials = _credentials(out, api=api, namespace=namespace)
            local = fetch(
                uri, cache_dir=cache_dir, credentials=credentials, timeout_s=FETCH_TIMEOUT_S
            )
        except StorageError as error:
            raise InvalidSpec(f"{where}: {error}") from None
        if local.is_dir():
            raise InvalidSpec(f"{where}: {path} is a folder, not a curve file")
        curve["path"] = str(local)
    return out
