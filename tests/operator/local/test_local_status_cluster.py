"""`diffcascade status NAME -n NS` reads the DiffusionCascade's status through the Kubernetes
client (a minimal API server on loopback stands in for the cluster)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from diffcascade_operator.local.cli import status

CASCADE = {
    "apiVersion": "diffcascade.dev/v1alpha1",
    "kind": "DiffusionCascade",
    "metadata": {"name": "tiny", "namespace": "images"},
    "spec": {},
    "status": {
        "demand": {"qps": 6.5, "measuredQps": 6.1, "source": "Prometheus"},
        "allocation": {
            "threshold": 0.065,
            "deferFraction": 0.44,
            "predictedFID": 17.14,
            "reason": "demand 6.5 qps",
            "solver": {"status": "Optimal", "solveMillis": 4},
            "variants": [
                {"name": "light", "replicas": 1, "readyReplicas": 1, "batchSize": 1},
                {"name": "heavy", "replicas": 3, "readyReplicas": 2, "batchSize": 2},
            ],
        },
        "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}],
    },
}
PATH = "/apis/diffcascade.dev/v1alpha1/namespaces/images/diffusioncascades/tiny"


class _Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        found = self.path.split("?")[0] == PATH
        body = json.dumps(
            CASCADE if found else {"kind": "Status", "code": 404, "reason": "NotFound"}
        ).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    try:
        yield path
    finally:
        server.shutdown()


def test_status_prints_a_cluster_cascades_plan(kubeconfig: Path) -> None:
    result = CliRunner().invoke(status, ["tiny", "--namespace", "images"])
    assert result.exit_code == 0, result.output
    for text in ("images/tiny", "0.065", "2/3", "17.14", "Ready"):
        assert text in result.output
    raw = CliRunner().invoke(status, ["tiny", "-n", "images", "--json"])
    assert json.loads(raw.output)["allocation"]["threshold"] == 0.065


def test_status_of_a_missing_cluster_cascade_says_so(kubeconfig: Path) -> None:
    result = CliRunner().invoke(status, ["nope", "--namespace", "images"])
    assert result.exit_code == 1
    assert "no DiffusionCascade 'nope' in namespace 'images'" in result.output
