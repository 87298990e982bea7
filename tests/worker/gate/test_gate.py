"""The gate: the deferral rule, checkpoints, scoring and training a real tiny discriminator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffcascade_worker.gate.discriminators import (
    DEFAULT_NORMALIZATION,
    EfficientNetV2S,
    TinyCNN,
)
from diffcascade_worker.gate.scorer import Gate, GateLoadError, save_checkpoint, should_defer
from diffcascade_worker.gate.training import (
    TrainingDataError,
    holdout_accuracy,
    save_image_folder,
    train_discriminator,
    train_on_tensors,
)
from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline
from diffcascade_worker.models.tiny import read_model_defaults, tiny_prompts

torch.set_num_threads(1)


# --- the deferral rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("confidence", "threshold", "deferred"),
    [
        (0.0, 0.0, False),  # threshold 0 defers nothing, not even confidence 0
        (0.3, 0.5, True),
        (0.5, 0.5, False),  # equal to the threshold: confident enough
        (0.7, 0.5, False),
        (0.999, 1.0, True),  # threshold 1 defers everything...
        (1.0, 1.0, True),  # ...even a confidence of exactly 1
        (1.0, 0.999, False),
        (math.nan, 0.0, False),
        (math.nan, 0.2, True),  # a broken score is deferred when anything is
    ],
)
def test_should_defer_edge_cases(confidence: float, threshold: float, deferred: bool) -> None:
    assert should_defer(confidence, threshold) is deferred


# --- the tiny gate shipped with the light model ---------------------------------------------


def _pipeline(folder: Path) -> TextToImagePipeline:
    d = read_model_defaults(folder)
    return TextToImagePipeline.load(
        PipelineConfig(
            model=str(folder), steps=d["steps"], guidance_scale=d["guidance_scale"], size=d["size"]
        )
    )


@pytest.fixture(scope="module")
def fresh_images(tiny_models: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Light and heavy images of prompts and seeds the shipped gate was not trained on."""
    prompts = tiny_prompts(24, offset=200)
    seeds = list(range(50_000, 50_024))
    return {
        kind: torch.cat(
            [_pipeline(tiny_models[kind]).generate(prompts[i : i + 12], seeds[i : i + 12])
             for i in (0, 12)]
        )
        for kind in ("light", "heavy")
    }  # fmt: skip


@pytest.fixture(scope="module")
def tiny_gate(tiny_models: dict[str, Path]) -> Gate:
    return Gate.load(read_model_defaults(tiny_models["light"])["gate"])


def test_tiny_gate_scores_are_probabilities(
    tiny_gate: Gate, fresh_images: dict[str, torch.Tensor]
) -> None:
    scores = tiny_gate.score(fresh_images["light"])
    assert len(scores) == 24
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert tiny_gate.score(fresh_images["light"][:0]) == []


def test_tiny_gate_separates_light_from_heavy_images(
    tiny_gate: Gate, fresh_images: dict[str, torch.Tensor]
) -> None:
    light, heavy = tiny_gate.score(fresh_images["light"]), tiny_gate.score(fresh_images["heavy"])
    accuracy = (sum(s < 0.5 for s in light) + sum(s >= 0.5 for s in heavy)) / 48
    assert accuracy >= 0.8
    assert sum(heavy) / len(heavy) > sum(light) / len(light)


def test_gate_resizes_any_image_size(tiny_gate: Gate) -> None:
    assert len(tiny_gate.score(torch.rand(2, 3, 40, 40))) == 2
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tiny_gate.score(torch.rand(3, 64, 64))


def test_checkpoint_round_trip_gives_identical_scores(tiny_gate: Gate, tmp_path: Path) -> None:
    images = torch.rand(5, 3, 64, 64)
    path = save_checkpoint(
        tmp_path / "copy.pt",
        tiny_gate.model,
        architecture=tiny_gate.architecture,
        image_size=tiny_gate.image_size,
        normalization=tiny_gate.normalization,
    )
    assert Gate.load(path).score(images) == tiny_gate.score(images)


# --- bad checkpoints -------------------------------------------------------------------------


def test_missing_checkpoint_is_a_gate_load_error(tmp_path: Path) -> None:
    with pytest.raises(GateLoadError, match="does not exist"):
        Gate.load(tmp_path / "nope.pt")


