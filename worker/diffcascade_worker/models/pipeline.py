"""Loading and running one text-to-image diffusers pipeline.

The worker serves a single model variant; this module hides diffusers behind a small API whose
output is a plain float tensor, so batching, the gate and the HTTP layer never touch PIL or
diffusers types. Every image gets its own `torch.Generator`, so a seed reproduces the same
image whatever else shares its batch.
"""

from __future__ import annotations

import base64
import importlib
import io
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MIN_SIZE = 8
MAX_SIZE = 4096
SIZE_MULTIPLE = 8  # the VAE of every SD-family model downsamples by 8

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """The model folder or hub id could not be loaded as a text-to-image pipeline."""


@dataclass(frozen=True)
class PipelineConfig:
    """What to load and how to run it; `None` fields are resolved from the machine."""

    model: str  # hub id or local folder
    steps: int = 1
    guidance_scale: float = 0.0
    size: int = 512  # square resolution in px
    device: str | None = None  # None: cuda if available else cpu
    dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    local_files_only: bool | None = None  # None: True when HF_HUB_OFFLINE=1

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.float16 if self.resolved_device().startswith("cuda") else torch.float32
        try:
            return _DTYPES[self.dtype.lower()]
        except KeyError:
            raise ValueError(
                f"unsupported dtype {self.dtype!r}; use one of {sorted(set(_DTYPES))}"
            ) from None

    def resolved_local_files_only(self) -> bool:
        if self.local_files_only is not None:
            return self.local_files_only
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def check_size(size: int) -> None:
    """Raise ValueError unless `size` is a square side the SD family can generate."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"size must be an integer number of pixels, got {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE or size % SIZE_MULTIPLE:
        raise ValueError(
            f"size must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE} px, "
            f"got {size}"
        )


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else is meant as a folder."""
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
        or Path(model).exists()
    )


class _DropTruncationNotice(logging.Filter):
    """CLIP truncates prompts to 77 tokens, as every SD server does; diffusers logs the cut
    text at WARNING on every call, which floods a server's log with user prompts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "can only handle sequences up to" not in record.getMessage()


_TRUNCATION_FILTER = _DropTruncationNotice()


def quiet_progress_bars() -> None:
    """Turn off diffusers' and transformers' tqdm bars (load/save), which flood server logs."""
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module: Any = importlib.import_module(name)
        module.disable_progress_bar()


class TextToImagePipeline:
    """A loaded diffusers text-to-image pipeline with the variant's run settings."""

    def __init__(self, config: PipelineConfig, pipe: Any, *, device: str, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self._pipe = pipe
        self._lock = threading.Lock()  # diffusers pipelines are not safe to call concurrently

    @property
    def diffusers_pipeline(self) -> Any:
        """The underlying diffusers object, for callers that need a model-specific option."""
        return self._pipe

    @classmethod
    def load(cls, config: PipelineConfig) -> TextToImagePipeline:
        """Load through diffusers' `from_pretrained`; any failure becomes a `ModelLoadError`."""
        if config.steps < 1:
            raise ValueError(f"steps must be >= 1, got {config.steps}")
        if config.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {config.guidance_scale}")
        check_size(config.size)
        device = config.resolved_device()
        dtype = config.resolved_dtype()
        model = config.model
        if _looks_like_path(model):
            folder = Path(model).expanduser()
            if not folder.is_dir():
                what = "is not a folder" if folder.exists() else "does not exist"
                raise ModelLoadError(f"model folder {model} {what}")
            if not (folder / "model_index.json").is_file():
                raise ModelLoadError(
                    f"model folder {model} has no model_index.json (not a diffusers pipeline)"
                )
            model = str(folder)

        # transformers warns about torchvision-less image processors SD never uses
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        diffusers: Any = importlib.import_module("diffusers")  # untyped: keep mypy out of it
        quiet_progress_bars()
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "local_files_only": config.resolved_local_files_only(),
        }
        pipe: Any
        try:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(model, **kwargs)
        except ValueError as auto_error:
            # AutoPipeline knows only the classes it maps; custom pipelines still load here.
            try:
                pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)
            except Exception as error:
                raise ModelLoadError(
                    f"cannot load model {config.model}: {error} (also: {auto_error})"
                ) from error
        except Exception as error:
            hint = ""
            if kwargs["local_files_only"] and not _looks_like_path(config.model):
                hint = " (offline: a hub id must already be in the local Hugging Face cache)"
            raise ModelLoadError(f"cannot load model {config.model}: {error}{hint}") from error
        try:
            pipe = pipe.to(device)
        except Exception as error:
            raise ModelLoadError(
                f"cannot move model {config.model} to device {device}: {error}"
            ) from error
        pipe.set_progress_bar_config(disable=True)
        logging.getLogger(type(pipe).__module__).addFilter(_TRUNCATION_FILTER)
        return cls(config, pipe, device=device, dtype=dtype)

    def warm_up(self) -> None:
        """One single-step generation at the configured size: first-call set-up costs land here."""
        self._run(["warm-up"], [0], size=self.config.size, steps=1)

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], *, size: int | None = None
    ) -> torch.Tensor:
        """Images as a float (B, 3, H, W) CPU tensor in [0, 1], one per (prompt, seed)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, not one string")
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("need at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        seed_list = [int(s) for s in seeds]
        if any(not 0 <= s < 2**64 for s in seed_list):
            raise ValueError("seeds must lie in [0, 2**64)")
        size = self.config.size if size is None else size
        check_size(size)
        return self._run(list(prompts), seed_list, size=size, steps=self.config.steps)

    def _run(self, prompts: list[str], seeds: list[int], *, size: int, steps: int) -> torch.Tensor:
        # CPU generators: the initial noise is the same on every device for a given seed.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        with self._lock, torch.inference_mode():
            output = self._pipe(
                prompt=prompts,
                num_inference_steps=steps,
                guidance_scale=self.config.guidance_scale,
                height=size,
                width=size,
                generator=generators,
                output_type="pt",
            )
        images = output.images
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"pipeline returned {type(images).__name__}, expected a tensor")
        return images.detach().to(device="cpu", dtype=torch.float32).clamp_(0.0, 1.0)


def encode_png_b64(image: torch.Tensor) -> str:
    """One float (3, H, W) image in [0, 1] -> base64 text of a PNG file."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    from PIL import Image

    pixels = (
        (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0)
        .round()
        .to(torch.uint8)
        .permute(1, 2, 0)
        .contiguous()
        .numpy()
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_b64(text: str) -> torch.Tensor:
    """Inverse of `encode_png_b64` (to 8-bit precision): base64 PNG -> float (3, H, W)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
