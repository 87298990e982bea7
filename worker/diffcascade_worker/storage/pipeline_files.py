"""Which files of a hub repository a pipeline will load: what `fetch` downloads.

A diffusers repository holds far more than one pipeline loads: the same weights in fp32 and
fp16, .bin beside .safetensors, single-file checkpoints at its root, ONNX/Flax/OpenVINO
exports, folders no component names (SDXL's vae_1_0, SDXS's vae_large), the safety checker.
`select_pipeline_files` keeps, from the repository's file list and its model_index.json,
exactly what `from_pretrained` reads for the worker's assembly:

- model_index.json, and in each component folder its config and tokenizer files;
- per component, the weights of the asked variant (model.fp16.safetensors) where the folder
  has them, else the default ones, as diffusers itself falls back per component; safetensors
  before .bin; shards with their index;
- no safety checker (nor its feature extractor) unless it runs; no weights of a denoiser a
  replacement UNet stands in for (its config stays: the replacement loads into it).

Pure and stdlib-only: the fetch init container, the operator's tests and a reader with a file
list all get the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DENOISERS = ("unet", "transformer")
SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")
#: Weight files as diffusers and transformers name them: <stem>[.<variant>][-0000k-of-0000n].<ext>
_WEIGHTS = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)"
    r"(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?\.(?P<ext>safetensors|bin)$"
)
#: Shard indexes: <stem>.<ext>.index[.<variant>].json (legacy: <stem>.<ext>.<variant>.index.json)
_INDEX = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)\.(?P<ext>safetensors|bin)"
    r"(?:\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?|\.(?P<legacy>[A-Za-z0-9_]+)\.index)\.json$"
)
#: Files besides weights that a component folder's loader reads (configs, tokenizers).
_METADATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")


@dataclass(frozen=True)
class PipelineSelection:
    """What the worker will load: the weights variant, the safety checker, a replaced denoiser."""

    weights_variant: str | None = None
    safety_checker: bool = False
    replaced_denoiser: bool = False

    def key(self) -> str:
        """A stable text naming the selection (a finished fetch of the same key is not redone)."""
        return (
            f"variant={self.weights_variant or '-'} safety={int(self.safety_checker)} "
            f"replaced={int(self.replaced_denoiser)}"
        )


def _split(path: str) -> tuple[str, str]:
    folder, _, name = path.rpartition("/")
    return folder, name


def _weight_group(name: str) -> tuple[str | None, str] | None:
    """(variant, ext) of a weights file or shard index, None for anything else."""
    match = _WEIGHTS.match(name)
    if match is not None:
        return match["variant"], match["ext"]
    match = _INDEX.match(name)
    if match is not None:
        return match["variant"] or match["legacy"], match["ext"]
    return None


def select_weights(names: Iterable[str], *, variant: str | None) -> list[str]:
    """The weight files (and shard index) one model folder's loader reads, by file name.

    Order of preference: the variant's safetensors, the variant's .bin, the default
    safetensors, the default .bin. Other variants (non_ema, ...) are never chosen.
    """
    groups: dict[tuple[str | None, str], list[str]] = {}
    for name in names:
        group = _weight_group(name)
        if group is not None:
            groups.setdefault(group, []).append(name)
    order: list[tuple[str | None, str]] = []
    if variant is not None:
        order += [(variant, "safetensors"), (variant, "bin")]
    order += [(None, "safetensors"), (None, "bin")]
    for group in order:
        if group in groups:
            return sorted(groups[group])
    return []


def _metadata(names: Iterable[str]) -> list[str]:
    return sorted(
        n
        for n in names
        if n.endswith(_METADATA_SUFFIXES)
        and _weight_group(n) is None
        and not n.startswith(("flax_", "tf_", "openvino_"))
    )


def select_folder_files(files: Iterable[str], folder: str, *, variant: str | None) -> list[str]:
    """The files of one model folder (`folder` in the repo, '' for its root) a loader reads."""
    prefix = f"{folder}/" if folder else ""
    names = [
        f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]
    ]
    chosen = _metadata(names) + select_weights(names, variant=variant)
    return sorted(prefix + n for n in chosen)


def components(model_index: Mapping[str, Any]) -> list[str]:
    """Component names of a model_index.json that load something (not null entries)."""
    return sorted(
        name
        for name, entry in model_index.items()
        if not name.startswith("_")
        and isinstance(entry, list)
        and len(entry) == 2
        and all(isinstance(e, str) for e in entry)
    )


def select_pipeline_files(
    files: Iterable[str], model_index: Mapping[str, Any], selection: PipelineSelection
) -> list[str]:
    """The repository files `from_pretrained` reads for `selection` (see the module doc)."""
    files = list(files)
    wanted = components(model_index)
    if not selection.safety_checker:
        wanted = [c for c in wanted if c not in SAFETY_COMPONENTS]
    replaced = (
        next((d for d in DENOISERS if d in wanted), None) if selection.replaced_denoiser else None
    )
    chosen = ["model_index.json"]
    for component in wanted:
        picked = select_folder_files(files, component, variant=selection.weights_variant)
        if component == replaced:
            picked = [p for p in picked if _weight_group(_split(p)[1]) is None]
        chosen += picked
    return sorted(set(chosen) & set(files))


def unloadable_components(
    files: Iterable[str], model_index: Mapping[str, Any], selection: PipelineSelection
) -> dict[str, list[str]]:
    """{component: variants it does have} for each component that has weight files but none
    the selection would load, e.g. a folder of only model.fp16.safetensors without
    weightsVariant fp16. The worker could not load it; `fetch` says so first."""
    files = list(files)
    chosen = set(select_pipeline_files(files, model_index, selection))
    out: dict[str, list[str]] = {}
    for component in components(model_index):
        groups = {_weight_group(_split(f)[1]) for f in files if _split(f)[0] == component} - {None}
        if not groups:
            continue  # tokenizers, schedulers: no weights
        if any(_split(f)[0] == component and _weight_group(_split(f)[1]) for f in chosen):
            continue
        skipped = (not selection.safety_checker and component in SAFETY_COMPONENTS) or (
            selection.replaced_denoiser and component in DENOISERS
        )
        if not skipped:
            out[component] = sorted({g[0] or "default" for g in groups if g is not None})
    return out
