"""Merge: every LoRA active in every step, summed with its weight (diffusers ``set_adapters``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompositionMethod


@dataclass
class Merge(CompositionMethod):
    """One UNet pass per step with ``y = W x + sum_i w_i B_i A_i x``."""

    name = "merge"

    def weights(self, step: int) -> torch.Tensor:
        return self.context.weights[None, :]
