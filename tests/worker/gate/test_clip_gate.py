"""The clip-score gate on a tiny random CLIP built offline (real transformers classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffcascade_worker.gate.clip import (
    CALIBRATION_FILE,
    DEFAULT_CALIBRATION,
    ClipCalibration,
    ClipScoreGate,
)
from diffcascade_worker.gate.scorer import GateLoadError, load_gate
from diffcascade_worker.models.engine import DiffusersEngine
from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline
from diffcascade_worker.models.tiny import make_tiny_clip, tiny_prompts


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_load_gate_routes_a_clip_folder_to_the_clip_score_gate(tiny_clip: Path) -> None:
    gate = load_gate(tiny_clip, device="cpu")
    assert isinstance(gate, ClipScoreGate)
    assert gate.calibration != DEFAULT_CALIBRATION  # the tiny CLIP's own map was read


def test_confidence_is_in_unit_range_graded_and_depends_on_the_prompt(tiny_clip: Path) -> None:
    gate = ClipScoreGate.load(tiny_clip, device="cpu")
    images = torch.rand(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompts = tiny_prompts(32)
    scores = gate.score(images, prompts=prompts)
    assert len(scores) == 32 and all(0.0 <= s <= 1.0 for s in scores)
    assert len({round(s, 6) for s in scores}) > 10  # graded, not a step
    same_image = images[:1].repeat(8, 1, 1, 1)
    assert len({round(s, 6) for s in gate.score(same_image, prompts=prompts[:8])}) > 1
    assert gate.score(images, prompts=prompts) == scores  # deterministic


def test_the_map_is_the_stored_calibration(tiny_clip: Path) -> None:
    gate = ClipScoreGate.load(tiny_clip, device="cpu")
    images = torch.rand(4, 3, 64, 64)
    prompts = tiny_prompts(4)
    sims = gate.similarities(images, prompts)
    stored = json.loads((tiny_clip / CALIBRATION_FILE).read_text())
    cal = ClipCalibration(low=stored["low"], high=stored["high"])
    assert gate.score(images, prompts=prompts) == [cal.confidence(s) for s in sims]


def test_without_prompts_or_with_a_bad_calibration_it_says_why(
    tiny_clip: Path, tmp_path: Path
) -> None:
    gate = ClipScoreGate.load(tiny_clip, device="cpu")
    with pytest.raises(ValueError, match="needs the prompt"):
        gate.score(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="prompts"):
        gate.score(torch.rand(2, 3, 64, 64), prompts=["one"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_clip.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / CALIBRATION_FILE).write_text('{"low": 0.5, "high": 0.1}')
    with pytest.raises(GateLoadError, match="low < high"):
        load_gate(broken, device="cpu")
    (broken / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(GateLoadError, match="not a CLIP model folder"):
        load_gate(broken, device="cpu")


def test_the_engine_scores_each_image_against_its_own_prompt(
    tiny_clip: Path, tiny_models: dict[str, Path]
) -> None:
    pipeline = TextToImagePipeline.load(
        PipelineConfig(model=str(tiny_models["light"]), steps=1, size=64, device="cpu")
    )
    gate = ClipScoreGate.load(tiny_clip, device="cpu")
    engine = DiffusersEngine(pipeline, gate)
    engine.warm_up()
    prompts = tiny_prompts(4)
    out = engine.run_batch(prompts, [0, 1, 2, 3])
    assert out.confidences is not None and len(out.confidences) == 4
    images = pipeline.generate(prompts, [0, 1, 2, 3])
    assert list(out.confidences) == pytest.approx(gate.score(images, prompts=prompts))


def test_serve_with_a_clip_folder_as_gate_reports_its_confidence(
    tiny_clip: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import httpx
    from worker_testing import start_worker

    worker = start_worker(
        model=tiny_models["light"], variant="light", logs=tmp_path, args=["--gate", str(tiny_clip)]
    )
    try:
        worker.wait_ready()
        response = httpx.post(
            f"{worker.url}/v1/images/generations",
            json={"prompt": "a red bicycle", "size": "64x64", "seed": 3},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        [image] = response.json()["data"]
        confidence = image["confidence"]
        assert confidence is not None and 0.0 <= confidence <= 1.0
        assert image["deferred"] is False  # threshold 0 and no next stage
    finally:
        worker.terminate()
