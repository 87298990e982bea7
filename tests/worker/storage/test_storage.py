"""Storage URIs and `diffcascade-worker fetch`: real loopback servers, a real hub cache."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline
from diffcascade_worker.storage.uris import (
    Credentials,
    Scheme,
    StorageError,
    fetch,
    local_path,
    parse_uri,
)


@pytest.mark.parametrize(
    ("uri", "scheme", "path"),
    [
        ("hf://stabilityai/sd-turbo", Scheme.HF, "/models/hf/stabilityai/sd-turbo/main"),
        ("stabilityai/sd-turbo", Scheme.HF, "/models/hf/stabilityai/sd-turbo/main"),
        ("hf://openai/clip-vit-base-patch32@v1.0", Scheme.HF,
         "/models/hf/openai/clip-vit-base-patch32/v1.0"),
        ("pvc://weights/gates/sd-turbo.pt", Scheme.PVC, "/mnt/pvc/weights/gates/sd-turbo.pt"),
        ("https://example.com/m/sd.tar.gz", Scheme.HTTP, "/models/http/example.com/m/sd"),
        ("http://10.0.0.1:8080/gate.pt", Scheme.HTTP, "/models/http/10.0.0.1_8080-"),
        ("s3://my-bucket/models/sd/", Scheme.S3, "/models/s3/my-bucket/models/sd"),
        ("/models/gate.pt", Scheme.LOCAL, "/models/gate.pt"),
        (".models/tiny-light", Scheme.LOCAL, ".models/tiny-light"),
    ],
)  # fmt: skip
def test_each_scheme_maps_to_a_fixed_path_in_the_pod(uri: str, scheme: Scheme, path: str) -> None:
    parsed = parse_uri(uri, bare_hub_ids=True)  # as a model field reads it
    assert parsed.scheme is scheme
    if scheme is Scheme.HTTP and ":" in parsed.host:  # slugged, with a hash of the host
        assert local_path(parsed).startswith(path) and local_path(parsed).endswith("/gate.pt")
    else:
        assert local_path(parsed) == path


def test_outside_model_fields_a_bare_org_name_is_a_relative_path() -> None:
    for text in ("gates/gate.pt", "defer_curve.json", "gate.pt"):
        assert parse_uri(text).scheme is Scheme.LOCAL
    assert parse_uri("gates/gate.pt", bare_hub_ids=True).scheme is Scheme.HF


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "ftp://host/file",
        "pvc://Not_A_Claim/x",
        "s3://b/key",  # bucket names have 3+ characters
        "s3://bucket",
        "https://host/",
        "https://host/a/../../etc/passwd",
        "hf://org/name@bad..rev",
    ],
)
def test_bad_uris_are_refused_with_a_reason(uri: str) -> None:
    with pytest.raises(StorageError):
        parse_uri(uri)


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []
    auth: list[str] = []

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        type(self).hits.append(self.path)
        type(self).auth.append(self.headers.get("Authorization", ""))
        query = parse_qs(split.query)
        if query.get("list-type") == ["2"]:
            bucket = split.path.strip("/")
            prefix = query.get("prefix", [""])[0]
            keys = [k[len(bucket) + 1 :] for k in self.files if k.startswith(f"{bucket}/")]
            body = "".join(
                f"<Contents><Key>{k}</Key></Contents>" for k in keys if k.startswith(prefix)
            )
            xml = (
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"{body}<IsTruncated>false</IsTruncated></ListBucketResult>"
            )
            self._send(200, xml.encode())
            return
        data = self.files.get(split.path.lstrip("/"))
        self._send(404, b"no such file") if data is None else self._send(200, data)

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Files]]]:
    handler = type("Handler", (_Files,), {"files": {}, "hits": [], "auth": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _tar_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return buffer.getvalue()


def test_http_archive_of_a_model_unpacks_into_the_cache_once_and_loads_offline(
    server: tuple[str, type[_Files]], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    url, handler = server
    handler.files["models/tiny-heavy.tar.gz"] = _tar_of(tiny_models["heavy"])
    uri = f"{url}/models/tiny-heavy.tar.gz"
    folder = fetch(uri, cache_dir=tmp_path, credentials=Credentials())
    assert folder == Path(local_path(uri, cache_dir=str(tmp_path)))
    assert (folder / "model_index.json").is_file()
    assert fetch(uri, cache_dir=tmp_path, credentials=Credentials()) == folder
    assert len(handler.hits) == 1  # the second fetch found the finished copy
    pipe = TextToImagePipeline.load(
        PipelineConfig(model=str(folder), steps=1, size=64, device="cpu", local_files_only=True)
    )
    assert pipe.generate(["a cat"], [0]).shape == (1, 3, 64, 64)


def test_http_single_file_and_a_missing_file(
    server: tuple[str, type[_Files]], tmp_path: Path
) -> None:
    url, handler = server
    handler.files["gates/gate.pt"] = b"weights"
    path = fetch(f"{url}/gates/gate.pt", cache_dir=tmp_path, credentials=Credentials())
    assert path.read_bytes() == b"weights"
    with pytest.raises(StorageError, match="HTTP 404"):
        fetch(f"{url}/gates/nope.pt", cache_dir=tmp_path, credentials=Credentials())
    assert not list(tmp_path.rglob(".fetch-*"))  # no half-written leftovers


def test_s3_prefix_is_listed_and_fetched_with_signed_requests(
    server: tuple[str, type[_Files]], tmp_path: Path
) -> None:
    url, handler = server
    handler.files["weights/clip/config.json"] = b'{"model_type": "clip"}'
    handler.files["weights/clip/sub/model.safetensors"] = b"tensor bytes"
    handler.files["weights/other/x"] = b"not mine"
    credentials = Credentials(s3_access_key="AKIDTEST", s3_secret_key="secret", s3_endpoint=url)
    folder = fetch("s3://weights/clip/", cache_dir=tmp_path, credentials=credentials)
    assert (folder / "config.json").read_bytes() == b'{"model_type": "clip"}'
    assert (folder / "sub" / "model.safetensors").read_bytes() == b"tensor bytes"
    assert not (folder / "x").exists()
    assert handler.auth and all(
        a.startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/") for a in handler.auth
    )


def test_pvc_uri_reads_the_claim_in_place(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A local directory stands in for the mounted claim: nothing is copied."""
    claim_root = tmp_path / "pvc"
    shutil.copytree(tiny_models["light"], claim_root / "weights" / "sd" / "tiny-light")
    path = fetch(
        "pvc://weights/sd/tiny-light",
        cache_dir=tmp_path / "cache",
        credentials=Credentials(),
        pvc_dir=str(claim_root),
    )
    assert path == claim_root / "weights" / "sd" / "tiny-light"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(StorageError, match="does not exist"):
        fetch("pvc://weights/none", cache_dir=tmp_path, pvc_dir=str(claim_root))


