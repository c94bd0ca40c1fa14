"""Where the picture looks at chosen words: cross-attention maps read with forward hooks.

For a set of token groups (each LoRA's trigger words in the prompt), :class:`AttentionProbe`
records, in every cross-attention layer of the UNet, the attention probability that each
latent position gives to each group's tokens (summed over the group, averaged over the
heads), and averages the layers at the latent's resolution. It hooks the query and key
projections and recomputes ``softmax(q kᵀ · scale)`` in float32 beside the layer, so the
layer's own output is untouched (a probed step is the unprobed step, bit for bit) and the
maps are the same whichever processor computes the attention: diffusers' classic
``AttnProcessor``, which materialises the probabilities, or ``AttnProcessor2_0`` on
PyTorch's scaled-dot-product attention, which never does. Fused projections
(``fuse_qkv_projections``) bypass the hooked ones and are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionProbe:
    """A context manager over one or more UNet calls; :meth:`maps` gives what it saw.

    ``groups``: for each group, its token positions in the encoder sequence. Only layers
    whose input is the text encoding (``attn2``) are read."""

    def __init__(self, unet: nn.Module, groups: list[list[int]]) -> None:
        self.unet = unet
        self.groups = groups
        self.total: torch.Tensor | None = None
        self.count = 0
        self._handles: list = []
        self._layers: list[torch.Tensor] = []

    def __enter__(self) -> AttentionProbe:
        layers = {name: module for name, module in self.unet.named_modules()
                  if name.endswith("attn2") and hasattr(module, "to_q") and hasattr(module, "heads")}  # fmt: skip
        fused = [name for name, module in layers.items() if getattr(module, "fused_projections", False)]
        if fused:
            raise ValueError(f"{fused[0]} runs fused query/key/value projections, which the attention maps cannot "
                             "read: call unet.unfuse_qkv_projections() first")  # fmt: skip
        for module in layers.values():
            self._hook(module)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, attention: nn.Module) -> None:
        slot: dict[str, torch.Tensor] = {}

        def keep(key: str):
            def hook(module, args, output):
                slot[key] = output

            return hook

        def read(module, args, output):
            if "q" in slot and "k" in slot:
                self._add(slot.pop("q"), slot.pop("k"), module.heads, module.scale)

        self._handles += [
            attention.to_q.register_forward_hook(keep("q")),
            attention.to_k.register_forward_hook(keep("k")),
            attention.register_forward_hook(read),
        ]

    def _add(self, query: torch.Tensor, key: torch.Tensor, heads: int, scale: float) -> None:
        """One layer's maps: ``query`` ``(rows, P, C)`` over ``P`` latent positions, ``key``
        ``(rows, T, C)`` over the text tokens."""
        rows, positions, channels = query.shape
        q = query.float().view(rows, positions, heads, -1).transpose(1, 2)
        k = key.float().view(rows, key.shape[1], heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(1)  # (rows, P, T)
        maps = torch.stack([probs[..., group].sum(-1) for group in self.groups], 1)  # (rows, K, P)
        self._layers.append(maps)

    def step(self, latent: tuple[int, int]) -> None:
        """Close one UNet call: average its layers at the ``latent`` size ``(H, W)``."""
        if not self._layers:
            return
        height, width = latent
        resized = []
        for maps in self._layers:
            factor = math.sqrt(height * width / maps.shape[-1])
            size = (round(height / factor), round(width / factor))
            grid = maps.view(*maps.shape[:2], *size)
            resized.append(F.interpolate(grid, size=latent, mode="bilinear", align_corners=False))
        mean = torch.stack(resized).mean(0)
        self.total = mean if self.total is None else self.total + mean
        self.count += 1
        self._layers.clear()

    def maps(self) -> torch.Tensor | None:
        """``(rows, K, H, W)``: the mean over the probed calls and layers, or ``None``."""
        return None if self.total is None else self.total / self.count
