"""Pictures of where each LoRA acted: its region tinted over the image it made.

The methods that confine LoRAs to regions (``routed``, ``regional``) return their masks
(``Composer.generate(..., run=RunOptions(return_masks=True))``); :func:`mask_overlay`
draws them over the image for the studio and the benchmark's grids, one colour per LoRA
(:data:`PALETTE`, in the composition's order), so that a concept drawn outside its region
shows at a glance.
A LoRA that acted everywhere (a style) is not tinted; :func:`legend` says so.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
           (240, 50, 230), (128, 128, 0))  # fmt: skip
"""RGB colours of LoRAs 1, 2, ... (repeating)."""
TINT = 0.55
"""How much of a pixel a region's colour covers where its mask is 1."""


def _everywhere(mask: Image.Image) -> bool:
    return mask.getextrema()[0] == 255


def mask_overlay(image: Image.Image, masks: dict[str, Image.Image], size: int | None = None) -> Image.Image:
    """``image`` (enlarged to ``size`` px square without smoothing, if given), dimmed to grey,
    with each partial mask of ``masks`` (LoRA name -> greyscale image) tinted in its
    :data:`PALETTE` colour in proportion to the mask."""
    side = image.size if size is None else (size, size)
    grey = np.asarray(image.convert("L").resize(side, Image.Resampling.NEAREST), dtype=np.float32)
    out = np.repeat(grey[..., None] * 0.6 + 60, 3, axis=-1)
    for k, mask in enumerate(masks.values()):
        if _everywhere(mask):
            continue
        alpha = np.asarray(mask.resize(side, Image.Resampling.NEAREST), dtype=np.float32)[..., None] / 255 * TINT
        out = out * (1 - alpha) + np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32) * alpha
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), "RGB")


def legend(masks: dict[str, Image.Image]) -> list[tuple[str, tuple[int, int, int]]]:
    """``(text, colour)`` per LoRA of ``masks``: its name, and "everywhere" for one that acted
    on the whole picture (black, as it is not tinted)."""
    return [
        (f"{name} (everywhere)", (0, 0, 0)) if _everywhere(mask) else (name, PALETTE[k % len(PALETTE)])
        for k, (name, mask) in enumerate(masks.items())
    ]
