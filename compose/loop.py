"""The denoising loop, built from a diffusers UNet and scheduler.

It is the project's own loop because composition methods need per-step control of the
LoRA weights and of the batch layout; everything else (timesteps, model-input scaling,
the update rule) is the scheduler's. With one branch and CFG it performs the same
operations in the same order as diffusers' ``StableDiffusionPipeline``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from .layers import Routes, WeightState
from .methods import CompositionMethod

StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


class GenerationCancelled(RuntimeError):
    """Raised when a step callback asks to stop; nothing half-made is returned."""


class NonFiniteLatentsError(RuntimeError):
    """The latents became NaN/Inf; raised instead of decoding a black image."""


class OutOfMemory(RuntimeError):
    """Even one branch per UNet call does not fit in the accelerator's memory."""


@dataclass
class Conditioning:
    """Prompt conditioning for a batch of ``B`` images, rows ordered ``[uncond; cond]``.

    ``encoder_hidden_states`` is ``(2B, T, D)`` with CFG (``(B, T, D)`` without);
    ``added_cond_kwargs`` holds SDXL's ``text_embeds``/``time_ids`` in the same order.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def repeat(self, groups: int) -> tuple[torch.Tensor, dict | None]:
        """The conditioning for ``groups`` branches stacked along the batch."""
        ehs = self.encoder_hidden_states.repeat(groups, 1, 1)
        added = self.added_cond_kwargs
        if added is not None:
            added = {k: v.repeat(groups, *([1] * (v.dim() - 1))) for k, v in added.items()}
        return ehs, added


def predict_noise(
    unet,
    state: WeightState,
    latent_input: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Conditioning,
    weights: torch.Tensor,
    max_rows: int | None = None,
    scale: torch.Tensor | None = None,
    routes: Routes | None = None,
) -> torch.Tensor:
    """UNet predictions for every branch: ``(G * R, C, H, W)`` for ``R`` rows per branch.

    ``weights`` is ``(G, N)`` or ``(L, G, N)``; branch ``g`` reads ``weights[..., g, :]``
    for its ``R`` rows, each LoRA's column multiplied by ``scale`` ``(N,)`` if given (the
    step's value of scheduled weights). ``routes`` confines each LoRA to where its masks
    say, per image (:class:`~compose.layers.Routes`; ``spatial`` has one row per image
    of the batch, shared by every branch and by the CFG halves). Branches run in one call unless ``max_rows``
    splits them (the caller's ``max_batch``, else :func:`compose.memory.memory_rows`; a branch's ``R`` rows
    always share a call); when the accelerator runs out of memory the call is retried in
    halves down to one branch per call (Composite's N passes, as the references run them).
    """
    weights = weights.to(latent_input.device)
    if scale is not None:
        weights = weights * scale.to(weights)
    groups = weights.shape[-2]
    rows = latent_input.shape[0]
    per_call = groups if max_rows is None else min(groups, max(1, max_rows // rows))
    outputs: list[torch.Tensor] = []
    start = 0
    while start < groups:
        chunk = weights[..., start : start + per_call, :]
        try:
            outputs.append(_unet_call(unet, state, latent_input, timestep, conditioning, chunk, routes))
        except torch.OutOfMemoryError:
            if per_call == 1:
                raise OutOfMemory(
                    "out of accelerator memory even with one LoRA branch per UNet call; lower the image size, "
                    "use float16, or free memory"
                ) from None
            per_call = max(1, per_call // 2)
            continue
        start += chunk.shape[-2]
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _unet_call(unet, state, latent_input, timestep, conditioning, chunk: torch.Tensor,
               routes: Routes | None = None) -> torch.Tensor:  # fmt: skip
    """One UNet call over the branches of ``chunk`` (``(..., g, N)``), rows branch-major."""
    g, rows = chunk.shape[-2], latent_input.shape[0]
    ehs, added = conditioning.repeat(g)
    state.weights = chunk.repeat_interleave(rows, dim=-2)
    if routes is not None:
        spatial = routes.spatial
        if spatial is not None:
            spatial = spatial.to(latent_input).repeat(g * rows // spatial.shape[0], 1, 1, 1)
        state.routes = Routes(spatial, None if routes.tokens is None else routes.tokens.to(latent_input))
    try:
        return unet(
            latent_input.repeat(g, 1, 1, 1),
            timestep,
            encoder_hidden_states=ehs,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
    finally:
        state.weights = None
        state.routes = None


NAN_CHECK_EVERY = 5
"""The loop keeps an on-device index of the first step whose latents were NaN/Inf and
reads it (a host sync) every this many steps and after the last, not at every step."""


def _check_finite(first_bad: torch.Tensor, num_steps: int) -> None:
    step = int(first_bad)
    if step >= 0:
        raise NonFiniteLatentsError(
            f"the latents became NaN/Inf at step {step + 1} of {num_steps}; "
            "lower the LoRA weights or guidance, or use float32"
        )


def denoise(
    unet,
    scheduler,
    state: WeightState,
    latents: torch.Tensor,
    conditioning: Conditioning,
    method: CompositionMethod,
    guidance_scale: float,
    extra_step_kwargs: dict | None = None,
    callback: StepCallback | None = None,
    max_rows: int | None = None,
    progress: bool = False,
    step_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the scheduler's timesteps from ``latents`` (``(B, C, H, W)``, already scaled by
    ``init_noise_sigma``) and return the final latents. ``step_scales`` ``(steps, N)``
    multiplies each LoRA's weights step by step (scheduled weights).

    ``callback(step, num_steps, latents)`` runs after every step; returning ``False``
    raises :class:`GenerationCancelled`.
    """
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    cfg = guidance_scale > 1.0
    batch = latents.shape[0]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    state.expected_calls = num_steps
    first_bad: torch.Tensor | None = None
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", unit="step")):
        latent_input = torch.cat([latents] * 2) if cfg else latents
        latent_input = scheduler.scale_model_input(latent_input, t)
        scale = None if step_scales is None else step_scales[i]
        run = partial(predict_noise, unet, state, latent_input, t, conditioning, max_rows=max_rows, scale=scale)
        eps = method.predict(i, run)
        eps = eps.view(eps.shape[0] // latent_input.shape[0], 2 if cfg else 1, batch, *eps.shape[1:])
        noise = method.combine(eps[:, 0] if cfg else None, eps[:, -1], guidance_scale, i).to(latents.dtype)
        latents = scheduler.step(noise, t, latents, **(extra_step_kwargs or {}), return_dict=False)[0]
        bad = ~torch.isfinite(latents).all()
        first_bad = torch.where(bad, i, -1) if first_bad is None else torch.where(bad & (first_bad < 0), i, first_bad)
        if (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == num_steps:
            _check_finite(first_bad, num_steps)
        if callback is not None and callback(i, num_steps, latents) is False:
            raise GenerationCancelled(f"cancelled after step {i + 1} of {num_steps}")
    return latents
