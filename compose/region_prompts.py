"""Per-region prompts: inside a LoRA's region the picture attends to that region's own text.

One prompt for the whole picture makes every region read every concept's words: the
character's pixels attend to "hat" and "lamp" too. As the regional-prompter extension of
A1111 does in its attention mode, :class:`RegionPrompts` gives each region its own
cross-attention: forward hooks on every ``attn2`` run the layer again for each region's
text (its own key and value projections, the same query) and blend, at each latent
position, the regions' outputs by their masks, and the prompt's output where no region
is (or is only partly). Only the conditional rows change; the unconditional rows keep
the negative prompt.

While a region's text is attended to, the LoRAs acting on its key and value projections
(whose positions are that text's tokens) are that region's LoRA and the LoRAs of the
whole picture (styles, backgrounds), not the other regions' (``token_routes``).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Routes, WeightState

CLAUSES = "clauses"
"""``prompts="clauses"``: each region's text is its LoRA's clause of the prompt."""


def own_texts(prompts: dict[str, str] | str | None, loras: list, clause_texts: dict[str, str] | None = None,
              eligible: Collection[str] | None = None) -> dict[str, str]:  # fmt: skip
    """Each prompted LoRA's text (``prompts``: LoRA name -> text), its first trigger word
    put in front where the text has none, so that the LoRA still finds its concept; with
    ``prompts="clauses"``, each ``eligible`` LoRA's clause of the prompt (``clause_texts``,
    :meth:`compose.Composer.clause_texts`), so that "a klinko robot on the right" is what
    the robot's region reads."""
    if prompts == CLAUSES:
        return {name: text for name, text in (clause_texts or {}).items() if eligible is None or name in eligible}
    texts = {}
    for lora in loras:
        text = (prompts or {}).get(lora.name)
        if text is not None:
            triggers = [t for t in lora.triggers if t.lower() in text.lower()]
            texts[lora.name] = text if triggers or not lora.triggers else f"{lora.triggers[0]}, {text}"
    unknown = set(prompts or {}) - {lora.name for lora in loras}
    if unknown:
        raise ValueError(f"prompts name LoRAs that are not in the composition: {', '.join(sorted(unknown))}")
    return texts


class RegionPrompts:
    """A context manager over UNet calls of one branch. ``masks`` ``(B, K, H, W)``: the
    regions, per image, at latent resolution; ``texts`` ``K`` encodings ``(1, T_k, D)``;
    ``lora_on`` ``(K, N)``: which LoRAs act on region ``k``'s text tokens; ``state`` the
    UNet's :class:`~compose.layers.WeightState`. A call of ``2B`` rows is ``[uncond; cond]``,
    one of ``B`` rows all conditional."""

    def __init__(self, unet: nn.Module, state: WeightState, masks: torch.Tensor, texts: list[torch.Tensor],
                 lora_on: torch.Tensor) -> None:  # fmt: skip
        self.unet, self.state, self.masks, self.texts, self.lora_on = unet, state, masks, texts, lora_on
        total = masks.sum(1, keepdim=True)
        self.weights = torch.where(total > 1, masks / total.clamp_min(1e-12), masks)  # (B, K, H, W), sum <= 1
        self._handles: list = []
        self._pooled: dict[tuple[int, int], torch.Tensor] = {}

    def __enter__(self) -> RegionPrompts:
        for name, module in self.unet.named_modules():
            if name.endswith("attn2") and hasattr(module, "processor"):
                self._handles.append(module.register_forward_hook(self._blend, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _at(self, positions: int) -> torch.Tensor:
        """The region weights at a layer of ``positions`` latent positions: ``(B, K, P)``."""
        height, width = self.weights.shape[-2:]
        factor = math.sqrt(height * width / positions)
        size = (round(height / factor), round(width / factor))
        if size not in self._pooled:
            pooled = self.weights if size == (height, width) else F.adaptive_avg_pool2d(self.weights, size)
            self._pooled[size] = pooled.flatten(2)
        return self._pooled[size]

    def _blend(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        images, rows = self.masks.shape[0], hidden.shape[0]
        if rows not in (images, 2 * images):
            raise ValueError("per-region prompts need one branch per UNet call")
        cond = slice(rows - images, rows)
        weights = self._at(hidden.shape[1]).to(output)  # (B, K, P)
        blended = output[cond] * (1 - weights.sum(1))[..., None]
        state = self.state
        routes, lora_weights = state.routes, state.weights
        spatial = None if routes is None or routes.spatial is None else routes.spatial[cond]
        try:
            if lora_weights is not None and lora_weights.shape[-2] == rows:
                state.weights = lora_weights[..., cond, :]
            for k, text in enumerate(self.texts):
                state.routes = Routes(spatial, self.lora_on[k][:, None].expand(-1, text.shape[1]).to(output))
                region = module.processor(module, hidden[cond], encoder_hidden_states=text.expand(images, -1, -1))
                blended = blended + region * weights[:, k, :, None]
        finally:
            state.weights, state.routes = lora_weights, routes
        output = output.clone()
        output[cond] = blended
        return output


def check_prompts(method: str, prompts: object) -> None:
    """``prompts`` is a dict LoRA name -> text, ``"clauses"`` or ``None``."""
    if isinstance(prompts, str) and prompts != CLAUSES:
        raise ValueError(f"{method} prompts are a LoRA name -> text mapping or {CLAUSES!r}, got {prompts!r}")
