"""Calibration: per-prompt confidences and the deferral curve f(t) on the shared grid."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from diffcascade_worker.deferral import THRESHOLD_GRID_POINTS
from diffcascade_worker.gate.calibration import (
    Calibration,
    CurveFormatError,
    calibrate,
    calibration_from_confidences,
    read_curve,
    threshold_grid,
    write_curve,
)
from diffcascade_worker.gate.scorer import Gate, should_defer
from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline
from diffcascade_worker.models.tiny import read_model_defaults, tiny_prompts

torch.set_num_threads(1)


def test_grid_has_201_points_from_0_to_1_in_steps_of_0_005() -> None:
    grid = threshold_grid()
    assert len(grid) == THRESHOLD_GRID_POINTS == 201
    assert grid[0] == 0.0 and grid[1] == 0.005 and grid[100] == 0.5 and grid[-1] == 1.0


def test_curve_counts_the_share_below_each_threshold() -> None:
    curve = calibration_from_confidences([0.0, 0.1, 0.1, 0.5, 1.0], model="m")
    assert curve.defer_fraction(0.0) == 0.0  # threshold 0 defers nothing
    assert curve.defer_fraction(0.1) == pytest.approx(0.2)  # only 0.0 is strictly below
    assert curve.defer_fraction(0.105) == pytest.approx(0.6)
    assert curve.defer_fraction(0.995) == pytest.approx(0.8)  # confidence 1.0 stays
    assert curve.defer_fraction(1.0) == 1.0  # threshold 1 defers everything
    for t, f in zip(curve.thresholds, curve.defer_fractions, strict=True):
        assert f == sum(should_defer(c, t) for c in curve.confidences) / 5


def test_empty_confidences_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibration_from_confidences([], model="m")


class _FakePipeline:
    """Images whose mean pixel value is the confidence a _MeanGate reads back."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], *, size: int | None = None
    ) -> torch.Tensor:
        self.calls.append((list(prompts), list(seeds)))
        values = torch.tensor([(s % 100) / 100 for s in seeds])
        return values.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


class _MeanGate:
    def score(self, images: torch.Tensor) -> list[float]:
        return [float(v) for v in images.mean(dim=(1, 2, 3))]


def test_calibrate_batches_prompts_and_averages_images_per_prompt() -> None:
    pipeline = _FakePipeline()
    curve = calibrate(
        pipeline, _MeanGate(), ["a", "b", "c"], seeds=[10, 20, 30], batch_size=2,
        images_per_prompt=2, model="fake",
    )  # fmt: skip
    assert [len(p) for p, _ in pipeline.calls] == [2, 2, 2]
    assert curve.prompts == 3 and curve.model == "fake"
    # second image's seed is offset by 1_000_003 -> (seed + 3) % 100 / 100
    assert curve.confidences == pytest.approx([0.115, 0.215, 0.315])


def test_calibrate_rejects_mismatched_seeds() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        calibrate(_FakePipeline(), _MeanGate(), ["a", "b"], seeds=[1])


@pytest.fixture(scope="module")
def tiny_curve(tiny_models: dict[str, Path]) -> Calibration:
    folder = tiny_models["light"]
    defaults = read_model_defaults(folder)
    pipeline = TextToImagePipeline.load(PipelineConfig(model=str(folder), size=64))
    return calibrate(
        pipeline, Gate.load(defaults["gate"]), tiny_prompts(32, offset=300), seeds=7,
        batch_size=8, variant="light",
    )  # fmt: skip


def test_tiny_calibration_curve_is_monotone_from_0_to_1(tiny_curve: Calibration) -> None:
    assert len(tiny_curve.thresholds) == len(tiny_curve.defer_fractions) == 201
    assert tiny_curve.defer_fractions[0] == 0.0 and tiny_curve.defer_fractions[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(tiny_curve.defer_fractions))
    assert tiny_curve.prompts == 32 and all(0 <= c <= 1 for c in tiny_curve.confidences)
    assert tiny_curve.model.endswith("light")


def test_curve_file_round_trips_with_the_spec_keys(tiny_curve: Calibration, tmp_path: Path) -> None:
    path = write_curve(tmp_path / "curve.json", tiny_curve)
    data = json.loads(path.read_text())
    assert set(data) == {
        "variant", "model", "prompts", "thresholds", "deferFractions", "confidences",
    }  # fmt: skip
    assert read_curve(path) == tiny_curve


def test_curve_points_validate_as_a_cascade_defer_curve(tiny_curve: Calibration) -> None:
    from diffcascade_operator.spec import DeferCurveSpec

    data = tiny_curve.to_json()
    spec = DeferCurveSpec.model_validate(
        {"thresholds": data["thresholds"], "deferFractions": data["deferFractions"]}
    )
    assert spec.defer_fractions == list(tiny_curve.defer_fractions)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "JSON object"),
        ('{"thresholds": [0, 1]}', "deferFractions"),
        ('{"thresholds": [0, 1], "deferFractions": [0]}', "equal length"),
        ('{"thresholds": [0, 1], "deferFractions": [0, 2]}', r"\[0, 1\]"),
        ('{"thresholds": [1, 0], "deferFractions": [0, 1]}', "strictly increasing"),
        ('{"thresholds": [0, 1], "deferFractions": [1, 0]}', "non-decreasing"),
    ],
)
def test_bad_curve_files_are_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CurveFormatError, match=message):
        read_curve(path)


def test_missing_curve_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CurveFormatError, match="does not exist"):
        read_curve(tmp_path / "none.json")


def test_calibration_and_the_rule_import_without_torch() -> None:
    """The operator image has no torch; curve files and the rule must still load there."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from diffcascade_worker.gate.calibration import read_curve, calibration_from_confidences\n"
        "from diffcascade_worker.deferral import should_defer\n"
        "assert calibration_from_confidences([0.5], model='m').defer_fraction(1.0) == 1.0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
