"""Storage URIs for models, gates and curve files, and fetching them into a model cache.

Works like KServe's storage initializer: an init container (`diffcascade-worker fetch`) puts
every remote artefact of a pod into a shared cache volume, and the serving container then
loads local folders only (`HF_HUB_OFFLINE=1`), so a pod never reaches the hub while serving.

    hf://org/name[@revision]   a Hugging Face Hub repository (a bare `org/name` model too)
    hf://org/name[@rev]/path   one file or folder of a hub repository (e.g. one UNet file)
    pvc://claim/path           a path on a PersistentVolumeClaim, mounted read-only, not copied
    http(s)://host/path        one file; .tar.gz/.tgz/.tar/.zip archives are unpacked
    s3://bucket/key            one object, or every object under a key ending in '/'
    anything else              a path that is already in the pod (image, hostPath, ...)

`local_path` is pure and stdlib-only, so the operator (no torch, no hub client) renders the
same paths the init container writes. Credentials come from the environment: HF_TOKEN,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_REGION, and the S3
endpoint from AWS_ENDPOINT_URL (an S3-compatible store such as MinIO).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from xml.etree import ElementTree

from diffcascade_worker.storage.pipeline_files import (
    PipelineSelection,
    select_folder_files,
    select_pipeline_files,
    unloadable_components,
)

CACHE_MOUNT = "/models"  # where the model cache volume is mounted in worker pods
PVC_MOUNT = "/mnt/pvc"  # pvc://claim/... is mounted at PVC_MOUNT/claim
DONE_MARKER = ".diffcascade-fetched"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
DEFAULT_REGION = "us-east-1"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class Scheme(StrEnum):
    HF = "hf"
    PVC = "pvc"
    HTTP = "http"
    S3 = "s3"
    LOCAL = "local"


class StorageError(ValueError):
    """A storage URI that cannot be parsed or fetched; the message says which and why."""


@dataclass(frozen=True)
class StorageUri:
    """A parsed storage URI. `path` is the repo id, the object key, the URL or the path."""

    raw: str
    scheme: Scheme
    host: str = ""  # hf: '' ; pvc: claim ; http: netloc ; s3: bucket
    path: str = ""
    revision: str | None = None
    file: str = ""  # hf: a file or folder inside the repository ('' for all of it)

    @property
    def needs_fetch(self) -> bool:
        """Whether an init container must copy it into the cache (pvc and local: no)."""
        return self.scheme in (Scheme.HF, Scheme.HTTP, Scheme.S3)

    @property
    def is_archive(self) -> bool:
        return self.scheme is Scheme.HTTP and self.path.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_parts(path: str, what: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{what}: '.' and '..' are not allowed in a storage path")
    return parts


def parse_uri(raw: str, *, bare_hub_ids: bool = False) -> StorageUri:
    """Parse a storage URI or plain path; StorageError says what is wrong with it.

    With `bare_hub_ids` (a model field), `org/name` without a scheme is a hub repository, as
    diffusers reads it; elsewhere (a gate file, a curve file) it is a relative path.
    """
    text = raw.strip()
    if not text:
        raise StorageError("empty storage URI")
    if "://" not in text:
        if bare_hub_ids and text.count("/") == 1 and _HUB_ID.match(text) and text[0] not in "~.":
            return _parse_hf(raw, text)
        return StorageUri(raw=raw, scheme=Scheme.LOCAL, path=text)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "hf":
        return _parse_hf(raw, text[len("hf://") :])
    if scheme == "pvc":
        rest = text[len("pvc://") :]
        claim, _, path = rest.partition("/")
        if not _DNS_NAME.match(claim) or len(claim) > 253:
            raise StorageError(f"{raw}: pvc://CLAIM/PATH needs a PersistentVolumeClaim name")
        return StorageUri(
            raw=raw, scheme=Scheme.PVC, host=claim, path="/".join(_safe_parts(path, raw))
        )
    if scheme in ("http", "https"):
        split = urlsplit(text)
        if not split.netloc or not split.path.strip("/"):
            raise StorageError(f"{raw}: an http(s) URI needs a host and a file path")
        _safe_parts(unquote(split.path), raw)
        return StorageUri(raw=raw, scheme=Scheme.HTTP, host=split.netloc, path=split.path)
    if scheme == "s3":
        rest = text[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise StorageError(f"{raw}: s3://BUCKET/KEY needs a valid bucket name")
        if not key:
            raise StorageError(f"{raw}: s3://BUCKET/KEY needs a key (or a prefix ending in '/')")
        _safe_parts(key, raw)
        return StorageUri(raw=raw, scheme=Scheme.S3, host=bucket, path=key)
    raise StorageError(f"{raw}: unknown scheme {scheme!r}; use hf, pvc, http(s), s3 or a path")


def _parse_hf(raw: str, rest: str) -> StorageUri:
    """ORG/NAME[@REVISION][/PATH]: a revision ends at the next '/', except the hub's
    `refs/pr/N` and `refs/convert/NAME` (a path after those needs ORG/NAME@REF/PATH too)."""
    repo, at, revision = rest.partition("@")
    file = ""
    if at:
        ref = re.match(r"^refs/[^/]+/[^/]+", revision)
        end = ref.end() if ref else len(revision.split("/", 1)[0])
        revision, file = revision[:end], revision[end:].lstrip("/")
    else:
        parts = rest.split("/")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    if not _HUB_ID.match(repo) or ("/" not in repo and "." in repo):
        raise StorageError(f"{raw}: hf://ORG/NAME[@REVISION][/PATH] needs a hub repository id")
    if (revision and not _REVISION.match(revision)) or ".." in revision:
        raise StorageError(f"{raw}: bad revision {revision!r}")
    if file:
        file = "/".join(_safe_parts(file, raw))
    return StorageUri(raw=raw, scheme=Scheme.HF, path=repo, revision=revision or None, file=file)


def local_path(
    uri: StorageUri | str, *, cache_dir: str = CACHE_MOUNT, pvc_dir: str = PVC_MOUNT
) -> str:
    """Where the artefact is found in a pod (or under `cache_dir` on this machine)."""
    parsed = parse_uri(uri, bare_hub_ids=True) if isinstance(uri, str) else uri
    root = PurePosixPath(cache_dir)
    if parsed.scheme is Scheme.LOCAL:
        return parsed.path
    if parsed.scheme is Scheme.PVC:
        return str(
            PurePosixPath(pvc_dir, parsed.host, *parsed.path.split("/") if parsed.path else ())
        )
    if parsed.scheme is Scheme.HF:
        repo = root.joinpath("hf", *parsed.path.split("/"), _slug(parsed.revision or "main"))
        return str(repo.joinpath(*parsed.file.split("/")) if parsed.file else repo)
    if parsed.scheme is Scheme.S3:
        return str(root.joinpath("s3", parsed.host, *_safe_parts(parsed.path, parsed.raw)))
    parts = _safe_parts(unquote(parsed.path), parsed.raw)
    name = parts[-1]
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            parts[-1] = name[: -len(suffix)] or "archive"
            break
    host = _slug(parsed.host)
    return str(root.joinpath("http", host, *parts))


def _slug(text: str) -> str:
    """A path-safe name: unusual characters replaced, plus a short hash when any were."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if clean != text:
        clean += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return clean


