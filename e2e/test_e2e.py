"""End to end on a real (kind) cluster: `pytest e2e/` runs e2e/run.sh and checks its result.

Outside the default test paths (pyproject: testpaths = ["tests"]), so `pytest` alone never
collects it. Skipped, saying what is missing, when Docker's engine, kind, helm or kubectl is
not available. Takes 10-20 minutes, most of it building the images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "e2e" / "run.sh"
TOOLS = ("docker", "kind", "helm", "kubectl", "curl")
COLUMNS = ["NAME", "DEMAND", "THRESHOLD", "REPLICAS", "FID", "READY", "SOURCE", "SOLVER"]


def missing_prerequisites() -> str | None:
    """Why the e2e run cannot start here, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"e2e needs {', '.join(missing)} on PATH (install them or run on a CI runner)"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return "e2e needs a running Docker engine: `docker info` failed"
    return None


SKIP_REASON = missing_prerequisites()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
]


def _table(output: str) -> list[dict[str, str]]:
    """Rows of the printed `kubectl get dcas -o wide`, cut at the header's column starts
    (the Replicas cell holds spaces)."""
    start = output.index("--- kubectl get dcas ---")
    end = output.index("--- end ---", start)
    header, *lines = [line for line in output[start:end].splitlines()[1:] if line.strip()]
    names = header.split()
    starts = [header.index(f" {name}") + 1 if i else 0 for i, name in enumerate(names)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [
        {n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for line in lines
    ]


def test_tiny_cascade_on_kind_reports_its_decision() -> None:
    result = subprocess.run(
        ["bash", str(RUN)],
        cwd=ROOT,
        env={**os.environ, "E2E_KEEP": os.environ.get("E2E_KEEP", "0")},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = _table(result.stdout)
    assert list(rows[0])[: len(COLUMNS)] == COLUMNS
    [row] = [r for r in rows if r["NAME"] == "tiny"]
    assert float(row["DEMAND"]) > 0
    assert 0.0 <= float(row["THRESHOLD"]) <= 1.0
    assert "light=" in row["REPLICAS"] and "heavy=" in row["REPLICAS"]
    assert row["READY"] == "True"