def test_garbage_file_is_a_gate_load_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(GateLoadError, match="not a readable torch file"):
        Gate.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "not a dict"),
        ({"state_dict": {}}, "no 'architecture'"),
        ({"architecture": "resnet50", "state_dict": {}}, "unknown architecture 'resnet50'"),
        ({"architecture": "tiny-cnn", "state_dict": {}, "version": 9}, "unsupported version"),
        ({"architecture": "tiny-cnn"}, "no state_dict"),
        ({"architecture": "tiny-cnn", "state_dict": {"x": torch.zeros(1)}}, "does not match"),
    ],
)
def test_malformed_checkpoint_is_a_gate_load_error(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(GateLoadError, match=message):
        Gate.load(path)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    state = TinyCNN().state_dict()
    torch.save({"architecture": "efficientnet_v2_s", "state_dict": state, "version": 1}, path)
    with pytest.raises(GateLoadError, match="efficientnet_v2_s"):
        Gate.load(path)


# --- training from image folders ---------------------------------------------------------


def test_train_discriminator_on_folders_learns_light_vs_heavy(
    fresh_images: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    save_image_folder(fresh_images["heavy"], tmp_path / "real")
    save_image_folder(fresh_images["light"], tmp_path / "generated")
    out = tmp_path / "gate" / "trained.pt"
    report = train_discriminator(
        tmp_path / "real", tmp_path / "generated", epochs=30, batch_size=16, seed=1, out_path=out
    )
    assert report.out_path == out and out.is_file()
    assert report.train_images + report.holdout_images == 48
    assert report.holdout_accuracy >= 0.8
    gate = Gate.load(out)
    assert gate.architecture == "tiny-cnn" and gate.image_size == 64
    accuracy = holdout_accuracy(
        gate.model,
        fresh_images["heavy"],
        fresh_images["light"],
        image_size=64,
        architecture="tiny-cnn",
    )
    assert accuracy >= 0.8


def test_training_can_start_from_pretrained_weights(
    fresh_images: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """A backbone checkpoint with another head (like torchvision's 1000-class file) loads."""
    torch.manual_seed(5)
    pretrained = TinyCNN(num_classes=10)
    torch.save(pretrained.state_dict(), tmp_path / "backbone.pth")
    model, _ = train_on_tensors(
        fresh_images["heavy"], fresh_images["light"], epochs=1, lr=1e-9,
        init_from=tmp_path / "backbone.pth",
    )  # fmt: skip
    first_conv = "net.0.weight"
    torch.testing.assert_close(
        model.state_dict()[first_conv], pretrained.state_dict()[first_conv], atol=1e-6, rtol=0
    )
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(TrainingDataError, match="do not fit"):
        train_on_tensors(
            fresh_images["heavy"], fresh_images["light"], init_from=tmp_path / "wrong.pth"
        )


def test_training_reports_bad_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    out = tmp_path / "g.pt"
    with pytest.raises(TrainingDataError, match="does not exist"):
        train_discriminator(tmp_path / "missing", tmp_path / "empty", out_path=out)
    with pytest.raises(TrainingDataError, match="holds no"):
        train_discriminator(tmp_path / "empty", tmp_path / "empty", out_path=out)
    with pytest.raises(TrainingDataError, match="cannot read image"):
        train_discriminator(tmp_path / "broken", tmp_path / "broken", out_path=out)


# --- EfficientNet-V2-S, torchvision-compatible ------------------------------------------------

# torchvision's efficientnet_v2_s has 21,458,488 parameters with its 1000-class ImageNet head
# (Linear(1280, 1000) = 1,281,000); DiffServe's head is Linear(1280, 2) = 2,562.
TORCHVISION_V2_S_PARAMS = 21_458_488
V2_S_TWO_CLASS_PARAMS = TORCHVISION_V2_S_PARAMS - 1_281_000 + 2_562


@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetV2S:
    torch.manual_seed(0)
    return EfficientNetV2S(num_classes=2).eval()


def test_efficientnet_parameter_counts_match_torchvision(efficientnet: EfficientNetV2S) -> None:
    assert sum(p.numel() for p in efficientnet.parameters()) == V2_S_TWO_CLASS_PARAMS
    imagenet = EfficientNetV2S(num_classes=1000)
    assert sum(p.numel() for p in imagenet.parameters()) == TORCHVISION_V2_S_PARAMS
    assert len(list(imagenet.parameters())) == 452  # named parameter tensors in torchvision's


def test_efficientnet_uses_torchvision_names_and_shapes(efficientnet: EfficientNetV2S) -> None:
    state = efficientnet.state_dict()
    expected_shapes = {
        "features.0.0.weight": (24, 3, 3, 3),  # stem conv
        "features.0.1.running_var": (24,),
        "features.1.0.block.0.0.weight": (24, 24, 3, 3),  # FusedMBConv, expand ratio 1
        "features.2.0.block.0.0.weight": (96, 24, 3, 3),  # FusedMBConv fused expand
        "features.2.0.block.1.0.weight": (48, 96, 1, 1),  # ... and project
        "features.4.0.block.0.0.weight": (256, 64, 1, 1),  # MBConv expand
        "features.4.0.block.1.0.weight": (256, 1, 3, 3),  # depthwise
        "features.4.0.block.2.fc1.weight": (16, 256, 1, 1),  # squeeze-excitation
        "features.4.0.block.2.fc2.bias": (256,),
        "features.4.0.block.3.1.num_batches_tracked": (),
        "features.6.14.block.3.0.weight": (256, 1536, 1, 1),  # last of 15 blocks
        "features.7.0.weight": (1280, 256, 1, 1),  # head conv
        "classifier.1.weight": (2, 1280),
        "classifier.1.bias": (2,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "features.6.15.block.0.0.weight" not in state
    batch_norms = [m for m in efficientnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and all(m.eps == 1e-3 for m in batch_norms)
    dropout = efficientnet.classifier[0]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.2


def test_efficientnet_gate_forward_at_224_and_round_trip(
    efficientnet: EfficientNetV2S, tmp_path: Path
) -> None:
    images = torch.rand(2, 3, 64, 64)
    ours = save_checkpoint(
        tmp_path / "effnet.pt",
        efficientnet,
        architecture="efficientnet_v2_s",
        image_size=224,
        normalization=DEFAULT_NORMALIZATION["efficientnet_v2_s"],
    )
    gate = Gate.load(ours)
    assert gate.image_size == 224 and gate.normalization.mean == (0.507,)
    scores = gate.score(images)  # resized 64 -> 224 inside
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    # a bare torchvision-style state_dict (as torch.save(model.state_dict())) loads strictly
    bare = tmp_path / "torchvision.pth"
    torch.save(efficientnet.state_dict(), bare)
    assert Gate.load(bare).score(images) == scores
