"""Regional composition: each LoRA confined to a region of the image.

Like Composite, LoRA ``j`` alone predicts ``(uncond_j, cond_j)``; the predictions are
then blended spatially, each LoRA weighted by its region's mask (normalised where
regions overlap; where no region reaches, every LoRA counts equally), so that two
characters can stand side by side. A region is a box ``[x0, y0, x1, y1]`` in fractions
of the image or the path of a mask image (white = inside); a LoRA without a region
covers the whole image, so full regions for every LoRA give LoRA Composite exactly.

With ``prompts`` (LoRA name -> text, or ``"clauses"``: each LoRA's clause of the
prompt), a LoRA's region attends to its own text instead of the prompt, in every branch
(:mod:`compose.region_prompts`, as in A1111's regional prompter): "a zorbo creature,
tall" on the left, "a klinko robot" on the right. The branches then run one per UNet
call, as the per-region attention needs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..region_prompts import CLAUSES, RegionPrompts, check_prompts, own_texts
from .base import CompositionMethod, MethodContext, UNetRun, guided_mix

Region = list[float] | str


def region_mask(region: Region | None, height: int, width: int) -> torch.Tensor:
    """``(height, width)`` mask in [0, 1] at latent resolution."""
    if region is None:
        return torch.ones(height, width)
    if isinstance(region, str):
        grey = read_mask(region)
        return F.interpolate(grey[None, None] / 255, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    if len(region) != 4 or not 0 <= region[0] < region[2] <= 1 or not 0 <= region[1] < region[3] <= 1:
        raise ValueError(f"a region box is [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {region}")
    mask = torch.zeros(height, width)
    x0, y0, x1, y1 = region
    mask[round(y0 * height) : max(round(y1 * height), round(y0 * height) + 1),
         round(x0 * width) : max(round(x1 * width), round(x0 * width) + 1)] = 1  # fmt: skip
    return mask


def read_mask(path: str) -> torch.Tensor:
    """A mask image's grey levels ``(H, W)`` in [0, 255]. The file is opened without
    blocking and must be a regular file that PIL reads as an image: a FIFO would otherwise
    hang the model (and every user queued behind it), ``/etc/passwd`` fail deep in PIL.
    Every refusal is a ``ValueError`` naming the path."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ValueError(f"region mask {path}: cannot be opened ({error.strerror or error})") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise ValueError(f"region mask {path}: is not a regular file (a folder, FIFO, device or socket); a mask "
                         "is an image file, white where the LoRA acts")  # fmt: skip
    with open(handle, "rb") as file:
        try:
            with Image.open(file) as image:
                grey = np.asarray(image.convert("L"), dtype=np.float32)
        except UnidentifiedImageError:
            raise ValueError(f"region mask {path}: is not an image (PNG, JPEG, ...) that compose can read") from None
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"region mask {path}: cannot be read as an image ({error})") from None
    return torch.from_numpy(grey.copy())


def check_boxes(regions: object) -> dict[str, list[float]]:
    """A request's regions as boxes only: a mapping of LoRA names to ``[x0, y0, x1, y1]``.
    Where the request comes from a visitor (the studio's API), a region given as text
    would be a path on the server, which compose never opens on a visitor's word (a mask
    is uploaded, and the server keeps the file)."""
    if regions is None:
        return {}
    if not isinstance(regions, Mapping):
        raise ValueError(f"regions must map LoRA names to boxes [x0, y0, x1, y1], got {type(regions).__name__}")
    boxes = {}
    for name, box in regions.items():
        if isinstance(box, str):
            raise ValueError(f"the region of {name!r} is a box [x0, y0, x1, y1] of fractions; a mask is uploaded "
                             "(set_region with mask=...), never named by a path on the server")  # fmt: skip
        numbers = box if isinstance(box, (list, tuple)) else []
        if len(numbers) != 4 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in numbers):
            raise ValueError(f"the region of {name!r} must be a box of four numbers [x0, y0, x1, y1], got {box!r}")
        boxes[str(name)] = [float(v) for v in numbers]
        region_mask(boxes[str(name)], 8, 8)
    return boxes


@dataclass
class Regional(CompositionMethod):
    """``regions`` maps LoRA names to boxes or mask files, ``prompts`` LoRA names (with a
    region) to their region's own text; see the module docstring."""

    name = "regional"
    regions: dict[str, Region] | None = None
    prompts: dict[str, str] | str | None = None

    def __post_init__(self) -> None:
        check_prompts(self.name, self.prompts)

    @property
    def needs_tokens(self) -> bool:
        return self.prompts == CLAUSES

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        names = {lora.name for lora in context.loras}
        unknown = set(self.regions or {}) - names
        if unknown:
            raise ValueError(f"regions name LoRAs that are not in the composition: {', '.join(sorted(unknown))}")
        whole = sorted(set(context.region_states or {}) - set(self.regions or {}))
        if whole:
            raise ValueError(f"a per-LoRA prompt is for a LoRA with a region; give {', '.join(whole)} a region, "
                             "or put its words in the prompt")  # fmt: skip
        self.masks: torch.Tensor | None = None
        self.region_prompts = self._region_prompts(context) if context.region_states else None

    def _region_prompts(self, context: MethodContext) -> RegionPrompts:
        """The prompted regions' own cross-attention, built once per generation: their masks
        ``(B, K, h, w)`` at latent size, each region's text read by every LoRA."""
        height, width = context.latent_size
        states = context.region_states
        masks = torch.stack([region_mask(self.regions[name], height, width) for name in states])
        masks = masks[None].expand(context.images, -1, -1, -1).to(context.weights)
        lora_on = torch.ones(len(states), len(context.loras)).to(context.weights)
        return RegionPrompts(context.unet, context.state, masks, list(states.values()), lora_on)

    def region_texts(self, context: MethodContext) -> dict[str, str]:
        return own_texts(self.prompts, context.loras, context.clause_texts, set(self.regions or {}))

    def predict(self, step: int, run: UNetRun) -> torch.Tensor:
        """One call for every branch; with per-LoRA prompts, one call per branch, each with
        the prompted regions attending to their texts."""
        branches = self.weights(step)
        if self.region_prompts is None:
            return run(branches)
        outputs = []
        for g in range(branches.shape[0]):
            with self.region_prompts:
                outputs.append(run(branches[g : g + 1]))
        return torch.cat(outputs)

    def weights(self, step: int) -> torch.Tensor:
        return torch.diag(self.context.weights)

    def mix(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 1, H, W)`` blending weights, summing to 1 at every pixel."""
        if self.masks is None or self.masks.shape[-2:] != (height, width):
            masks = torch.stack([region_mask((self.regions or {}).get(lora.name), height, width)
                                 for lora in self.context.loras])  # fmt: skip
            total = masks.sum(0, keepdim=True)
            masks = torch.where(total > 0, masks / total.clamp_min(1e-8), 1 / len(masks))
            self.masks = masks[:, None, None].to(like)
        return self.masks

    def lora_masks(self) -> torch.Tensor | None:
        return None if self.masks is None else self.masks[:, 0, 0][None]

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        return guided_mix(self.mix(cond.shape[-2], cond.shape[-1], cond), uncond, cond, guidance_scale)
