"""Patch-weighted composite (after LoRAtorio, 2025): each LoRA leads where it matters.

One batched pass predicts the base model's noise (no LoRA) and each LoRA's alone. In
every latent patch (``patch`` x ``patch`` pixels) LoRA ``j`` gets the weight
``softmax_j((1 - cos(c_j, c_base)) / temperature)``: a LoRA whose conditional
prediction departs from the base model's in a patch is the one drawing there. With
``top_k`` only the k heaviest LoRAs of each patch keep weight. The unconditional and
conditional predictions are combined with the same weights and guidance is re-centred
on the composed pair, ``eps = u* + g (c* - u*)``; uniform weights (an infinite
temperature) give LoRA Composite exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import BaseAndEachLoRA, guided_mix, keep_top_k, tempered_softmax


@dataclass
class PatchComposite(BaseAndEachLoRA):
    """See the module docstring; ``temperature`` is in units of cosine distance."""

    name = "patch"
    temperature: float = 0.05
    patch: int = 2
    top_k: int | None = None

    def patch_weights(self, base: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``(N, B, 1, H, W)`` weights from the base ``(B, C, H, W)`` and LoRA ``(N, B, C, H, W)``
        conditional predictions."""
        n, b, c, h, w = cond.shape
        rows, cols = h // self.patch, w // self.patch
        lora_patches = F.unfold(cond.reshape(n * b, c, h, w), self.patch, stride=self.patch)
        lora_patches = lora_patches.reshape(n, b, -1, rows * cols)
        base_patches = F.unfold(base, self.patch, stride=self.patch)[None]
        distance = 1 - F.cosine_similarity(lora_patches, base_patches, dim=2)
        weights = keep_top_k(tempered_softmax(distance, self.temperature), self.top_k)
        grid = weights.reshape(n * b, 1, rows, cols)
        return F.interpolate(grid, size=(h, w), mode="nearest").reshape(n, b, 1, h, w)

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        mix = self.patch_weights(cond[0], cond[1:])
        return guided_mix(mix, None if uncond is None else uncond[1:], cond[1:], guidance_scale)
