"""LoRA Composite (Zhong et al. 2024): every LoRA guides every step.

Per step, LoRA ``j`` alone predicts ``(uncond_j, cond_j)``; the predictions are
averaged, ``u = mean_j uncond_j``, ``c = mean_j cond_j``, and guided,
``eps = u + g (c - u)``. The reference runs N batch-2 UNet passes; here branch ``j``
of one batch-2N pass carries LoRA ``j`` (one-hot weights), which is the same
computation in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompositionMethod


@dataclass
class Composite(CompositionMethod):
    """One branch per LoRA; the default :meth:`combine` averages them before guidance."""

    name = "composite"

    def weights(self, step: int) -> torch.Tensor:
        return torch.diag(self.context.weights)
