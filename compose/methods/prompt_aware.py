"""Prompt-aware weights (after W-Switch / W-Composite, Tsoumplekas et al. 2026).

Each LoRA's *importance* is how much its trigger words shape the prompt's encoding:
the mean over token positions of ``‖E(prompt) − E(prompt without LoRA j's triggers)‖``,
with the base text encoder (:meth:`compose.Composer.trigger_importance`). The
importances, raised to ``sharpness`` and normalised to sum 1, are the LoRAs' shares:

- W-Composite averages the LoRA branches with these shares instead of ``1/N``;
- W-Switch gives each LoRA that share of every rotation of ``tau · N`` steps (rounded by
  largest remainders, at least one step each) and hands the last ``hold`` fraction of the
  steps to the character LoRA (the first of category ``character``, else the most
  important), which fixes identity while details settle.

The paper gives the idea, not every formula; these are this project's choices. With
``sharpness=0`` (equal shares) and ``hold=0`` they are LoRA Composite and LoRA Switch
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MethodContext, guided_mix
from .composite import Composite
from .switch import Switch


def shares(importance: torch.Tensor, sharpness: float) -> torch.Tensor:
    """``importance ** sharpness`` normalised to sum 1; equal shares when all are zero."""
    powered = importance.clamp(min=0) ** sharpness if sharpness else torch.ones_like(importance)
    total = powered.sum()
    return powered / total if total > 0 else torch.full_like(importance, 1 / len(importance))


@dataclass
class WComposite(Composite):
    """LoRA Composite with importance-weighted branches."""

    name = "wcomposite"
    sharpness: float = 1.0

    @property
    def needs_importance(self) -> bool:
        return True

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        self.mix = shares(context.importance.to(context.weights), self.sharpness)

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        return guided_mix(self.mix.to(cond).view(-1, 1, 1, 1, 1), uncond, cond, guidance_scale)


@dataclass
class WSwitch(Switch):
    """LoRA Switch with importance-proportioned turns and the character held at the end."""

    name = "wswitch"
    sharpness: float = 1.0
    hold: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.hold <= 1:
            raise ValueError(f"wswitch hold is a fraction of the steps in [0, 1], got {self.hold}")

    @property
    def needs_importance(self) -> bool:
        return True

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        n = len(context.loras)
        share = shares(context.importance.float().cpu(), self.sharpness)
        total = self.tau * n
        exact = share * total
        turns = exact.floor().long().clamp(min=1)
        for j in torch.argsort(exact - exact.floor(), descending=True)[: max(0, total - int(turns.sum()))]:
            turns[j] += 1
        while turns.sum() > total:
            turns[int(turns.argmax())] -= 1
        self.rotation = [j for j in range(n) for _ in range(int(turns[j]))]
        characters = [j for j, lora in enumerate(context.loras) if lora.category == "character"]
        self.held = characters[0] if characters else int(share.argmax())
        self.hold_from = context.num_steps - round(self.hold * context.num_steps)

    def active(self, step: int) -> int:
        if step >= self.hold_from:
            return self.held
        shifted = max(step - 1, 0) if self.reference_offset else step
        return self.rotation[shifted % len(self.rotation)]
