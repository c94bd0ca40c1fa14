"""K-LoRA (Ouyang et al., CVPR 2025): per layer and step, the LoRA whose top-K mass dominates.

For a content LoRA ``c`` and a style LoRA ``s``, the reference compares in every
attention projection ``S_c = Σ topK |B_c A_c|`` with ``S_s`` and uses, in that layer,
content's update when ``(S_c / γ) > S_s (α p + β)`` and style's otherwise, where
``γ = mean over layers of Σ|ΔW_c| / Σ|ΔW_s|`` and ``p ∈ [0, 1)`` is the progress
through the generation: early steps favour content, late ones style.

The reference recomputes the top-K sums in every forward and advances ``p`` with a
global counter of layer calls that assumes one step count. Here the sums are computed
once per LoRA and layer (cached on the LoRA), ``p = step / steps``, and the choices of
every step are tabulated when the generation starts: a step costs a single LoRA.

**N LoRAs.** Each LoRA has a role, content or style (default: its category ``style``
is style, every other category content). In each layer every LoRA gets the score
``S_j / γ_j × (α p + β if style else 1)`` with ``γ_j`` the mean over layers of
``Σ|ΔW_j| / Σ|ΔW_ref|`` against a reference LoRA (the first style LoRA, else the first
LoRA); the highest score wins the layer. With one content and one style LoRA this is
exactly the reference rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers import Factors
from ..loading import LoRA
from .base import CompositionMethod, MethodContext

ROLES = ("content", "style")


def topk_mass(factors: Factors, k: int) -> tuple[float, float]:
    """``(Σ of the k largest |B A|, Σ |B A|)`` for one module (conv kernels flattened)."""
    delta = (factors.up.flatten(1).float() @ factors.down.flatten(1).float()).abs().flatten()
    return delta.topk(min(k, delta.numel())).values.sum().item(), delta.sum().item()


@dataclass
class KLoRA(CompositionMethod):
    """K-LoRA; ``roles`` maps LoRA names to ``"content"``/``"style"`` where the
    category-based default is not wanted."""

    name = "klora"
    alpha: float = 1.5
    beta: float = 0.5
    top_k: int = 64
    roles: dict[str, str] | None = None

    def role(self, lora: LoRA) -> str:
        role = (self.roles or {}).get(lora.name) or ("style" if lora.category == "style" else "content")
        if role not in ROLES:
            raise ValueError(f"K-LoRA role of {lora.name!r} must be one of {ROLES}, got {role!r}")
        return role

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        layers, loras = context.layers, context.loras
        mass = torch.zeros(len(layers), len(loras))
        total = torch.zeros(len(layers), len(loras))
        present = torch.zeros(len(layers), len(loras), dtype=torch.bool)
        for j, lora in enumerate(loras):
            table = lora.factors.get("unet", {})
            for i, layer in enumerate(layers):
                if layer not in table:
                    continue
                key = ("klora-topk", self.top_k, layer)
                if key not in lora.derived:
                    lora.derived[key] = topk_mass(table[layer], self.top_k)
                mass[i, j], total[i, j] = lora.derived[key]
                present[i, j] = True
        self.is_style = torch.tensor([self.role(lora) == "style" for lora in loras])
        ref = int(self.is_style.nonzero()[0]) if self.is_style.any() else 0
        self.gamma = torch.ones(len(loras))
        for j in range(len(loras)):
            shared = present[:, j] & present[:, ref] & (total[:, ref] > 0)
            if shared.any():
                self.gamma[j] = (total[shared, j] / total[shared, ref]).mean()
        self.mass, self.present = mass, present
        steps = context.num_steps
        self.choices = torch.stack([self.choose(i / steps) for i in range(steps)])
        onehot = F.one_hot(self.choices, len(loras)) * present
        self.table = onehot.to(context.weights) * context.weights

    def scores(self, progress: float) -> torch.Tensor:
        """``(L, N)`` scores at progress ``p``; ``-inf`` where a LoRA misses the layer."""
        bias = torch.where(self.is_style, self.alpha * progress + self.beta, 1.0)
        scores = self.mass / self.gamma * bias
        return scores.masked_fill(~self.present, float("-inf"))

    def choose(self, progress: float) -> torch.Tensor:
        """The winning LoRA of every layer, ``(L,)``."""
        return self.scores(progress).argmax(dim=1)

    def weights(self, step: int) -> torch.Tensor:
        return self.table[step][:, None, :]
