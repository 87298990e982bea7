"""File lists (and model_index.json components) of the hub repositories the examples name.

Written down from each repository's file browser, as published (other frameworks' exports,
single-file checkpoints, images and the README included), so the tests can say what `fetch`
downloads of them without reaching the hub. Selection depends on names only; sizes are not
recorded here.
"""

from __future__ import annotations

from typing import Any

_TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def _folder(name: str, files: list[str]) -> list[str]:
    return [f"{name}/{f}" for f in files]


_DIFFUSERS_BOTH = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
]
_TEXT_BOTH = ["config.json", "model.safetensors", "model.fp16.safetensors"]

SD_TURBO_FILES = [
    ".gitattributes",
    "README.md",
    "image.jpg",
    "model_index.json",
    "sd_turbo.safetensors",
    "scheduler/scheduler_config.json",
    *_folder("text_encoder", _TEXT_BOTH),
    *_folder("tokenizer", _TOKENIZER),
    *_folder("unet", _DIFFUSERS_BOTH),
    *_folder("vae", _DIFFUSERS_BOTH),
]
SD_TURBO_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD15_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    *_folder(
        "safety_checker",
        [
            "config.json",
            "model.fp16.safetensors",
            "model.safetensors",
            "pytorch_model.bin",
            "pytorch_model.fp16.bin",
        ],
    ),
    "scheduler/scheduler_config.json",
    *_folder(
        "text_encoder",
        [*_TEXT_BOTH, "pytorch_model.bin", "pytorch_model.fp16.bin", "flax_model.msgpack"],
    ),
    *_folder("tokenizer", _TOKENIZER),
    *_folder(
        "unet",
        [
            *_DIFFUSERS_BOTH,
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.bin",
            "diffusion_pytorch_model.non_ema.bin",
            "diffusion_pytorch_model.non_ema.safetensors",
            "diffusion_flax_model.msgpack",
        ],
    ),
    *_folder(
        "vae",
        [*_DIFFUSERS_BOTH, "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    ),
]
SD15_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SDXS_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "output.png",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    *_folder("tokenizer", _TOKENIZER),
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae_large/config.json",
    "vae_large/diffusion_pytorch_model.safetensors",
]
SDXS_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderTiny"],
}

_ONNX = ["model.onnx", "model.onnx_data", "openvino_model.bin", "openvino_model.xml"]
SDXL_FILES = [
    ".gitattributes",
    "01.png",
    "LICENSE.md",
    "README.md",
    "comparison.png",
    "model_index.json",
    "pipeline.png",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    *_folder("text_encoder", [*_TEXT_BOTH, "flax_model.msgpack", "model.onnx", *_ONNX[2:]]),
    *_folder("text_encoder_2", [*_TEXT_BOTH, "flax_model.msgpack", *_ONNX]),
    *_folder("tokenizer", _TOKENIZER),
    *_folder("tokenizer_2", _TOKENIZER),
    *_folder("unet", [*_DIFFUSERS_BOTH, "diffusion_flax_model.msgpack", *_ONNX]),
    *_folder("vae", [*_DIFFUSERS_BOTH, "diffusion_flax_model.msgpack"]),
    *_folder("vae_1_0", _DIFFUSERS_BOTH),
    *_folder("vae_decoder", ["config.json", "model.onnx", *_ONNX[2:]]),
    *_folder("vae_encoder", ["config.json", "model.onnx", *_ONNX[2:]]),
]
SDXL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

LIGHTNING_FILES = [
    ".gitattributes",
    "README.md",
    "comfyui/sdxl_lightning_workflow_full.json",
    "comfyui/sdxl_lightning_workflow_lora.json",
    "comfyui/sdxl_lightning_workflow_unet.json",
    "sdxl_lightning_1step_unet_x0.safetensors",
    "sdxl_lightning_1step_x0.safetensors",
    *(
        f"sdxl_lightning_{n}step{kind}.safetensors"
        for n in (2, 4, 8)
        for kind in ("", "_lora", "_unet")
    ),
    "sdxl_lightning_samples.jpg",
    "sdxl_lightning_report.pdf",
]

CLIP_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "flax_model.msgpack",
    "merges.txt",
    "model.safetensors",
    "preprocessor_config.json",
    "pytorch_model.bin",
    "special_tokens_map.json",
    "tf_model.h5",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]

#: repo id -> (files, model_index.json or None)
REPOS: dict[str, tuple[list[str], dict[str, Any] | None]] = {
    "stabilityai/sd-turbo": (SD_TURBO_FILES, SD_TURBO_INDEX),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (SD15_FILES, SD15_INDEX),
    "IDKiro/sdxs-512-0.9": (SDXS_FILES, SDXS_INDEX),
    "stabilityai/stable-diffusion-xl-base-1.0": (SDXL_FILES, SDXL_INDEX),
    "ByteDance/SDXL-Lightning": (LIGHTNING_FILES, None),
    "openai/clip-vit-base-patch32": (CLIP_FILES, None),
}
