"""LoRA Switch (Zhong et al. 2024): one LoRA active at a time, rotating every ``tau`` steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompositionMethod


@dataclass
class Switch(CompositionMethod):
    """At step ``i`` only LoRA ``(i // tau) % N`` (in load order) is active.

    The reference switches in a step-end callback when ``i > 0 and i % tau == 0``, so
    its first LoRA stays ``tau + 1`` steps and every later switch comes one step late;
    ``reference_offset=True`` reproduces that schedule exactly.
    """

    name = "switch"
    tau: int = 5
    reference_offset: bool = False

    def __post_init__(self) -> None:
        if self.tau < 1:
            raise ValueError(f"switch tau must be at least 1, got {self.tau}")

    def active(self, step: int) -> int:
        """Index of the LoRA active at ``step``."""
        shifted = max(step - 1, 0) if self.reference_offset else step
        return (shifted // self.tau) % len(self.context.loras)

    def weights(self, step: int) -> torch.Tensor:
        w = torch.zeros_like(self.context.weights)
        j = self.active(step)
        w[j] = self.context.weights[j]
        return w[None, :]
