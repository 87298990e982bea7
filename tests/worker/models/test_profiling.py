"""`diffcascade-worker profile` on the tiny pipelines: a monotone table and a usable f(t)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from diffcascade_operator.spec import DeferCurveSpec, ProfileSpec
from diffcascade_worker.cli import main
from diffcascade_worker.models.profiling import monotone
from diffcascade_worker.models.tiny import make_tiny_clip


def _profile(tmp_path: Path, *args: str) -> tuple[dict[str, object], str]:
    out = tmp_path / "profile.json"
    term = tmp_path / "termination-log"
    result = CliRunner().invoke(
        main,
        ["profile", *args, "--out", str(out), "--termination-message", str(term)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), term.read_text()


def test_tiny_light_with_its_gate_gives_a_monotone_table_and_a_curve(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    light = tiny_models["light"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(24)) + "\n")
    doc, compact = _profile(
        tmp_path,
        "--model", str(light), "--gate", str(light / "gate.pt"), "--prompts", str(prompts),
        "--batch-sizes", "1,2,4,8", "--repeats", "2", "--device", "cpu", "--variant", "light",
    )  # fmt: skip
    table = {int(k): v for k, v in doc["batchLatencyMs"].items()}  # type: ignore[attr-defined]
    assert sorted(table) == [1, 2, 4, 8]
    assert all(ms > 0 for ms in table.values())
    assert [table[b] for b in sorted(table)] == sorted(table.values())  # non-decreasing
    assert doc["steps"] == 1 and doc["size"] == 64 and doc["prompts"] == 24
    ProfileSpec.model_validate({"batchLatencyMs": doc["batchLatencyMs"]})
    curve = DeferCurveSpec.model_validate(doc["deferCurve"])
    assert curve.defer_fractions is not None
    assert curve.defer_fractions[0] == 0.0 and curve.defer_fractions[-1] == 1.0
    assert len(doc["confidences"]) == 24  # type: ignore[arg-type]
    small = json.loads(compact)
    assert len(compact.encode()) < 4096
    assert small["batchLatencyMs"] == doc["batchLatencyMs"] and small["variant"] == "light"
    DeferCurveSpec.model_validate(small["deferCurve"])


def test_heavy_without_a_gate_and_with_the_clip_score_gate(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    doc, _ = _profile(
        tmp_path,
        "--model", str(tiny_models["heavy"]), "--batch-sizes", "1,2", "--repeats", "1",
        "--device", "cpu", "--limit", "4",
    )  # fmt: skip
    assert "deferCurve" not in doc and doc["steps"] == 8
    clip = make_tiny_clip(tmp_path / "clip")
    doc, _ = _profile(
        tmp_path,
        "--model", str(tiny_models["light"]), "--gate", str(clip), "--batch-sizes", "1,4",
        "--repeats", "1", "--device", "cpu", "--limit", "16",
    )  # fmt: skip
    fractions = doc["deferCurve"]["deferFractions"]  # type: ignore[index]
    assert any(0.0 < f < 1.0 for f in fractions)  # graded, not a step at 0 or 1


def test_monotone_takes_a_running_maximum() -> None:
    assert monotone({4: 30.0, 1: 10.0, 2: 9.0}) == {1: 10.0, 2: 10.0, 4: 30.0}


@pytest.mark.parametrize("sizes", ["0,1", "a,b", "1,999"])
def test_bad_batch_sizes_are_a_usage_error(tiny_models: dict[str, Path], sizes: str) -> None:
    result = CliRunner().invoke(
        main, ["profile", "--model", str(tiny_models["heavy"]), "--batch-sizes", sizes]
    )
    assert result.exit_code == 2 and "batch sizes" in result.output
