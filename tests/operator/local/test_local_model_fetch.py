"""`up` fetches a cascade's storage URIs with the worker's own `fetch`, as a pod's init
container does, and runs the fetched copies; a failed `up` leaves no run folder behind.

The store is a real HTTP server on loopback serving the session's tiny models as a .tar.gz.
"""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from diffcascade_operator.local.cli import up
from diffcascade_operator.local.model_fetch import FetchFailed, fetch_cascade_models
from diffcascade_operator.local.runner import prepare
from local_support import cascade_doc


@pytest.fixture
def store(tiny_models: dict[str, Path], tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(base URL, requested paths) of a file server holding tiny-light.tar.gz and gate.pt."""
    root = tmp_path / "store"
    root.mkdir()
    with tarfile.open(root / "tiny-light.tar.gz", "w:gz") as tar:
        tar.add(tiny_models["light"], arcname=".")
    (root / "gate.pt").write_bytes((tiny_models["light"] / "gate.pt").read_bytes())
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()


def _remote_doc(models: dict[str, Path], base: str) -> dict[str, Any]:
    doc = cascade_doc(models)
    light = doc["spec"]["variants"][0]
    light["model"] = f"{base}/tiny-light.tar.gz"
    light["gate"]["discriminator"]["uri"] = f"{base}/gate.pt"
    return doc


def test_storage_uris_are_fetched_once_and_the_cascade_runs_the_copies(
    tiny_models: dict[str, Path], store: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, requested = store
    cache = tmp_path / "cache"
    doc, fetched = fetch_cascade_models(_remote_doc(tiny_models, base), cache_dir=cache)
    assert [(f.variant, f.field) for f in fetched] == [("light", "model"), ("light", "gate")]
    light = doc["spec"]["variants"][0]
    assert Path(light["model"], "model_index.json").is_file()  # the archive, unpacked
    assert Path(light["model"]).is_relative_to(cache.resolve())
    assert Path(light["gate"]["discriminator"]["uri"]).is_file()
    again, _ = fetch_cascade_models(_remote_doc(tiny_models, base), cache_dir=cache)
    assert again == doc and sorted(requested) == ["/gate.pt", "/tiny-light.tar.gz"]
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(doc))
    name, spec, _ = prepare(resolved, base_dir=tmp_path)  # what `up` runs next
    assert name == "e2e" and spec.variants[0].model == light["model"]


def test_a_pvc_or_an_unreachable_model_is_a_clear_error(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    doc = cascade_doc(tiny_models)
    doc["spec"]["variants"][1]["model"] = "pvc://models/sd-v1-5"
    with pytest.raises(FetchFailed, match="variant heavy: model pvc://models/sd-v1-5 is on a"):
        fetch_cascade_models(doc, cache_dir=tmp_path)


def test_a_failed_up_names_the_model_and_leaves_no_run_folder(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = cascade_doc(tiny_models)
    doc["spec"]["variants"][1]["model"] = "http://127.0.0.1:9/nowhere/heavy.tar.gz"
    cascade = tmp_path / "cascade.yaml"
    cascade.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(up, [str(cascade), "--port", "0"])
    assert result.exit_code == 1
    assert "variant heavy: cannot fetch model http://127.0.0.1:9/nowhere/heavy.tar.gz" in (
        result.output
    )
    assert not (tmp_path / "runs").exists()
