"""Tiny random-weight pipelines in the topologies of the DiffServe paper's real models.

`tiny.py` builds the SD 1.x pair the demo runs; these are the other layouts a cascade loads,
each built offline from diffusers' and transformers' real classes at toy widths and saved with
`save_pretrained`, so the worker reads them through the same code as the real repositories:

    sd-turbo        SD 2.1 layout: gelu text encoder, linear projections, per-level heads,
                    Euler with "trailing" spacing (1 step runs t=999)
    sdxs            SD 2.1 text encoder, a UNet without a mid block, AutoencoderTiny as `vae`
                    (with an unused `vae_large` beside it, as in the hub repository)
    sdxl            two text encoders (the second with a projection), `text_time` embeddings,
                    a VAE with force_upcast, Euler with "leading" spacing (SDXL base's)
    sdxl-lightning  not a pipeline: a folder of UNet state-dict files of the SDXL layout
                    (`sdxl_lightning_2step_unet.safetensors`), like ByteDance/SDXL-Lightning
    sd15-safety     SD 1.x with a safety checker that flags every image (SD v1.5 has one)

The SDXL pair share one set of sizes, so the Lightning file loads into the SDXL base folder's
UNet config; its weights come from another seed, as a distilled UNet's differ from the base's.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import torch

from diffcascade_worker.models.tiny import TINY_SIZE, make_byte_tokenizer

Family = Literal["sd-turbo", "sdxs", "sdxl", "sdxl-lightning", "sd15-safety"]
FAMILIES: tuple[Family, ...] = ("sd-turbo", "sdxs", "sdxl", "sdxl-lightning", "sd15-safety")
LIGHTNING_UNET_FILE = "sdxl_lightning_2step_unet.safetensors"

_BETAS: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def _modules() -> tuple[Any, Any]:
    diffusers: Any = importlib.import_module("diffusers")  # untyped: keep mypy out of it
    transformers: Any = importlib.import_module("transformers")
    return diffusers, transformers


def _text_config(vocab: int, *, hidden: int, act: str, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
        **extra,
    }


def _vae(diffusers: Any, **extra: Any) -> Any:
    """4 levels: the x8 latent factor of every real SD VAE."""
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=TINY_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **extra,
    )


def _sd2_unet(diffusers: Any, *, text_dim: int, mid: bool) -> Any:
    return diffusers.UNet2DConditionModel(
        sample_size=TINY_SIZE // 8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid else None,
    )


def sdxl_unet(*, seed: int) -> Any:
    """The tiny SDXL UNet (base and Lightning share it): text_time micro-conditioning."""
    diffusers, _ = _modules()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return diffusers.UNet2DConditionModel(
            sample_size=TINY_SIZE // 8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 micro-cond ints + pooled 32
            cross_attention_dim=32 + 32,  # both encoders' hidden states, concatenated
        )


def build_tiny_family(family: Family, *, seed: int = 0) -> Any:
    """An in-memory pipeline of `family` (not sdxl-lightning: that is a UNet file)."""
    diffusers, transformers = _modules()
    if family not in FAMILIES or family == "sdxl-lightning":
        raise ValueError(f"family must be one of {FAMILIES[:2]}, sdxl or sd15-safety")
    if family == "sdxl":
        return _build_sdxl(diffusers, transformers, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_byte_tokenizer()
        vocab = len(tokenizer)
        if family == "sd15-safety":
            return _build_sd15_safety(diffusers, transformers, tokenizer)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**_text_config(vocab, hidden=32, act="gelu"))
        )
        unet = _sd2_unet(diffusers, text_dim=32, mid=family == "sd-turbo")
        if family == "sdxs":
            vae = diffusers.AutoencoderTiny(
                encoder_block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8),
                num_encoder_blocks=(1, 1, 1, 1),
                num_decoder_blocks=(1, 1, 1, 1),
            )
        else:
            vae = _vae(diffusers)
    scheduler = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", **_BETAS)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_sdxl(diffusers: Any, transformers: Any, *, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_byte_tokenizer()
        tokenizer_2 = make_byte_tokenizer()
        vocab = len(tokenizer)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**_text_config(vocab, hidden=32, act="quick_gelu"))
        )
        text_encoder_2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(
                **_text_config(vocab, hidden=32, act="gelu", projection_dim=32)
            )
        )
        vae = _vae(diffusers, force_upcast=True, scaling_factor=0.13025)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=sdxl_unet(seed=seed + 1),
        scheduler=diffusers.EulerDiscreteScheduler(timestep_spacing="leading", **_BETAS),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_sd15_safety(diffusers: Any, transformers: Any, tokenizer: Any) -> Any:
    """SD 1.x with CLIP-L-style (quick_gelu) text and a safety checker that flags all: every
    concept threshold is far below any cosine similarity."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    vocab = len(tokenizer)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**_text_config(vocab, hidden=32, act="quick_gelu"))
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=TINY_SIZE // 8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    checker = StableDiffusionSafetyChecker(
        transformers.CLIPConfig(
            text_config=_text_config(vocab, hidden=32, act="quick_gelu"),
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=16,
        )
    )
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)
    extractor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(diffusers),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_BETAS),
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_family(family: Family, out_dir: Path, *, seed: int = 0) -> Path:
    """Save `family` under `out_dir` (returned): a pipeline folder, or for sdxl-lightning a
    folder of UNet files with no model_index.json (load one into the sdxl folder's pipeline)."""
    from diffcascade_worker.models.pipeline import quiet_progress_bars

    quiet_progress_bars()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "sdxl-lightning":
        from safetensors.torch import save_file

        unet = sdxl_unet(seed=seed + 100)
        state = {k: v.contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(out_dir / LIGHTNING_UNET_FILE))
        return out_dir
    build_tiny_family(family, seed=seed).save_pretrained(out_dir)
    if family == "sdxs":  # the hub repo keeps the full VAE beside the tiny one, unused
        _vae(_modules()[0]).save_pretrained(out_dir / "vae_large")
    return out_dir
