"""`diffcascade up` + `diffcascade load` end to end on CPU: real workers, router, control loop.

A load step makes the controller add a heavy replica and lower the threshold; Ctrl-C (SIGINT)
then stops everything, and no process `up` started survives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from click.testing import CliRunner
from diffcascade_operator.loadgen.cli import load
from diffcascade_operator.local.cli import status
from diffcascade_operator.local.runner import EXIT_INTERRUPTED
from local_support import cascade_doc

pytestmark = pytest.mark.slow

READY = re.compile(r"ready at (http://\S+)")
_MAIN = "from diffcascade_operator.cli import main; main()"


class UpProcess:
    """`diffcascade up` as a subprocess, its stdout collected on a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from diffcascade_operator.cli import main; main()",
                "up",
                *args,
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def remember_children(self) -> None:
        """Every descendant seen so far, to check after shutdown."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.seen.update(child.pid for child in children)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.remember_children()
            match = pattern.search(self.output)
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"`up` exited early ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {pattern.pattern!r}:\n{self.output}")

    def interrupt(self, timeout_s: float = 90.0) -> int:
        self.remember_children()
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(timeout=5)


def survivors(pids: set[int]) -> list[str]:
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def wait_until_gone(pids: set[int], timeout_s: float = 15.0) -> list[str]:
    """Survivors after `timeout_s`; they are killed then, so a failing test leaves none."""
    deadline = time.monotonic() + timeout_s
    while (left := survivors(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for line in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    return left


def read_state(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_up_scales_on_a_load_step_and_ctrl_c_leaves_nothing(
    cascade_file: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    up = UpProcess(
        [str(cascade_file), "--port", "0", "--no-live", "--run-dir", str(runs / "e2e")], tmp_path
    )
    try:
        url = up.wait_for(READY, timeout_s=150).group(1)
        state_path = runs / "e2e" / "state.json"
        first = read_state(state_path)
        assert first["running"] is True
        initial_threshold = first["history"][0]["threshold"]
        assert first["history"][0]["replicas"] == {"light": 1, "heavy": 1}

        # 1 qps for 3 s, then a step to 10 qps for 12 s.
        trace = tmp_path / "step.txt"
        rows = [f"{ms},{i}" for i, ms in enumerate(range(0, 3000, 1000))]
        rows += [f"{ms},{i}" for i, ms in enumerate(range(3000, 15000, 100), start=10)]
        trace.write_text("\n".join(rows) + "\n")
        report = tmp_path / "load" / "report.json"
        result = CliRunner().invoke(
            load,
            ["--url", url, "--trace", str(trace), "--slo-seconds", "3", "--report", str(report)],
        )
        up.remember_children()
        assert result.exit_code == 0, result.output
        doc = json.loads(report.read_text())
        assert doc["total"] == len(rows)
        assert doc["succeeded"] > 0

        # The controller reacted: a second heavy replica, a different threshold.
        deadline = time.monotonic() + 30
        while True:
            state = read_state(state_path)
            history = state["history"]
            heavy_workers = len(state["replicas"]["heavy"]["workers"])
            scaled = any(h["replicas"]["heavy"] == 2 for h in history) and heavy_workers == 2
            if scaled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        up.remember_children()
        assert scaled, json.dumps(history, indent=1)
        assert any(h["threshold"] != initial_threshold for h in history), history

        # `status` finds the run and prints its plan.
        shown = CliRunner().invoke(status, ["--runs-dir", str(runs)])
        assert shown.exit_code == 0, shown.output
        assert "e2e" in shown.output and "heavy" in shown.output and "threshold" in shown.output
        # ... and the live profiles it planned with (the gate's samples in the window).
        live = read_state(state_path)["profiles"]
        assert live["variants"][0]["samples"] > 0 and "profiles" in shown.output, live
    finally:
        code = up.interrupt()
    assert code == EXIT_INTERRUPTED, up.output  # as `demo` stopped by Ctrl-C
    assert "stopped" in up.output
    assert len(up.seen) >= 3  # two heavy workers and a light one at least
    assert wait_until_gone(up.seen) == []
    assert read_state(runs / "e2e" / "state.json")["running"] is False


def test_ctrl_c_while_workers_start_leaves_nothing(cascade_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    up = UpProcess(
        [
            str(cascade_file),
            "--port",
            "0",
            "--no-live",
            "--no-prometheus",
            "--run-dir",
            str(run_dir),
        ],
        tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up.remember_children()
            if len(up.seen) >= 2:
                break
            assert up.proc.poll() is None, up.output
            time.sleep(0.1)
        assert len(up.seen) >= 2, up.output
        assert READY.search(up.output) is None  # still starting
    finally:
        code = up.interrupt()
    assert code == EXIT_INTERRUPTED, up.output  # as `demo` stopped by Ctrl-C
    assert wait_until_gone(up.seen) == []


def test_workers_that_keep_crashing_end_up_with_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "gate.pt").write_bytes(b"")
    (broken / "defer_curve.json").write_text(
        json.dumps({"thresholds": [0.0, 1.0], "deferFractions": [0.0, 1.0]})
    )
    models = {"light": broken, "heavy": broken}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cascade_doc(models, name="broken")))
    run_dir = str(tmp_path / "r")
    up = UpProcess(
        [str(path), "--port", "0", "--no-live", "--no-prometheus", "--run-dir", run_dir], tmp_path
    )
    try:
        code = up.proc.wait(timeout=120)
    finally:
        up.interrupt()
    assert code == 1
    assert "exited 3 times before turning ready" in up.output
    assert "model_index.json" in up.output  # the worker's own reason, from its log
    assert wait_until_gone(up.seen) == []


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: str(s.name)
)
def test_a_signal_during_the_first_model_build_leaves_no_builder_and_no_staging(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """On the default example with no models, `up` builds the tiny models first; a signal
    then used to leave the builder running and its staging folder behind (TERM, HUP) or exit
    1 (INT). Now: exit 130, like a signal at any later moment, and nothing left. A staging
    folder a killed run left behind is removed when the next build starts."""
    models = tmp_path / ".models"
    stale = models / ".build-left-by-a-killed-run"
    stale.mkdir(parents=True)
    up = UpProcess(["--port", "0", "--no-live", "--no-prometheus"], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not set(models.glob(".build-*")) - {stale} and time.monotonic() < deadline:
            assert up.proc.poll() is None, up.output
            time.sleep(0.05)
        assert set(models.glob(".build-*")) - {stale}, up.output
        assert not stale.exists()
        time.sleep(0.5)  # the builder is running
        up.remember_children()
        builders = set(up.seen)
        assert builders, up.output
        up.proc.send_signal(sig)
        code = up.proc.wait(timeout=30)
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert code == EXIT_INTERRUPTED, up.output
    assert wait_until_gone(builders) == []
    assert list(models.glob(".build-*")) == []


def test_a_builder_dies_with_its_run_when_the_run_is_killed(tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the builder dies with `up` all the same (the kernel's
    parent-death signal); the staging folder it leaves is for the next build to remove."""
    up = UpProcess(["--port", "0", "--no-live", "--no-prometheus"], tmp_path)
    models = tmp_path / ".models"
    try:
        deadline = time.monotonic() + 60
        while not list(models.glob(".build-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        up.remember_children()
        builders = set(up.seen)
        assert builders, up.output
        up.proc.kill()
        up.proc.wait(timeout=10)
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert wait_until_gone(builders) == []
