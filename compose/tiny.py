"""Tiny random Stable Diffusion pipelines of the real architectures.

They are built in about a second, deterministic from a seed, and exercise every code
path a full model does (cross-attention, VAE, CLIP text encoders with the real
tokenizer, SDXL's added conditioning). Tests and the CPU speed benchmark use them;
their images are noise, because their weights are random.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .layers import Factors
from .tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer

TINY_FAMILIES = ("sd1", "sdxl")
ATTENTION_PROJECTIONS = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def random_factors(
    model: nn.Module, pattern: re.Pattern, rank: int, seed: int, scale: float = 0.3
) -> dict[str, Factors]:
    """Random LoRA factors for every Linear/Conv2d of ``model`` whose name matches
    ``pattern``, scaled so that ``B A x`` is about ``scale`` times ``x`` in size."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if not pattern.search(name):
            continue
        if isinstance(module, nn.Linear):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
        elif isinstance(module, nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
        else:
            continue
        factors[name] = Factors(down * scale / down[0].numel() ** 0.5, up * scale / rank**0.5)
    return factors


def _text_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=hidden,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def _scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
        timestep_spacing="leading",
    )


def tiny_sd_unet(cross_attention_dim: int = 32, **overrides) -> UNet2DConditionModel:
    """A two-level SD1.x-shaped UNet (cross-attention in both levels); ``overrides``
    reshape it (the tiny SDXL UNet is one)."""
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A random SD1.x (``"sd1"``) or SDXL (``"sdxl"``) diffusers pipeline, fp32 on CPU."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}: choose one of {TINY_FAMILIES}")
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    if family == "sd1":
        unet = tiny_sd_unet()
        vae = _vae()
        text_encoder = CLIPTextModel(_text_config(32))
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    unet = tiny_sd_unet(
        cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(32))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=False,
    )


RANDOM_LORAS = (("character", "zq creature"), ("style", "zq style"), ("background", "zq place"))


def write_random_loras(pipeline, folder: Path) -> list[Path]:
    """Three random LoRAs for a tiny pipeline's UNet attention (character, style,
    background), as diffusers-format safetensors with sidecar category and triggers:
    something to compose in the studio before the trained demo world ships."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (category, trigger) in enumerate(RANDOM_LORAS):
        factors = random_factors(pipeline.unet, ATTENTION_PROJECTIONS, rank=4, seed=100 + seed)
        state = {
            f"unet.{module}.lora_{ab}.weight": tensor.contiguous()
            for module, f in factors.items()
            for ab, tensor in (("A", f.down), ("B", f.up))
        }
        path = folder / f"random-{category}.safetensors"
        save_file(state, str(path))
        path.with_suffix(".json").write_text(json.dumps({"category": category, "triggers": [trigger]}))
        paths.append(path)
    return paths
