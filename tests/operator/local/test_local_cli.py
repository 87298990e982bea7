"""`up`, `status` and `demo` refuse bad input with a message, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from diffcascade_operator.local.cli import demo, status, up
from diffcascade_operator.local.state import write_state
from local_support import cascade_doc


def _run(command: object, *args: str) -> Result:
    result = CliRunner().invoke(command, list(args))  # type: ignore[arg-type]
    assert "Traceback" not in result.output
    return result


def test_up_with_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = _run(up, str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_up_with_an_invalid_cascade_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    doc = cascade_doc({"light": tmp_path, "heavy": tmp_path})
    doc["spec"]["gpuBudget"] = 0
    bad.write_text(yaml.safe_dump(doc))
    result = _run(up, str(bad))
    assert result.exit_code == 1
    assert "invalid DiffusionCascade" in result.output and "gpuBudget" in result.output


def test_up_with_something_that_is_not_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    result = _run(up, str(bad))
    assert result.exit_code == 1
    assert "not valid YAML" in result.output


def test_up_without_models_says_how_to_build_them(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(cascade_doc({"light": tmp_path / "no-l", "heavy": tmp_path / "no-h"}))
    )
    result = _run(up, str(path))
    assert result.exit_code == 1
    assert "make-tiny-model" in result.output and "no-l" in result.output


def test_status_without_a_local_run_or_name_is_a_usage_error(tmp_path: Path) -> None:
    result = _run(status, "--runs-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "no local run" in result.output


def test_status_of_a_cluster_cascade_without_a_cluster_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = _run(status, "tiny", "--namespace", "images")
    assert result.exit_code == 1
    assert "Kubernetes configuration" in result.output


def test_status_prints_the_plan_of_a_stopped_local_run(tmp_path: Path) -> None:
    state = {
        "cascade": "tiny",
        "running": True,  # but its pid is gone: status says so
        "pid": 2**22 + 12345,
        "entry_url": "http://127.0.0.1:1",
        "plan": {
            "threshold": 0.075,
            "defer_fraction": 0.45,
            "demand_qps": 8.1,
            "predicted_fid": 17.1,
            "reason": "demand 8.1 qps",
            "solver": {"status": "Optimal", "solve_ms": 3},
            "variants": [
                {"name": "light", "replicas": 1, "batch_size": 1, "threshold": 0.075},
                {"name": "heavy", "replicas": 2, "batch_size": 2, "threshold": None},
            ],
        },
        "replicas": {
            "light": {"desired": 1, "ready": 1, "starting": 0, "draining": 0},
            "heavy": {"desired": 2, "ready": 1, "starting": 1, "draining": 0},
        },
        "metrics": {"source": "Prometheus", "demand_qps": 7.9},
    }
    write_state(tmp_path / "tiny" / "state.json", state)
    result = _run(status, "tiny", "--runs-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "0.075" in result.output and "1/2" in result.output and "gone" in result.output
    raw = _run(status, "--state", str(tmp_path / "tiny" / "state.json"), "--json")
    assert json.loads(raw.output)["running"] is False


def test_demo_with_a_missing_cascade_file_is_a_usage_error(tmp_path: Path) -> None:
    result = _run(demo, "--cascade-file", str(tmp_path / "none.yaml"))
    assert result.exit_code == 2