def _worker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffcascade_worker.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_hub_uri_offline_from_an_hf_home_cache(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The hub layout (refs/main -> snapshots/<commit>) built by hand, HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--acme--tiny-light"
    shutil.copytree(tiny_models["light"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    cache = tmp_path / "cache"
    done = _worker("fetch", "--cache-dir", str(cache), "hf://acme/tiny-light", env=env)
    assert done.returncode == 0, done.stderr
    folder = Path(local_path("hf://acme/tiny-light", cache_dir=str(cache)))
    assert str(folder) in done.stdout
    assert folder.is_symlink() and (folder / "model_index.json").is_file()
    pipe = TextToImagePipeline.load(
        PipelineConfig(model=str(folder), steps=1, size=64, device="cpu", local_files_only=True)
    )
    assert pipe.generate(["a cat"], [0]).shape == (1, 3, 64, 64)
    missing = _worker("fetch", "--cache-dir", str(cache), "hf://acme/absent", env=env)
    assert missing.returncode == 1 and "hub download failed" in missing.stderr


def test_fetch_command_rejects_a_bad_uri_as_a_usage_error(tmp_path: Path) -> None:
    done = _worker("fetch", "--cache-dir", str(tmp_path), "ftp://x/y", env=dict(os.environ))
    assert done.returncode == 2 and "unknown scheme" in done.stderr


def test_hub_downloads_skip_what_a_pytorch_pipeline_never_loads() -> None:
    from diffcascade_worker.storage.uris import HUB_IGNORE, hub_ignore_patterns

    files = [
        "model_index.json",
        "sd_turbo.safetensors",  # a diffusers repo's single-file checkpoint: several GB
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/model.safetensors",
    ]
    ignored = hub_ignore_patterns(files)
    assert "sd_turbo.safetensors" in ignored and "unet/diffusion_pytorch_model.bin" in ignored
    assert "unet/diffusion_pytorch_model.safetensors" not in ignored
    clip = ["config.json", "pytorch_model.bin", "tokenizer.json"]  # no safetensors: keep .bin
    assert hub_ignore_patterns(clip) == HUB_IGNORE
    assert hub_ignore_patterns(None) == HUB_IGNORE  # offline: the cache decides
