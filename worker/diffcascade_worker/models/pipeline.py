"""Loading and running one text-to-image diffusers pipeline.

The worker serves a single model variant; this module hides diffusers behind a small API whose
output is a plain float tensor, so batching, the gate and the HTTP layer never touch PIL or
diffusers types. Every image gets its own `torch.Generator`, so a seed reproduces the same
image whatever else shares its batch.
"""

from __future__ import annotations

import base64
import copy
import importlib
import inspect
import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcascade_worker.models.assembly import PipelineAssembly, SchedulerChoice

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
    assembly: PipelineAssembly = field(default_factory=PipelineAssembly)

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


class _DropFlaggedNotice(logging.Filter):
    """The safety checker logs a warning on every batch it flags; the response already marks
    each flagged image (`nsfw_content_detected`), so the log would only repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Potential NSFW content was detected" not in record.getMessage()


_FLAGGED_FILTER = _DropFlaggedNotice()


def quiet_progress_bars() -> None:
    """Turn off diffusers' and transformers' tqdm bars (load/save), which flood server logs."""
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module: Any = importlib.import_module(name)
        module.disable_progress_bar()


@dataclass(frozen=True)
class GeneratedImages:
    """One batch of images and, where a safety checker ran, which of them it flagged (a
    flagged image is black: the caller must say so, never hand it out as an answer)."""

    images: torch.Tensor  # float (B, 3, H, W) on the CPU, in [0, 1]
    nsfw_content_detected: list[bool] | None = None  # None: no safety checker ran


#: Pipeline components a weights variant or a replacement applies to, in diffusers' names.
DENOISERS = ("unet", "transformer")
SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
        """Load through diffusers' `from_pretrained`, assembled as `config.assembly` says; any
        failure becomes a `ModelLoadError` (a bad assembly field: a ValueError, before any
        weights are read)."""
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
                    + _replacement_hint(folder)
                )
            model = str(folder)

        # transformers warns about torchvision-less image processors SD never uses
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        diffusers: Any = importlib.import_module("diffusers")  # untyped: keep mypy out of it
        quiet_progress_bars()
        assembly = config.assembly
        scheduler_class = (
            scheduler_class_for(assembly.scheduler) if assembly.scheduler is not None else None
        )
        local_only = config.resolved_local_files_only()
        index = _model_index(diffusers, model, local_files_only=local_only)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
        if assembly.weights_variant is not None:
            kwargs["variant"] = assembly.weights_variant
        kwargs.update(_safety_kwargs(index, on=assembly.runs_safety_checker, model=config.model))
        if assembly.unet is not None:
            name, component = _load_replacement(
                diffusers, index, model, assembly, dtype=dtype, local_files_only=local_only
            )
            kwargs[name] = component
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
        if scheduler_class is not None:
            assert assembly.scheduler is not None
            pipe.scheduler = scheduler_class.from_config(
                pipe.scheduler.config, **assembly.scheduler.config
            )
        try:
            pipe = pipe.to(device)
        except Exception as error:
            raise ModelLoadError(
                f"cannot move model {config.model} to device {device}: {error}"
            ) from error
        pipe.set_progress_bar_config(disable=True)
        logging.getLogger(type(pipe).__module__).addFilter(_TRUNCATION_FILTER)
        checker = getattr(pipe, "safety_checker", None)
        if checker is not None:
            logging.getLogger(type(checker).__module__).addFilter(_FLAGGED_FILTER)
        return cls(config, pipe, device=device, dtype=dtype)

    def timesteps(self, steps: int | None = None) -> list[int]:
        """The timesteps the scheduler runs at `steps` (default: the variant's), computed on a
        copy: what a served batch will see, e.g. [999, 499] for Lightning at 2 steps."""
        scheduler = copy.deepcopy(self._pipe.scheduler)
        scheduler.set_timesteps(steps if steps is not None else self.config.steps, device="cpu")
        return [int(t) for t in scheduler.timesteps]

    def describe(self) -> str:
        """One line for the load log: classes, scheduler, timesteps, dtype."""
        scheduler = self._pipe.scheduler
        spacing = getattr(scheduler.config, "timestep_spacing", None)
        return (
            f"{type(self._pipe).__name__} ({self.config.assembly.describe()}); "
            f"{type(scheduler).__name__}"
            + (f" {spacing} spacing" if spacing else "")
            + f", timesteps {self.timesteps()} at {self.config.steps} step(s); "
            f"{str(self.dtype).removeprefix('torch.')} on {self.device}"
        )

    def warm_up(self) -> None:
        """One single-step generation at the configured size: first-call set-up costs land here."""
        self._run(["warm-up"], [0], size=self.config.size, steps=1)

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], *, size: int | None = None
    ) -> torch.Tensor:
        """Images as a float (B, 3, H, W) CPU tensor in [0, 1], one per (prompt, seed)."""
        return self.generate_batch(prompts, seeds, size=size).images

    def generate_batch(
        self, prompts: Sequence[str], seeds: Sequence[int], *, size: int | None = None
    ) -> GeneratedImages:
        """`generate`, with what the safety checker (when one runs) flagged."""
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

    def _run(
        self, prompts: list[str], seeds: list[int], *, size: int, steps: int
    ) -> GeneratedImages:
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
        flagged = getattr(output, "nsfw_content_detected", None)
        return GeneratedImages(
            images=images.detach().to(device="cpu", dtype=torch.float32).clamp_(0.0, 1.0),
            nsfw_content_detected=None if flagged is None else [bool(f) for f in flagged],
        )


def scheduler_class_for(choice: SchedulerChoice) -> Any:
    """The diffusers scheduler class `choice` names, after checking its config fields exist
    (diffusers itself ignores an unknown field, so a typo would silently change nothing)."""
    diffusers: Any = importlib.import_module("diffusers")
    found = getattr(diffusers, choice.class_name, None)
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler {choice.class_name!r} is not a diffusers scheduler class")
    known = set(inspect.signature(found).parameters) - {"self", "kwargs"}
    unknown = sorted(set(choice.config) - known)
    if unknown:
        raise ValueError(
            f"scheduler {choice.class_name} has no config field(s) {unknown}; "
            f"its fields: {sorted(known)}"
        )
    return found


def _model_index(diffusers: Any, model: str, *, local_files_only: bool) -> dict[str, Any]:
    """The pipeline's model_index.json (its components), from the folder or the hub cache."""
    folder = Path(model)
    try:
        if folder.is_dir():
            index = json.loads((folder / "model_index.json").read_text())
        else:
            index = diffusers.DiffusionPipeline.load_config(
                model, local_files_only=local_files_only
            )
    except Exception as error:
        hint = " (offline: a hub id must already be in the local Hugging Face cache)"
        raise ModelLoadError(
            f"cannot load model {model}: {error}{hint if local_files_only else ''}"
        ) from error
    return dict(index)


def _component(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    """(library, class) of a pipeline component, None when absent or null."""
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
        return entry[0], entry[1]
    return None


def _safety_kwargs(index: dict[str, Any], *, on: bool, model: str) -> dict[str, Any]:
    """from_pretrained arguments that leave the safety checker out, or check it is there."""
    present = _component(index, "safety_checker") is not None
    if on and not present:
        raise ModelLoadError(
            f"model {model} has no safety checker; leave safetyChecker off for this model"
        )
    if on or "safety_checker" not in index:
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _load_replacement(
    diffusers: Any,
    index: dict[str, Any],
    model: str,
    assembly: PipelineAssembly,
    *,
    dtype: torch.dtype,
    local_files_only: bool,
) -> tuple[str, Any]:
    """(component name, model) of the replacement denoiser: a state-dict file read into the
    base pipeline's own config (as Lightning's UNet files are), or a model folder."""
    assert assembly.unet is not None
    source = Path(assembly.unet).expanduser()
    name = next((n for n in DENOISERS if _component(index, n) is not None), None)
    if name is None:
        raise ModelLoadError(f"model {model} has no UNet or transformer to replace")
    library, class_name = _component(index, name) or ("", "")
    model_class = getattr(diffusers, class_name, None)
    if library != "diffusers" or model_class is None:
        raise ModelLoadError(f"model {model}: cannot replace its {name} ({library}.{class_name})")
    if not source.exists():
        raise ModelLoadError(f"replacement {name} {assembly.unet} does not exist")
    try:
        if source.is_dir():
            variant = assembly.weights_variant
            if variant is not None and not any(
                f".{variant}." in p.name for p in source.iterdir() if p.is_file()
            ):
                variant = None  # as diffusers does per component: the default files
            loaded = model_class.from_pretrained(
                str(source), dtype=dtype, variant=variant, local_files_only=True
            )
        else:
            loaded = _load_state_dict_file(
                model_class,
                source,
                base=model,
                subfolder=name,
                dtype=dtype,
                local_files_only=local_files_only,
            )
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"cannot load replacement {name} {assembly.unet} into {class_name}: {error} "
            f"(a file must hold a diffusers-format {class_name} state dict, e.g. "
            "sdxl_lightning_2step_unet.safetensors, not a whole-pipeline checkpoint)"
        ) from error
    return name, loaded


def _load_state_dict_file(
    model_class: Any,
    source: Path,
    *,
    base: str,
    subfolder: str,
    dtype: torch.dtype,
    local_files_only: bool,
) -> Any:
    """A model of the base's config with `source`'s weights, through diffusers' own loader:
    a folder of the config and a link to the file under diffusers' weights name."""
    if source.suffix not in _WEIGHT_SUFFIXES:
        raise ModelLoadError(
            f"replacement {subfolder} {source}: a .safetensors or .bin state-dict file, "
            "or a diffusers model folder"
        )
    config = model_class.load_config(base, subfolder=subfolder, local_files_only=local_files_only)
    with tempfile.TemporaryDirectory(prefix="diffcascade-replacement-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(dict(config)))
        Path(tmp, f"diffusion_pytorch_model{source.suffix}").symlink_to(source.resolve())
        return model_class.from_pretrained(tmp, dtype=dtype, local_files_only=True)


def _replacement_hint(folder: Path) -> str:
    """For a folder of UNet files (e.g. ByteDance/SDXL-Lightning): how to use one of them."""
    files = sorted(p.name for p in folder.glob("*unet*.safetensors"))
    if not files:
        return ""
    return (
        f"; it holds UNet files ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}): "
        "give the base pipeline as the model and one file as the replacement unet"
    )


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
