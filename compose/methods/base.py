"""The strategy interface every composition method implements.

Per denoising step a method says which LoRA weights each *branch* of the UNet batch
uses (:meth:`CompositionMethod.weights`) and how the branches' noise predictions are
combined (:meth:`CompositionMethod.combine`). The loop runs all branches of a step in
one batched UNet call (chunked when memory demands), so a method never owns a copy of
the denoising loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn

from ..layers import WeightState
from ..loading import LoRA

UNetRun = Callable[..., torch.Tensor]
"""``run(weights, routes=None)``: one batched UNet call (:func:`compose.loop.predict_noise`)."""


@dataclass
class MethodContext:
    """What a method may look at when a generation starts.

    ``weights`` are the effective per-LoRA weights, shape ``(N,)``: the user's weight
    times the global LoRA scale. ``layers`` names the composable UNet layers in index
    order (``weights`` of shape ``(L, G, N)`` follow it), for methods that weight each
    layer separately. ``unet`` is there for methods that cache its features;
    ``frequency`` holds each LoRA's high-frequency score where the method asked for it
    (:attr:`CompositionMethod.needs_frequency`), ``importance`` each LoRA's trigger-word
    importance in the prompt, ``(N,)``, where it asked for that
    (:attr:`CompositionMethod.needs_importance`), and ``tokens`` ``(N, T)`` bool, which
    positions of the prompt's encoding hold each LoRA's trigger words, where it asked for
    those (:attr:`CompositionMethod.needs_tokens`), with ``clauses`` ``(N, T)`` the same for
    the whole clauses that hold them and ``clause_texts`` those clauses' words, LoRA name
    -> text (:meth:`compose.Composer.clause_texts`). ``region_states`` holds the encodings
    ``(1, T, D)`` of the texts :meth:`CompositionMethod.region_texts` asked for, and
    ``state`` the UNet's layer weights, for methods that run a layer differently
    per region (:mod:`compose.region_prompts`). ``images`` is the batch's number of
    images and ``latent_size`` its latents' ``(h, w)``.
    """

    loras: list[LoRA]
    weights: torch.Tensor
    num_steps: int
    layers: list[str]
    unet: nn.Module | None = None
    frequency: dict[str, float] = field(default_factory=dict)
    importance: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    clauses: torch.Tensor | None = None
    clause_texts: dict[str, str] | None = None
    region_states: dict[str, torch.Tensor] | None = None
    state: WeightState | None = None
    images: int = 1
    latent_size: tuple[int, int] | None = None


def guided_mix(
    mix: torch.Tensor, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """``Σ_j mix_j pred_j`` of the branches' unconditional and conditional predictions
    (``mix`` broadcasts against ``(G, B, C, H, W)``), then classifier-free guidance."""
    c = (mix * cond).sum(0)
    if uncond is None:
        return c
    u = (mix * uncond).sum(0)
    return u + guidance_scale * (c - u)


class CompositionMethod(ABC):
    """A composition method: a small strategy over the shared composable layer.

    Subclasses are dataclasses whose fields are the method's parameters, so a method
    is configuration as data (recorded in every image's metadata).
    """

    name: ClassVar[str]

    @property
    def needs_frequency(self) -> bool:
        """Whether :meth:`prepare` wants the LoRAs' frequency scores in the context."""
        return False

    @property
    def needs_importance(self) -> bool:
        """Whether :meth:`prepare` wants the trigger words' importance in the prompt
        (:meth:`compose.Composer.trigger_importance`); such a method takes one prompt per call."""
        return False

    @property
    def needs_tokens(self) -> bool:
        """Whether :meth:`prepare` wants where each LoRA's trigger words sit in the prompt's
        encoding; such a method takes one prompt per call."""
        return False

    @property
    def text_encoder_loras(self) -> bool:
        """Whether the LoRAs' text-encoder parts shape the prompt encoding (merged at their
        weights); a method reproducing code that never loads them there says no."""
        return True

    def cannot_compose(self, loras: list[tuple[str, str | None]]) -> str | None:
        """Why this method, as configured, cannot compose LoRAs of these ``(name, category)``,
        or ``None``: asked before any work, so that ``generate`` refuses and the benchmark
        skips a set that a reference mode's released code could not run, instead of
        running something else under the reference's name."""
        return None

    def prepare(self, context: MethodContext) -> None:
        """Called once per generation before the first step."""
        self.context = context

    @abstractmethod
    def weights(self, step: int) -> torch.Tensor:
        """LoRA weights for step ``step`` (0-based).

        Shape ``(G, N)``: one row per branch of the UNet batch, one column per LoRA;
        or ``(L, G, N)`` to give each of the ``L`` composable layers its own weights.
        """

    def predict(self, step: int, run: UNetRun) -> torch.Tensor:
        """All branches' noise predictions for ``step``, ``(G * R, C, H, W)``.

        ``run(weights)`` is one batched UNet evaluation of the branches that ``weights``
        (``(G, N)`` or ``(L, G, N)``) describe. Methods that cache features or split a
        step into several calls override this; the default is one call.
        """
        return run(self.weights(step))

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        """Noise prediction for the scheduler from the per-branch predictions.

        ``uncond`` and ``cond`` are ``(G, B, C, H, W)``; ``uncond`` is ``None`` without
        classifier-free guidance. The default averages the branches' unconditional and
        conditional predictions separately, then applies guidance: plain CFG for one
        branch, the reference LoRA Composite for several.
        """
        c = cond.mean(0)
        if uncond is None:
            return c
        u = uncond.mean(0)
        return u + guidance_scale * (c - u)

    def region_texts(self, context: MethodContext) -> dict[str, str]:
        """LoRA name -> the text its region attends to (per-region prompts), for methods
        that condition regions apart; encoded with the prompt into ``region_states``
        (called before :meth:`prepare`, with the same ``context``)."""
        return {}

    def lora_masks(self) -> torch.Tensor | None:
        """Where each LoRA acted in the last generation, for methods that confine LoRAs to
        regions: ``(B, N, H, W)`` in [0, 1] at latent resolution (``B`` 1 when every image
        shares them); ``None`` for the methods that act on the whole picture."""
        return None

    def parameters(self) -> dict:
        """The method's parameters, for metadata and reproduction."""
        return asdict(self)


def fix_reference(method: CompositionMethod, values: dict) -> None:
    """Give the dataclass ``method`` the released code's parameter ``values`` (for its
    ``reference=True``); a parameter set to anything but its default or that value is
    refused rather than silently replaced."""
    defaults = {f.name: f.default for f in fields(method)}
    for key, value in values.items():
        given = getattr(method, key)
        if given != defaults[key] and given != value:
            raise ValueError(f"{method.name} reference=True fixes {key} to {value!r}, got {given!r}")
        setattr(method, key, value)


class BaseAndEachLoRA(CompositionMethod):
    """The batch layout of the adaptive mixes: branch 0 is the base model (no LoRA),
    branch ``j + 1`` LoRA ``j`` alone, so ``combine`` can weigh each LoRA by how its
    prediction departs from the base model's."""

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        n = len(context.loras)
        self.branches = torch.cat([torch.zeros(1, n).to(context.weights), torch.diag(context.weights)])

    def weights(self, step: int) -> torch.Tensor:
        return self.branches


def tempered_softmax(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(scores / temperature)`` over dim 0; equal weights at an infinite temperature."""
    if temperature == float("inf"):
        return torch.full_like(scores, 1 / scores.shape[0])
    return torch.softmax(scores / temperature, dim=0)


def keep_top_k(weights: torch.Tensor, k: int | None) -> torch.Tensor:
    """``weights`` ``(N, ...)`` (summing to 1 over dim 0) with only the ``k`` largest at
    each position kept and renormalised; unchanged when ``k`` is ``None`` or ``>= N``."""
    if k is None or k >= weights.shape[0]:
        return weights
    keep = weights.topk(k, dim=0).indices
    kept = torch.zeros_like(weights).scatter(0, keep, weights.gather(0, keep))
    return kept / kept.sum(0, keepdim=True)
