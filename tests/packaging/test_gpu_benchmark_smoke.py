"""bench/gpu_real_architectures.py runs once on a GPU machine that has no diffcascade and a hard
time budget, so its code path is run here first: `--smoke` (tiny configs, CPU), in a process
that must import neither diffcascade package."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_real_architectures.py"
REFERENCE = REPO / "operator" / "diffcascade_operator" / "reference" / "latency_a100_ms.csv"

_RUN = """
import runpy, sys
sys.argv = [sys.argv[0], *sys.argv[1:]]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as done:
    assert not done.code, done.code
print("MODULES", sorted({{m.split(".")[0] for m in sys.modules if m.startswith("diffcascade")}}))
"""


@pytest.mark.slow
def test_the_smoke_run_writes_the_reference_format_and_imports_no_diffcascade(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    models = "sd-turbo,sdxl-lightning,sdxl"
    args = ["--smoke", "--extrapolate", "--out", str(out), "--models", models]
    done = subprocess.run(
        [sys.executable, "-c", _RUN.format(script=str(SCRIPT)), *args, "--batch-sizes", "1,2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MODULES []" in done.stdout
    with (out / "latency_ms.csv").open() as handle, REFERENCE.open() as reference:
        rows = list(csv.DictReader(handle))
        assert csv.DictReader(reference).fieldnames == ["model", "batch_size", "latency_ms"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        (m, b) for m in ("sd-turbo", "sdxl-lightning", "sdxl") for b in ("1", "2")
    ]
    run = json.loads((out / "run.json").read_text())
    status = {(r["model"], r["batch_size"]): r["status"] for r in run["rows"]}
    assert status[("sdxl", 1)].startswith("extrapolated")  # --extrapolate: timed at 2 and 6
    assert status[("sd-turbo", 1)] == "measured"
    assert all(r["reference_a100_ms"] for r in run["rows"])
    assert "SMOKE" in (out / "results.md").read_text()
