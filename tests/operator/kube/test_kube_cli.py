"""`diffcascade operator`: flags, and the clear error for contradictory ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from diffcascade_operator.cli import main
from kmock_k8s import ThreadedKMock
from kube_env import Cluster, cascade_manifest, wait_for


def test_operator_help_lists_scope_peering_and_metrics_flags() -> None:
    result = CliRunner().invoke(main, ["operator", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--namespace",
        "--all-namespaces",
        "--standalone / --peering",
        "--prometheus-url",
        "--interval",
        "--scrape-fallback",
        "--priority",
    ):
        assert flag in result.output


def test_namespaces_and_all_namespaces_together_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["operator", "-A", "-n", "images"])
    assert result.exit_code == 2
    assert "exclude each other" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_operator_command_runs_the_handlers_until_interrupted(
    k8s: ThreadedKMock, tiny_models: dict[str, Path]
) -> None:
    """The real entry point (its own process) against the emulator, without Prometheus."""
    cluster = Cluster()
    env = {**os.environ, "DIFFCASCADE_TICK_SECONDS": "0.5", "PYTHONUNBUFFERED": "1"}
    exe = Path(sys.executable).with_name("diffcascade")
    proc = subprocess.Popen(
        [str(exe), "operator", "--all-namespaces", "--standalone", "--interval", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics: dict[str, Any] | None = None
    try:
        cluster.create_cascade("entry", cascade_manifest("tiny", models=tiny_models))
        wait_for(lambda: cluster.replicas("entry", "tiny-light"), timeout=60, what="Deployment")
        metrics = wait_for(
            lambda: cluster.condition("entry", "tiny", "MetricsAvailable"),
            timeout=60,
            what="a control step",
        )
    except TimeoutError:
        pass  # reported below, with the operator's output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0].decode()
    assert metrics is not None, output[-3000:]
    assert metrics["status"] == "False"  # no Prometheus URL and no pods to scrape
    assert proc.returncode == 0, output[-3000:]