# --- fetching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What `fetch` may authenticate with; read from the environment by `from_env`."""

    hf_token: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_session_token: str | None = None
    s3_endpoint: str | None = None  # None: AWS (https://<bucket>.s3.<region>.amazonaws.com)
    s3_region: str = DEFAULT_REGION

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if env is None else env

        def get(*keys: str) -> str | None:
            for key in keys:
                if env.get(key):
                    return env[key]
            return None

        return cls(
            hf_token=get("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
            s3_access_key=get("AWS_ACCESS_KEY_ID"),
            s3_secret_key=get("AWS_SECRET_ACCESS_KEY"),
            s3_session_token=get("AWS_SESSION_TOKEN"),
            s3_endpoint=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT"),
            s3_region=get("AWS_REGION", "AWS_DEFAULT_REGION") or DEFAULT_REGION,
        )


def fetch(
    uri: StorageUri | str,
    *,
    cache_dir: Path,
    credentials: Credentials | None = None,
    timeout_s: float = 600.0,
    pvc_dir: str = PVC_MOUNT,
    selection: PipelineSelection | None = None,
    report: list[str] | None = None,
) -> Path:
    """Put the artefact under `cache_dir` (once: a finished fetch is not repeated); its path.

    Writes go to a temporary sibling that is renamed into place, so a pod killed mid-download
    leaves no half folder that a later start would mistake for the model. `selection` says
    what the worker will load of a hub pipeline (`pipeline_files`): only that is downloaded.
    `report` collects one line per hub download: how many files, how many bytes.
    """
    parsed = parse_uri(uri, bare_hub_ids=True) if isinstance(uri, str) else uri
    credentials = credentials or Credentials.from_env()
    target = Path(local_path(parsed, cache_dir=str(cache_dir), pvc_dir=pvc_dir))
    if not parsed.needs_fetch:
        if not target.exists():
            raise StorageError(f"{parsed.raw}: {target} does not exist in this pod")
        return target
    if parsed.scheme is Scheme.HF:
        repo_target = Path(
            local_path(replace(parsed, file=""), cache_dir=str(cache_dir), pvc_dir=pvc_dir)
        )
        key = f"{parsed.raw} {(selection or PipelineSelection()).key()}"
        if target.exists() and key in _done_keys(repo_target):
            return target
        repo_target.parent.mkdir(parents=True, exist_ok=True)
        _fetch_hf(parsed, repo_target, credentials, selection=selection, report=report)
        if not target.exists():
            raise StorageError(f"{parsed.raw}: the download has no {parsed.file or 'files'}")
        done = _done_file(repo_target)
        done.write_text("".join(f"{k}\n" for k in sorted({*_done_keys(repo_target), key})))
        return target
    if _is_done(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        if parsed.scheme is Scheme.HTTP:
            _fetch_http(parsed, staging, credentials, timeout_s=timeout_s)
        else:
            _fetch_s3(parsed, staging, credentials, timeout_s=timeout_s)
        produced = staging / "out"
        if produced.is_dir():
            (produced / DONE_MARKER).write_text(parsed.raw + "\n")
        _replace(produced, target)
        if target.is_file():
            _done_file(target).write_text(parsed.raw + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _done_file(target: Path) -> Path:
    return target.with_name(f".{target.name}{DONE_MARKER}")


def _done_keys(target: Path) -> set[str]:
    try:
        return set(_done_file(target).read_text().splitlines())
    except OSError:
        return set()


def _is_done(target: Path) -> bool:
    if target.is_dir():
        return (target / DONE_MARKER).is_file() or (target / "model_index.json").is_file()
    return target.is_file() and _done_file(target).is_file()


def _replace(source: Path, target: Path) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


def _fetch_hf(
    parsed: StorageUri,
    target: Path,
    credentials: Credentials,
    *,
    selection: PipelineSelection | None = None,
    report: list[str] | None = None,
) -> None:
    """Download into the Hugging Face cache ($HF_HOME) and link the snapshot at `target`.

    Only the files the worker loads: `hub_selection` over the repo's file list (offline, when
    the hub cannot be asked, the cache decides and the ignore patterns apply).
    """
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as error:  # pragma: no cover - the worker image has it
        raise StorageError("hf:// needs the huggingface_hub package") from error
    listing = _hub_files(parsed, credentials)
    try:
        if listing is not None:
            allow = hub_selection(parsed, listing, credentials, selection=selection)
            if report is not None:
                report.append(_size_line(parsed, allow, listing))
            snapshot = Path(
                snapshot_download(
                    repo_id=parsed.path,
                    revision=parsed.revision,
                    token=credentials.hf_token,
                    allow_patterns=allow,
                )
            )
        elif parsed.file and PurePosixPath(parsed.file).suffix:
            downloaded = hf_hub_download(
                repo_id=parsed.path,
                filename=parsed.file,
                revision=parsed.revision,
                token=credentials.hf_token,
            )
            snapshot = Path(downloaded).parents[len(parsed.file.split("/")) - 1]
        else:
            snapshot = Path(
                snapshot_download(
                    repo_id=parsed.path,
                    revision=parsed.revision,
                    token=credentials.hf_token,
                    allow_patterns=[f"{parsed.file}/*"] if parsed.file else None,
                    ignore_patterns=list(_offline_ignore(selection)),
                )
            )
    except StorageError:
        raise
    except Exception as error:
        hint = "" if credentials.hf_token else " (a gated model needs HF_TOKEN from a Secret)"
        raise StorageError(f"{parsed.raw}: hub download failed: {error}{hint}") from error
    link = target.with_name(f".{target.name}.link")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(snapshot, target.parent), target_is_directory=True)
    _replace(link, target)


def hub_selection(
    parsed: StorageUri,
    listing: Mapping[str, int | None],
    credentials: Credentials | None = None,
    *,
    selection: PipelineSelection | None = None,
    model_index: Mapping[str, Any] | None = None,
) -> list[str]:
    """The files of a hub repository to download for `parsed` (a repo, a file or a folder).

    A pipeline (a repo with model_index.json, whose components are read from the hub unless
    `model_index` is given) gets `select_pipeline_files`; a folder inside a repo the weights of
    its variant; anything else the old rule (`hub_ignore_patterns`).
    """
    files = sorted(listing)
    variant = selection.weights_variant if selection is not None else None
    if parsed.file:
        if parsed.file in listing:
            return [parsed.file]
        chosen = select_folder_files(files, parsed.file, variant=variant)
        if not chosen:
            raise StorageError(f"{parsed.raw}: the repository has no {parsed.file}")
        return chosen
    if "model_index.json" in listing:
        index = model_index if model_index is not None else _hub_model_index(parsed, credentials)
        chosen_selection = selection or PipelineSelection()
        broken = unloadable_components(files, index, chosen_selection)
        if broken:
            problems = ", ".join(f"{c} (has: {', '.join(v)})" for c, v in broken.items())
            raise StorageError(
                f"{parsed.raw}: no weights the worker can load for {problems}; "
                "set weightsVariant to one the repository has"
            )
        return select_pipeline_files(files, index, chosen_selection)
    ignored = hub_ignore_patterns(files)
    return [f for f in files if not any(fnmatch.fnmatch(f, p) for p in ignored)]


def _hub_model_index(parsed: StorageUri, credentials: Credentials | None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        repo_id=parsed.path,
        filename="model_index.json",
        revision=parsed.revision,
        token=credentials.hf_token if credentials else None,
    )
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise StorageError(f"{parsed.raw}: model_index.json is not a JSON object")
    return data


def _size_line(parsed: StorageUri, files: list[str], listing: Mapping[str, int | None]) -> str:
    sizes = [listing.get(f) for f in files]
    known = sum(s for s in sizes if s is not None)
    unknown = sum(1 for s in sizes if s is None)
    total = sum(s for s in listing.values() if s is not None)
    text = f"{parsed.raw}: {len(files)} of {len(listing)} files, {known / 1e9:.2f} GB"
    return (
        text
        + (f" (+{unknown} of unknown size)" if unknown else "")
        + (f" of {total / 1e9:.2f} GB" if total else "")
    )


def _offline_ignore(selection: PipelineSelection | None) -> tuple[str, ...]:
    """Offline the file list is unknown: the ignore patterns, keeping the asked variant."""
    variant = selection.weights_variant if selection is not None else None
    if variant == "fp16":
        return tuple(p for p in HUB_IGNORE if p != "*.fp16.*")
    return HUB_IGNORE


#: Hub files a PyTorch pipeline never loads: other frameworks' weights, half-precision
#: variants (diffusers loads the default files), EMA-less training weights.
HUB_IGNORE = (
    "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.ot", "*.mlmodel",
    "*.tflite", "flax_model*", "tf_model*", "rust_model*", "*.fp16.*", "*non_ema*",
)  # fmt: skip


def hub_ignore_patterns(files: list[str] | None) -> tuple[str, ...]:
    """HUB_IGNORE, plus what a repo's file list shows is redundant: in a diffusers repo the
    single-file checkpoints at its root (often several GB each), and `.bin` weights where the
    same folder has safetensors."""
    if files is None:
        return HUB_IGNORE
    extra = []
    if "model_index.json" in files:
        extra += [f for f in files if "/" not in f and f.endswith((".safetensors", ".bin"))]
    with_safetensors = {
        f.rsplit("/", 1)[0] if "/" in f else "" for f in files if f.endswith(".safetensors")
    }
    extra += [
        f
        for f in files
        if f.endswith(".bin") and (f.rsplit("/", 1)[0] if "/" in f else "") in with_safetensors
    ]
    return HUB_IGNORE + tuple(sorted(set(extra)))


def _hub_files(parsed: StorageUri, credentials: Credentials) -> dict[str, int | None] | None:
    """{file: size in bytes} of the repo, or None when the hub cannot be asked (offline: the
    cache decides)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None
    try:
        from huggingface_hub import HfApi

        entries = HfApi().list_repo_tree(
            parsed.path, revision=parsed.revision, token=credentials.hf_token, recursive=True
        )
        return {
            str(e.path): getattr(e, "size", None) for e in entries if type(e).__name__ == "RepoFile"
        }
    except Exception:
        return None


def _fetch_http(
    parsed: StorageUri, staging: Path, credentials: Credentials, *, timeout_s: float
) -> None:
    import httpx

    download = staging / "download"
    headers = {}
    host = parsed.host.split(":")[0].lower()
    if credentials.hf_token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        headers["Authorization"] = f"Bearer {credentials.hf_token}"  # a gated repo's file
    try:
        with httpx.stream(
            "GET", parsed.raw, headers=headers, timeout=timeout_s, follow_redirects=True
        ) as resp:
            if resp.status_code != 200:
                raise StorageError(f"{parsed.raw}: HTTP {resp.status_code}")
            with download.open("wb") as out:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
    except httpx.HTTPError as error:
        raise StorageError(f"{parsed.raw}: download failed: {error}") from error
    if parsed.is_archive:
        _unpack(download, staging / "out", parsed.raw)
    else:
        download.rename(staging / "out")


def _unpack(archive: Path, dest: Path, what: str) -> None:
    """Unpack a tar or zip, refusing members that would land outside `dest`."""
    dest.mkdir()
    root = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if not (root / name).resolve().is_relative_to(root):
                        raise StorageError(f"{what}: archive member {name!r} leaves the folder")
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as error:
        raise StorageError(f"{what}: cannot unpack the archive: {error}") from error
    entries = [p for p in dest.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "model_index.json").exists():
        inner = entries[0]  # an archive of one folder: use the folder itself
        tmp = dest.with_name("inner")
        inner.rename(tmp)
        dest.rmdir()
        tmp.rename(dest)


# --- S3 (Signature V4 over httpx; no SDK needed) --------------------------------------------


def _s3_base(credentials: Credentials, bucket: str) -> tuple[str, str]:
    """(base URL of the bucket, Host header); path-style for a custom endpoint."""
    if credentials.s3_endpoint:
        endpoint = credentials.s3_endpoint.rstrip("/")
        return f"{endpoint}/{bucket}", urlsplit(endpoint).netloc
    host = f"{bucket}.s3.{credentials.s3_region}.amazonaws.com"
    return f"https://{host}", host


def _sign(
    *,
    method: str,
    url: str,
    query: Mapping[str, str],
    credentials: Credentials,
    now: dt.datetime,
) -> dict[str, str]:
    """AWS Signature Version 4 headers for an unsigned-payload request."""
    split = urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {
        "host": split.netloc,
        "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
        "x-amz-date": amz_date,
    }
    if credentials.s3_session_token:
        headers["x-amz-security-token"] = credentials.s3_session_token
    if not (credentials.s3_access_key and credentials.s3_secret_key):
        return {k: v for k, v in headers.items() if k != "host"}  # anonymous (public bucket)
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    names = sorted(headers)
    canonical = "\n".join(
        [
            method,
            quote(split.path or "/", safe="/-_.~"),
            canonical_query,
            "".join(f"{n}:{headers[n]}\n" for n in names),
            ";".join(names),
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = f"{day}/{credentials.s3_region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + credentials.s3_secret_key).encode()
    for part in (day, credentials.s3_region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.s3_access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return {k: v for k, v in headers.items() if k != "host"}


def _s3_get(
    client: Any, url: str, query: Mapping[str, str], credentials: Credentials, out: Path | None
) -> bytes:
    headers = _sign(
        method="GET", url=url, query=query, credentials=credentials, now=dt.datetime.now(dt.UTC)
    )
    with client.stream("GET", url, params=dict(query), headers=headers) as resp:
        if resp.status_code != 200:
            body = resp.read()[:300].decode(errors="replace")
            raise StorageError(f"{url}: S3 answered HTTP {resp.status_code}: {body}")
        if out is None:
            return bytes(resp.read())
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as fh:
            for chunk in resp.iter_bytes(1 << 20):
                fh.write(chunk)
    return b""


def _fetch_s3(
    parsed: StorageUri, staging: Path, credentials: Credentials, *, timeout_s: float
) -> None:
    import httpx

    base, _ = _s3_base(credentials, parsed.host)
    try:
        with httpx.Client(timeout=timeout_s) as client:
            if not parsed.path.endswith("/"):
                _s3_get(client, f"{base}/{quote(parsed.path)}", {}, credentials, staging / "out")
                return
            keys = _s3_list(client, base, parsed.path, credentials)
            if not keys:
                raise StorageError(f"{parsed.raw}: no objects under this prefix")
            for key in keys:
                rel = key[len(parsed.path) :]
                parts = _safe_parts(rel, parsed.raw)
                if not parts or key.endswith("/"):
                    continue
                _s3_get(
                    client, f"{base}/{quote(key)}", {}, credentials, staging.joinpath("out", *parts)
                )
    except httpx.HTTPError as error:
        raise StorageError(f"{parsed.raw}: S3 request failed: {error}") from error


def _s3_list(client: Any, base: str, prefix: str, credentials: Credentials) -> list[str]:
    """Every key under `prefix` (ListObjectsV2, following continuation tokens)."""
    keys: list[str] = []
    token: str | None = None
    for _ in range(10_000):
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        body = _s3_get(client, f"{base}/", query, credentials, None)
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError as error:
            raise StorageError(f"{base}: S3 listing is not XML: {error}") from error
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        keys += [el.text or "" for el in root.iter(f"{ns}Key")]
        truncated = (root.findtext(f"{ns}IsTruncated") or "false").lower() == "true"
        token = root.findtext(f"{ns}NextContinuationToken")
        if not truncated or not token:
            return keys
    raise StorageError(f"{base}: S3 listing did not end")
