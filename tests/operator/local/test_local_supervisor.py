"""Child processes never outlive their supervisor: stubborn ones are killed, orphans die too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from diffcascade_operator.local.supervisor import spawn, stop_processes

STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('up', flush=True)\n"
    "time.sleep(120)\n"
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_a_child_ignoring_sigterm_and_its_own_child_are_killed(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    process = spawn([sys.executable, "-c", STUBBORN], log_path=log)
    deadline = time.monotonic() + 20
    while "up" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    family = [process.pid, *(c.pid for c in psutil.Process(process.pid).children(recursive=True))]
    assert len(family) == 2
    started = time.monotonic()
    stop_processes([process], grace_s=0.5)
    assert time.monotonic() - started < 10
    assert _wait_gone(family)


def test_a_child_dies_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    """`up` killed with SIGKILL cannot clean up; the kernel SIGTERMs its workers instead."""
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from diffcascade_operator.local.supervisor import spawn\n"
        "p = spawn([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " log_path=Path(sys.argv[1]))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(tmp_path / "c.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not _gone(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert _wait_gone([child])
