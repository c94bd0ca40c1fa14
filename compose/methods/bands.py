"""Frequency-band fusion (after MultLFG, Roy et al. 2025): each LoRA leads in the bands it draws.

One batched pass predicts the base model's noise (no LoRA) and each LoRA's alone. Each
LoRA's departure from the base, ``d_j = c_j − c_base``, is split by an orthonormal Haar
wavelet transform of ``levels`` levels into subbands (the coarse approximation, then
horizontal, vertical and diagonal detail per level). In subband ``b`` LoRA ``j`` gets
the weight ``e_jb^(1/temperature) / Σ_k e_kb^(1/temperature)``, where ``e_jb`` is the
mean energy of ``d_j`` in that band: the LoRA that changes a band most leads it. With
``top_k`` only the k heaviest LoRAs of a band keep weight. The energies are measured
anew at every step, so the weights follow the timestep: coarse bands decide early,
detail bands late, as the paper observes. Each band of the unconditional and the
conditional predictions is mixed with its weights, the transform is inverted, and
guidance is applied to the composed pair. The transform is linear and orthonormal, so
equal weights (``temperature=inf``) give LoRA Composite exactly.

The paper's code is not released; band weights from energy, and their form, are this
project's reading of "timestep and frequency subband adaptive fusion".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BaseAndEachLoRA, keep_top_k, tempered_softmax


def haar(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Orthonormal 2-D Haar transform over the last two axes: ``[approximation, (LH, HL,
    HH) of the coarsest level, ..., of the finest]``, each band ``(..., H/2^l, W/2^l)``."""
    details: list[torch.Tensor] = []
    for _ in range(levels):
        a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
        c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
        details = [(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2] + details
        x = (a + b + c + d) / 2
    return [x, *details]


def inverse_haar(bands: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`haar`."""
    x, details = bands[0], bands[1:]
    for level in range(len(details) // 3):
        lh, hl, hh = details[3 * level : 3 * level + 3]
        a, b = (x + lh + hl + hh) / 2, (x - lh + hl - hh) / 2
        c, d = (x + lh - hl - hh) / 2, (x - lh - hl + hh) / 2
        top = torch.stack([a, b], dim=-1).flatten(-2)
        bottom = torch.stack([c, d], dim=-1).flatten(-2)
        x = torch.stack([top, bottom], dim=-2).flatten(-3, -2)
    return x


@dataclass
class BandFusion(BaseAndEachLoRA):
    """See the module docstring; ``levels`` is capped by what the latent size allows."""

    name = "bands"
    levels: int = 2
    temperature: float = 0.5
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.levels < 1 or self.temperature <= 0:
            raise ValueError("bands needs levels >= 1 and temperature > 0")

    def band_weights(self, departures: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per band, ``(N, B, 1, 1, 1)`` weights from the LoRAs' departures ``(N, B, C, h, w)``."""
        out = []
        for band in departures:
            energy = band.float().pow(2).mean(dim=(2, 3, 4))
            weights = keep_top_k(tempered_softmax(torch.log(energy + 1e-12), self.temperature), self.top_k)
            out.append(weights[:, :, None, None, None].to(band.dtype))
        return out

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        h, w = cond.shape[-2:]
        levels = self.levels
        while levels > 0 and (h % 2**levels or w % 2**levels):
            levels -= 1
        if levels == 0:
            raise ValueError(f"bands: a {h}x{w} latent cannot be split into frequency bands")
        weights = self.band_weights(haar(cond[1:] - cond[:1], levels))

        def fuse(pred: torch.Tensor) -> torch.Tensor:
            return inverse_haar([(m * band).sum(0) for m, band in zip(weights, haar(pred[1:], levels), strict=True)])

        c = fuse(cond)
        if uncond is None:
            return c
        u = fuse(uncond)
        return u + guidance_scale * (c - u)
