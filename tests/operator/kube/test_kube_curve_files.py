"""Remote deferral-curve files: the operator fetches them (kmock for the Secret, a real server)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.kube.curve_files import resolve_curve_uris
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.spec import InvalidSpec, parse_spec
from kmock_k8s import ThreadedKMock

CURVE = {"thresholds": [0.0, 0.5, 1.0], "deferFractions": [0.0, 0.4, 1.0]}


@pytest.fixture
def curve_server() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps(CURVE).encode() if self.path == "/c/curve.json" else b"no"
            self.send_response(200 if self.path == "/c/curve.json" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _raw(path: str) -> dict[str, Any]:
    return {
        "sloSeconds": 5,
        "gpuBudget": 2,
        "storage": {"secretName": "curve-keys"},
        "variants": [
            {
                "name": "light",
                "model": "hf://acme/light",
                "profile": {"batchLatencyMs": {"1": 100}},
                "gate": {"discriminator": {"uri": "gate.pt"}, "deferCurve": {"path": path}},
            },
            {
                "name": "heavy",
                "model": "hf://acme/heavy",
                "profile": {"batchLatencyMs": {"1": 900}},
            },
        ],
    }


def test_an_http_curve_is_fetched_once_and_planned_with(
    k8s: ThreadedKMock, curve_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, seen = curve_server
    kubernetes.client.CoreV1Api().create_namespaced_secret(
        "curves",
        {"metadata": {"name": "curve-keys"}, "stringData": {"HF_TOKEN": "hf_x"}},
    )
    raw = _raw(f"{url}/c/curve.json")
    resolved = resolve_curve_uris(raw, api=KubeApi(), namespace="curves", cache_dir=tmp_path)
    local = resolved["variants"][0]["gate"]["deferCurve"]["path"]
    assert Path(local).is_relative_to(tmp_path) and json.loads(Path(local).read_text()) == CURVE
    assert raw["variants"][0]["gate"]["deferCurve"]["path"].startswith("http")  # not mutated
    curve = profiles_from_spec(parse_spec(resolved)).variants[0].defer_curve
    assert curve is not None and curve.at(0.5) == pytest.approx(0.4)
    resolve_curve_uris(raw, api=KubeApi(), namespace="curves", cache_dir=tmp_path)
    assert len(seen) == 1 and seen == [""]  # fetched once; the hub token only goes to the hub


@pytest.mark.parametrize(
    ("path", "says"),
    [("pvc://claim/curve.json", "cannot read a PVC"), ("/c/missing.json", "HTTP 404")],
)
def test_unreachable_curves_are_invalid_specs(
    k8s: ThreadedKMock,
    curve_server: tuple[str, list[str]],
    tmp_path: Path,
    path: str,
    says: str,
) -> None:
    url, _ = curve_server
    raw = _raw(path if path.startswith("pvc") else url + path)
    raw.pop("storage")
    with pytest.raises(InvalidSpec, match=says):
        resolve_curve_uris(raw, api=KubeApi(), namespace="curves", cache_dir=tmp_path)
