"""The denoising loop, built from a diffusers UNet and scheduler.

It is the project's own loop because composition methods need per-step control of the
LoRA weights and of the batch layout; everything else (timesteps, model-input scaling,
the update rule) is the scheduler's. With one branch and CFG it performs the same
operations in the same order as diffusers' ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .layers import Routes, WeightState
from .methods import CompositionMethod

StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]
logger = logging.getLogger("compose")


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


MEMORY_BUDGET_ENV = "COMPOSE_MEMORY_BUDGET"
"""Environment variable: the bytes one UNet call's activations may take, instead of
:data:`MEMORY_SHARE` of the device's free memory (a shared machine, or a test)."""
MEMORY_SHARE = 0.5
"""The share of the device's free memory that one UNet call's activations may take; the
rest is headroom for the estimate's error, the allocator's rounding, the scheduler and the
VAE decode."""
WORKING_MAPS = 16
"""Feature maps of the largest level alive at once inside one block, in units of ``c_l P_l``
(a transformer block's feed-forward holds its input, its GEGLU projection of ``8 c_l``
channels and the gated ``4 c_l``; a composable layer adds its LoRA output beside the base
output)."""
ATTENTION_MATRICES = 2
"""``heads x P x keys`` matrices that a processor which materialises attention holds at
once (scores and probabilities)."""
_FLASH_PROCESSORS = ("2_0", "XFormers")
"""diffusers' names for the processors on PyTorch's scaled-dot-product attention or
xformers, whose kernels never hold the attention matrix (``AttnProcessor2_0``...)."""


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def activation_bytes(config: Mapping, latent: tuple[int, int], dtype: torch.dtype, tokens: int = 77,
                     materialised_attention: bool = True) -> int:  # fmt: skip
    """Bytes that one more batch row adds to the peak of a ``UNet2DConditionModel`` call on
    an ``(h, w)`` ``latent`` (no gradients), from the UNet's ``config``.

    Level ``l`` (``block_out_channels[l] = c_l`` channels) works at ``P_l = ceil(h / 2^l)
    ceil(w / 2^l)`` positions. Per row, in elements of ``dtype``:

    - the skip connections that the down path keeps for the up path: ``conv_in``'s map,
      ``layers_per_block`` maps of ``c_l P_l`` per level and each downsampler's
      ``c_l P_(l+1)``;
    - the working set of the largest level, ``WORKING_MAPS x max_l c_l P_l``;
    - where the attention processors materialise attention (``materialised_attention``,
      diffusers' classic ``AttnProcessor``), ``ATTENTION_MATRICES x heads_l x P_l x
      max(P_l, tokens)`` at the attention level where that is largest.

    Against the peak resident memory per row of SD1.5's UNet on the CPU in float32 (32x32
    latent: 11.2 MiB with ``AttnProcessor2_0``, 56.1 MiB with ``AttnProcessor``; 48x48:
    46.6 and 355 MiB) the estimate is 1.3-2.3x and 1.1-1.6x above; it errs towards smaller
    calls, and :data:`MEMORY_SHARE` keeps the rest of the margin.
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = _per_level(config.get("layers_per_block", 2), levels)
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim") or 8, levels)
    attention = ["CrossAttn" in kind for kind in config.get("down_block_types", ())]
    positions = [math.ceil(latent[0] / 2**level) * math.ceil(latent[1] / 2**level) for level in range(levels)]
    maps = [c * p for c, p in zip(channels, positions, strict=True)]
    skips = maps[0] + sum(n * m for n, m in zip(layers, maps, strict=True))
    skips += sum(channels[level] * positions[level + 1] for level in range(levels - 1))
    elements = skips + WORKING_MAPS * max(maps)
    if materialised_attention:
        scores = [h * p * max(p, tokens) for h, p, a in zip(heads, positions, attention, strict=False) if a]
        elements += ATTENTION_MATRICES * max(scores, default=0)
    return elements * torch.finfo(dtype).bits // 8


def materialises_attention(unet: torch.nn.Module) -> bool:
    """Whether any attention processor of ``unet`` holds whole attention matrices (any but
    diffusers' scaled-dot-product and xformers processors; an unknown one counts as yes)."""
    processors = getattr(unet, "attn_processors", {})
    return any(not any(tag in type(p).__name__ for tag in _FLASH_PROCESSORS) for p in processors.values())


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: on CUDA what the driver reports free plus
    what PyTorch's allocator holds unused; on the CPU the kernel's ``MemAvailable`` (else
    the free pages); ``None`` on other devices."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def memory_budget(device: torch.device) -> int | None:
    """Bytes one UNet call's activations may take on ``device``: ``COMPOSE_MEMORY_BUDGET``
    where set, else :data:`MEMORY_SHARE` of :func:`free_memory`; ``None`` where unknown."""
    given = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if given:
        try:
            budget = float(given)
        except ValueError:
            budget = -1.0
        if not budget >= 0 or math.isinf(budget):
            raise ValueError(f"{MEMORY_BUDGET_ENV} is a number of bytes, such as 2e9; got {given!r}")
        return int(budget)
    free = free_memory(device)
    return None if free is None else int(free * MEMORY_SHARE)


def memory_rows(unet: torch.nn.Module, latent: tuple[int, int], dtype: torch.dtype, tokens: int,
                device: torch.device) -> int | None:  # fmt: skip
    """The most batch rows one call of ``unet`` should carry on ``device``, chosen before the
    first step: the :func:`memory_budget` over :func:`activation_bytes` per row, at least 1;
    ``None`` (no cap) where the budget or the UNet's shape is unknown. The loop's
    out-of-memory retry stays the safety net."""
    config = getattr(unet, "config", {})
    budget = memory_budget(device)
    if budget is None or "block_out_channels" not in config:
        return None
    per_row = activation_bytes(config, latent, dtype, tokens, materialises_attention(unet))
    rows = max(1, budget // per_row)
    logger.debug("memory: %.0f MiB for activations, about %.1f MiB a row: at most %d rows per UNet call",
                 budget / 2**20, per_row / 2**20, rows)  # fmt: skip
    return rows


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
    splits them (the caller's ``max_batch``, else :func:`memory_rows`; a branch's ``R`` rows
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
