"""A gate that needs no training: confidence from CLIP image-text similarity.

The cosine similarity between the image's and the prompt's CLIP embeddings (the CLIP score of
text-to-image evaluation, without its x100) says how well the light model followed the
prompt; a linear map clipped to [0, 1] turns it into the gate's confidence. The map is read
from `diffcascade-clip-gate.json` beside the weights when there is one (written by
`make_tiny_clip`, or by hand), else `DEFAULT_CALIBRATION`, which spreads the similarities
OpenAI's ViT-B/32 and ViT-L/14 give SD images of their prompts (about 0.15 to 0.35) over
[0, 1]. The operator plans with the curve f(t) that `diffcascade-worker profile` measures with
the same gate on the same model, so the map only has to be monotone, not exact.

The folder is a transformers `CLIPModel` (`config.json`, weights, tokenizer files), e.g.
openai/clip-vit-base-patch32 fetched with `hf://openai/clip-vit-base-patch32`.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ARCHITECTURE = "clip-score"
CALIBRATION_FILE = "diffcascade-clip-gate.json"
#: CLIP's own image normalisation (preprocessor_config.json of the OpenAI checkpoints).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipGateError(RuntimeError):
    """The CLIP folder or its calibration cannot be used as a gate."""


@dataclass(frozen=True)
class ClipCalibration:
    """confidence = clip((similarity - low) / (high - low), 0, 1)."""

    low: float
    high: float

    def confidence(self, similarity: float) -> float:
        return min(1.0, max(0.0, (similarity - self.low) / (self.high - self.low)))

    def to_json(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, "low": self.low, "high": self.high}


DEFAULT_CALIBRATION = ClipCalibration(low=0.15, high=0.35)


def is_clip_folder(path: Path) -> bool:
    """A folder holding a transformers CLIPModel config (what `load_gate` routes here)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "clip"


def read_calibration(folder: Path) -> ClipCalibration:
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return DEFAULT_CALIBRATION
    try:
        data = json.loads(path.read_text())
        low, high = float(data["low"]), float(data["high"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ClipGateError(f"{path}: needs numeric 'low' and 'high': {error}") from error
    if not -1.0 <= low < high <= 1.0:
        raise ClipGateError(f"{path}: need -1 <= low < high <= 1, got {low}, {high}")
    return ClipCalibration(low=low, high=high)


def write_calibration(folder: Path, calibration: ClipCalibration) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    path.write_text(json.dumps(calibration.to_json(), indent=1) + "\n")
    return path


class ClipScoreGate:
    """A loaded CLIPModel and tokenizer scoring (image, prompt) pairs."""

    architecture = ARCHITECTURE

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        calibration: ClipCalibration,
        image_size: int,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.image_size = image_size
        self.device = device
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, *, device: str | None = None) -> ClipScoreGate:
        """Load from a local folder only (the pod's cache); never reaches the hub."""
        folder = Path(folder)
        if not is_clip_folder(folder):
            raise ClipGateError(f"{folder} is not a CLIP model folder (config.json model_type)")
        calibration = read_calibration(folder)
        from diffcascade_worker.models.pipeline import quiet_progress_bars

        quiet_progress_bars()
        transformers: Any = importlib.import_module("transformers")
        try:
            model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as error:
            raise ClipGateError(f"cannot load the CLIP gate {folder}: {error}") from error
        resolved = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            model,
            tokenizer,
            calibration=calibration,
            image_size=int(model.config.vision_config.image_size),
            device=resolved,
        )

    def similarities(self, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        """Cosine similarity of each image with its prompt, in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        if images.shape[0] == 0:
            return []
        x = images.float().to(self.device)
        x = F.interpolate(
            x,
            size=(self.image_size, self.image_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(0.0, 1.0)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        with self._lock, torch.inference_mode():
            image_embeds = self._features(self.model.get_image_features(pixel_values=x))
            text_embeds = self._features(self.model.get_text_features(**tokens))
        sims = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        values: list[float] = sims.cpu().tolist()
        return values

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        # transformers 5 may return a model output object instead of a bare tensor.
        if isinstance(output, torch.Tensor):
            return output
        for name in ("pooler_output", "image_embeds", "text_embeds"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
        raise ClipGateError(f"unexpected CLIP feature output {type(output).__name__}")

    def score(self, images: torch.Tensor, *, prompts: Sequence[str] | None = None) -> list[float]:
        """Confidence in [0, 1] per image; the prompts are required (it is a text-image score)."""
        if prompts is None:
            raise ValueError("the clip-score gate needs the prompt of every image")
        return [self.calibration.confidence(s) for s in self.similarities(images, prompts)]
