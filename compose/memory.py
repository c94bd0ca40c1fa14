"""How many batch rows one UNet call may carry, from the device's free memory.

Batched methods (Composite, CMLoRA, patch, bands, regional) run N branches per step in one
UNet call; :func:`memory_rows` sizes those calls before the first step from an estimate of
one row's activations (:func:`activation_bytes`) against a budget (:func:`memory_budget`),
so that a large N or image splits into calls that fit instead of failing. The loop's
out-of-memory retry stays the safety net (:func:`compose.loop.predict_noise`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger("compose")

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
