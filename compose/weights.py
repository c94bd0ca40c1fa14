"""How a generation weights its LoRAs: per LoRA for the methods, per step for schedules
and steps windows, per layer for block weights, and once for the text encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_weights import layer_table, text_multipliers
from .prompts import LoRAUse, step_mask, weight_table


@dataclass
class WeightPlan:
    """How a generation weights its LoRAs: ``base`` ``(N,)`` for the methods, ``text``
    ``(N,)`` for the text encoders, and ``steps`` the factors the loop applies on top,
    ``(steps, N)`` for schedules or ``(steps, L, 1, N)`` with block weights (else ``None``)."""

    base: torch.Tensor
    text: torch.Tensor
    steps: torch.Tensor | None


def weight_plan(uses: list[LoRAUse], steps: int, lora_scale: float, layers: list[str], sdxl: bool) -> WeightPlan:
    """Constant weights for the methods, per-step/per-layer factors for the loop (schedules
    and steps windows act there), and the text encoders' weights: each LoRA's text weight,
    else its UNet weight, at the first step (the encoders run once, before the steps).
    ``layers``: the names of the UNet's LoRA layers, which block weights are read against."""
    raw = weight_table([use.weight for use in uses], steps)
    windows = [use.steps for use in uses]
    scheduled = any(isinstance(use.weight, str) for use in uses) or any(w is not None for w in windows)
    if any(w is not None for w in windows):
        raw = raw * step_mask(windows, steps)
    blocks = [use.blocks for use in uses]
    base = torch.full((len(uses),), lora_scale) if scheduled else raw[0] * lora_scale
    factors = raw if scheduled else None
    text = weight_table([use.weight if use.text is None else use.text for use in uses], 1)[0] * lora_scale
    if any(b is not None for b in blocks):
        per_layer = layer_table(layers, blocks, sdxl)[:, None, :]
        factors = (factors if factors is not None else torch.ones(steps, len(uses)))[:, None, None, :] * per_layer
        text = text * text_multipliers(blocks, sdxl)
    return WeightPlan(base, text, factors)
