"""LoRA Block Weight: per-block LoRA weights in the convention A1111 users know.

A vector gives one weight per block of the UNet in the original (LDM) numbering: BASE
(the text encoders), IN00..IN11 (input blocks), M00 (middle), OUT00..OUT11 (output
blocks). SD1.x vectors have 17 values (the blocks with attention) or 26 (all); SDXL
vectors 12 or 20. Blocks a short vector does not list get 0, as in the A1111 extension.
Presets name common vectors (``INALL``, ``OUTD`` ...); the SD1.x ones are the
extension's, the SDXL ones cover the same regions (shallow/deep input, middle,
deep/shallow output) of SDXL's attention blocks.
"""

from __future__ import annotations

import re

import torch

SD1_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SD1_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
SDXL_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
LAYOUTS = {17: SD1_17, 26: SD1_26, 12: SDXL_12, 20: SDXL_20}

PRESETS_SD1 = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
PRESETS_SDXL = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 12),
}

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(?:(?:attentions|resnets)\.(\d+)|downsamplers)")
_UP = re.compile(r"^up_blocks\.(\d+)\.(?:(?:attentions|resnets)\.(\d+)|upsamplers)")


def block_of(module: str) -> str | None:
    """The LDM block ID of a diffusers UNet module name (``None`` outside the blocks)."""
    if module.startswith("conv_in"):
        return "IN00"
    if module.startswith("mid_block"):
        return "M00"
    if match := _DOWN.match(module):
        level, index = int(match[1]), match[2]
        return f"IN{1 + 3 * level + int(index) if index is not None else 3 + 3 * level:02d}"
    if match := _UP.match(module):
        level, index = int(match[1]), match[2]
        return f"OUT{3 * level + (int(index) if index is not None else 2):02d}"
    return None


def parse_block_weights(spec: str, sdxl: bool) -> dict[str, float]:
    """A preset name or comma-separated vector → ``{block ID: weight}``."""
    presets = PRESETS_SDXL if sdxl else PRESETS_SD1
    text = presets.get(spec.strip().upper(), spec)
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"block weights {spec!r}: a preset ({', '.join(presets)}) or comma-separated numbers"
        ) from None
    layouts = (12, 20) if sdxl else (17, 26)
    if len(values) not in layouts:
        family = "SDXL" if sdxl else "SD1.x/SD2.x"
        raise ValueError(
            f"block weights {spec!r}: {family} takes {layouts[0]} or {layouts[1]} values, got {len(values)}"
        )
    ids = LAYOUTS[len(values)]
    return dict(zip(ids, values, strict=True))


def layer_table(layers: list[str], specs: list[str | None], sdxl: bool) -> torch.Tensor:
    """``(L, N)`` multipliers: layer ``l``'s weight for LoRA ``j`` under ``specs[j]``
    (``None`` = 1 everywhere). Layers outside the numbered blocks keep 1."""
    table = torch.ones(len(layers), len(specs))
    for j, spec in enumerate(specs):
        if spec is None:
            continue
        weights = parse_block_weights(spec, sdxl)
        for i, layer in enumerate(layers):
            block = block_of(layer)
            if block is not None:
                table[i, j] = weights.get(block, 0.0)
    return table


def text_multipliers(specs: list[str | None], sdxl: bool) -> torch.Tensor:
    """``(N,)`` BASE weights: each LoRA's text-encoder multiplier."""
    return torch.tensor([1.0 if s is None else parse_block_weights(s, sdxl)["BASE"] for s in specs])
