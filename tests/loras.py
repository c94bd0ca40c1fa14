"""LoRA files made in the tests, in every format users have, for any tiny pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from compose.tiny import ATTENTION_PROJECTIONS, random_factors

TEXT_ATTENTION = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def lora_parts(
    pipe, seed: int, rank: int = 4, unet_pattern=ATTENTION_PROJECTIONS, text: bool = True
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Random ``(down, up)`` per module for the UNet and, optionally, the text encoders."""
    models = {"unet": (pipe.unet, unet_pattern)}
    if text:
        models["text_encoder"] = (pipe.text_encoder, TEXT_ATTENTION)
        if getattr(pipe, "text_encoder_2", None) is not None:
            models["text_encoder_2"] = (pipe.text_encoder_2, TEXT_ATTENTION)
    return {
        component: {m: (f.down, f.up) for m, f in random_factors(model, pattern, rank, seed + i).items()}
        for i, (component, (model, pattern)) in enumerate(models.items())
    }


def peft_state_dict(parts: dict) -> dict[str, torch.Tensor]:
    """diffusers/PEFT format: ``unet.<module>.lora_A.weight`` ..."""
    return {
        f"{component}.{module}.lora_{ab}.weight": t
        for component, table in parts.items()
        for module, (down, up) in table.items()
        for ab, t in (("A", down), ("B", up))
    }


def kohya_state_dict(parts: dict, alpha: float) -> dict[str, torch.Tensor]:
    """kohya format with ``alpha``; the stored factors are rescaled so that the
    effective update ``up (alpha/r) down`` equals the PEFT file's ``up down``."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    if "text_encoder_2" not in parts:
        prefixes["text_encoder"] = "lora_te_"
    out = {}
    for component, table in parts.items():
        for module, (down, up) in table.items():
            if component != "unet":
                module = "text_model." + module
            stem = prefixes[component] + module.replace(".", "_")
            rank = down.shape[0]
            out[f"{stem}.lora_down.weight"] = down * rank / alpha
            out[f"{stem}.lora_up.weight"] = up
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def attn_processor_state_dict(parts: dict) -> dict[str, torch.Tensor]:
    """The 2023 attention-processor format: UNet attention only, no prefix."""
    out = {}
    for module, (down, up) in parts["unet"].items():
        block, _, proj = module.rpartition(".attn")
        attn, _, kind = proj.partition(".")
        kind = "to_out" if kind == "to_out.0" else kind
        stem = f"{block}.attn{attn}.processor.{kind}_lora"
        out[f"{stem}.down.weight"] = down
        out[f"{stem}.up.weight"] = up
    return out


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_kohya_with_tags(path: Path, tensors: dict, tags: dict[str, int]) -> Path:
    return write(path, tensors, {"ss_tag_frequency": json.dumps({"img": tags})})
