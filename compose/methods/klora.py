"""K-LoRA (Ouyang et al., CVPR 2025): per layer and step, the LoRA whose top-K mass dominates.

For a content LoRA ``c`` and a style LoRA ``s``, the released code compares in every
attention projection ``S_c = Σ topK |B_c A_c|`` with ``S_s`` and uses, in that layer,
content's update when ``S_c / γ > S_s · scale`` and style's otherwise (a tie goes to
style), where

- ``K = r_c · r_s``, the product of the two LoRAs' ranks in that layer;
- ``γ`` is the mean over modules of ``Σ|ΔW_c| / Σ|ΔW_s|``, taken again over the
  ratios below ``3×`` that first mean (outlier modules would otherwise set it);
- ``scale = α p + β`` ("s", the paper's rule, β 0.5) or ``(α p + β) mod α`` ("s*",
  the released script's default, β ``0.85 α``), ``p ∈ [0, 1)`` the progress through
  the generation: early steps favour content, late ones style.

The released code recomputes the top-K sums in every forward and advances ``p`` with a
global counter of layer calls. Here the sums are computed once per LoRA and layer
(cached on the LoRA) and the choices of every step are tabulated before the first UNet
pass, so a step costs a single LoRA. ``progress="step"`` takes ``p = step / steps``,
one value per step; ``progress="calls"`` takes the released counter, sized to the step
count: the ``c``-th K-LoRA layer call (0-based, in the order the UNet runs them) of step
``i`` sees ``p = ((i C + c + 1) mod (steps C)) / (steps C)`` for ``C`` such layers,
drifting within a step. Learning that order costs one extra UNet pass per generation.

**N LoRAs.** Each LoRA has a role, content or style (default: category ``style`` is
style, every other category content). In each layer every LoRA scores
``S_j / γ_j × (scale if style else 1)``, with ``γ_j`` the (filtered) mean of
``Σ|ΔW_j| / Σ|ΔW_ref|`` against a reference LoRA (the first style LoRA, else the first
LoRA) and ``K = (Π_j r_j)^(2/n)`` over the ``n`` LoRAs of the layer, rounded (``r_c r_s``
for two); the highest score wins the layer. With one content and one style LoRA this
is the released rule, ``γ`` taken over the UNet modules both LoRAs target (the released
code takes every module of both files). Defaults: "s" and ``progress="step"``.

``reference=True`` reproduces the released code (``utils.py``, ``klora.py``,
``inference_sd.py`` of HVision-NKU/K-LoRA) in everything it fixes: ``K = r_c r_s``, the
``3×`` filter, "s*" with ``β = 0.85 α``, the layer-call counter, LoRAs only on the UNet's
attention projections (the text encoder and every other layer without LoRA, though
``γ`` is measured over every module of the files, text encoder included) and, unless
a ``lora_scale`` is given, LoRA weight 1 (:mod:`compose.methods.references`). As the
released code, it composes exactly one content and one style LoRA and refuses any other
set (:meth:`KLoRA.cannot_compose`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiled import eager
from ..layers import Factors
from ..loading import LoRA
from .base import CompositionMethod, MethodContext, UNetRun, fix_reference

ROLES = ("content", "style")
SCALES = ("s", "s*")
PROGRESS = ("step", "calls")
ATTENTION = re.compile(r"attn\d\.(to_q|to_k|to_v|to_out\.0)$")
"""The modules the released code puts K-LoRA layers on (``unet.attn_processors``)."""
REFERENCE = {"top_k": None, "gamma_filter": 3.0, "scale": "s*", "progress": "calls", "alpha": 1.5}


def topk_mass(factors: Factors, k: int) -> tuple[float, float]:
    """``(Σ of the k largest |B A|, Σ |B A|)`` for one module (conv kernels flattened)."""
    delta = (factors.up.flatten(1).float() @ factors.down.flatten(1).float()).abs().flatten()
    return delta.topk(min(k, delta.numel())).values.sum().item(), delta.sum().item()


def filtered_mean(ratios: torch.Tensor, factor: float | None) -> float:
    """The mean of ``ratios``, taken again over those below ``factor ×`` that mean (the
    released ``get_ratio_between_content_and_style``); the plain mean for ``None``."""
    mean = ratios.mean()
    if factor is None:
        return mean.item()
    kept = ratios[ratios < factor * mean]
    return kept.mean().item() if kept.numel() else math.inf


@dataclass
class KLoRA(CompositionMethod):
    """K-LoRA; see the module docstring. ``roles`` maps LoRA names to ``"content"`` /
    ``"style"`` where the category-based default is not wanted. Unset (``None``):
    ``top_k`` is the rank product, ``beta`` 0.5 for "s" and ``0.85 α`` for "s*", ``scale``
    "s", ``progress`` "step"; ``gamma_filter=None`` takes a plain mean."""

    name = "klora"
    alpha: float = 1.5
    beta: float | None = None
    top_k: int | None = None
    scale: str | None = None
    gamma_filter: float | None = 3.0
    progress: str | None = None
    roles: dict[str, str] | None = None
    reference: bool = False

    def __post_init__(self) -> None:
        if self.reference:
            fix_reference(self, REFERENCE)
        self.scale = self.scale or "s"
        self.progress = self.progress or "step"
        if self.scale not in SCALES:
            raise ValueError(f"K-LoRA scale must be one of {SCALES}, got {self.scale!r}")
        if self.progress not in PROGRESS:
            raise ValueError(f"K-LoRA progress must be one of {PROGRESS}, got {self.progress!r}")
        default_beta = 0.85 * self.alpha if self.scale == "s*" else 0.5
        if self.reference and self.beta is not None and self.beta != default_beta:
            raise ValueError(f"K-LoRA reference=True fixes beta to 0.85 alpha = {default_beta:g}, got {self.beta!r}")
        self.beta = default_beta if self.beta is None else self.beta

    @property
    def text_encoder_loras(self) -> bool:
        return not self.reference

    def cannot_compose(self, loras: list[tuple[str, str | None]]) -> str | None:
        """The released code composes exactly one content and one style LoRA; with any
        other set, ``reference=True`` would be K-LoRA's N-LoRA rule under the reference's
        name."""
        if not self.reference:
            return None
        roles = [self.role_of(name, category) for name, category in loras]
        if sorted(roles) == ["content", "style"]:
            return None
        given = ", ".join(f"{name}: {role}" for (name, _), role in zip(loras, roles, strict=True)) or "none"
        return (f"K-LoRA reference=True composes exactly one content and one style LoRA, as the released code "
                f"does; got {len(loras)} ({given}): leave reference out for K-LoRA's rule for any N LoRAs, "
                "or set the roles (roles=, --role NAME=style)")  # fmt: skip

    def role(self, lora: LoRA) -> str:
        return self.role_of(lora.name, lora.category)

    def role_of(self, name: str, category: str | None) -> str:
        """``content`` or ``style``: from ``roles``, else style for the style category."""
        role = (self.roles or {}).get(name) or ("style" if category == "style" else "content")
        if role not in ROLES:
            raise ValueError(f"K-LoRA role of {name!r} must be one of {ROLES}, got {role!r}")
        return role

    def layer_k(self, factors: list[Factors]) -> int:
        """K for one layer from the factors of the LoRAs that target it."""
        if self.top_k is not None:
            return self.top_k
        return round(math.prod(f.rank for f in factors) ** (2 / len(factors)))

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        layers, loras = context.layers, context.loras
        refusal = self.cannot_compose([(lora.name, lora.category) for lora in loras])
        if refusal:
            raise ValueError(refusal)
        tables = [lora.factors.get("unet", {}) for lora in loras]
        present = torch.tensor([[layer in table for table in tables] for layer in layers], dtype=torch.bool)
        if self.reference:
            present &= torch.tensor([bool(ATTENTION.search(layer)) for layer in layers])[:, None]
        mass = torch.zeros(len(layers), len(loras), dtype=torch.float64)
        for i, layer in enumerate(layers):
            chosen = present[i].nonzero().flatten().tolist()
            if not chosen:
                continue
            k = self.layer_k([tables[j][layer] for j in chosen])
            for j in chosen:
                key = ("klora-topk", k, layer)
                if key not in loras[j].derived:
                    loras[j].derived[key] = topk_mass(tables[j][layer], k)
                mass[i, j] = loras[j].derived[key][0]
        self.is_style = torch.tensor([self.role(lora) == "style" for lora in loras])
        ref = int(self.is_style.nonzero()[0]) if self.is_style.any() else 0
        self.gamma = torch.tensor([self.ratio(lora, loras[ref]) for lora in loras], dtype=torch.float64)
        self.mass, self.present = mass, present
        self.table: torch.Tensor | None = None
        if self.progress == "step":
            steps = torch.arange(context.num_steps, dtype=torch.float64)
            self.table = self.tabulate(steps[:, None].expand(-1, len(layers)), context.num_steps)

    def ratio(self, lora: LoRA, ref: LoRA) -> float:
        """``γ`` of ``lora`` against ``ref``: over the UNet modules both target, or, for the
        reference, over every module of both files (text encoders included)."""
        components = sorted(set(lora.factors) & set(ref.factors)) if self.reference else ["unet"]
        ratios = []
        for component in components:
            mine, theirs = lora.factors.get(component, {}), ref.factors.get(component, {})
            for module in sorted(set(mine) & set(theirs)):
                total_ref = self.total(ref, component, module, theirs[module])
                if total_ref > 0:
                    ratios.append(self.total(lora, component, module, mine[module]) / total_ref)
        return filtered_mean(torch.tensor(ratios, dtype=torch.float64), self.gamma_filter) if ratios else 1.0

    @staticmethod
    def total(lora: LoRA, component: str, module: str, factors: Factors) -> float:
        """``Σ |B A|`` of one module, cached on the LoRA."""
        key = ("klora-total", component, module)
        if key not in lora.derived:
            lora.derived[key] = topk_mass(factors, 1)[1]
        return lora.derived[key]

    def style_scale(self, count: torch.Tensor, total: int) -> torch.Tensor:
        """The style LoRAs' factor at progress ``count / total`` (float64, in the released
        code's order of operations, so that "s*"'s modulo falls where it does there)."""
        scale = self.alpha * count / total + self.beta
        return scale % self.alpha if self.scale == "s*" else scale

    def scores(self, count: torch.Tensor, total: int) -> torch.Tensor:
        """``(L, N)`` scores, layer ``l`` at progress ``count[l] / total``; ``-inf`` where a
        LoRA has no K-LoRA layer."""
        bias = torch.where(self.is_style, self.style_scale(count, total)[:, None], 1.0)
        scores = self.mass / self.gamma * bias
        return scores.masked_fill(~self.present, float("-inf"))

    def choose(self, count: torch.Tensor, total: int) -> torch.Tensor:
        """The winning LoRA of every layer, ``(L,)``; ties go to a style LoRA, as content
        must exceed style in the released rule."""
        order = torch.argsort((~self.is_style).to(torch.int8), stable=True)
        return order[self.scores(count, total)[:, order].argmax(dim=1)]

    def tabulate(self, count: torch.Tensor, total: int) -> torch.Tensor:
        """``(steps, L, N)`` weights from ``count`` ``(steps, L)``, each layer's progress
        numerator at each step over ``total``."""
        self.choices = torch.stack([self.choose(row, total) for row in count])
        onehot = F.one_hot(self.choices, len(self.context.loras)) * self.present
        return onehot.to(self.context.weights) * self.context.weights

    def call_counts(self, run: UNetRun) -> tuple[torch.Tensor, int]:
        """The released counter for every step and layer, ``((steps, L), steps C)``, from
        one traced UNet pass that records the order of the K-LoRA layer calls."""
        calls: list[int] = []
        unet, layers = self.context.unet, self.context.layers
        used = self.present.any(dim=1).nonzero().flatten().tolist()
        hooks = [unet.get_submodule(layers[i]).register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i in used]
        try:
            with eager(unet):
                run(torch.zeros(len(layers), 1, len(self.context.loras)).to(self.context.weights))
        finally:
            for hook in hooks:
                hook.remove()
        position = torch.zeros(len(layers), dtype=torch.float64)
        order = list(dict.fromkeys(calls))
        position[order] = torch.arange(len(order), dtype=torch.float64)
        per_step, steps = max(len(order), 1), self.context.num_steps
        step = torch.arange(steps, dtype=torch.float64)[:, None]
        return (step * per_step + position + 1) % (steps * per_step), steps * per_step

    def predict(self, step: int, run: UNetRun) -> torch.Tensor:
        if self.table is None:
            self.table = self.tabulate(*self.call_counts(run))
        return run(self.weights(step))

    def weights(self, step: int) -> torch.Tensor:
        return self.table[step][:, None, :]
