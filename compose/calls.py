"""The arguments of a generation call, checked and put in one form before any model work:
one prompt and seed per image, and the LoRAs as :class:`~compose.prompts.LoRAUse` entries.

:meth:`compose.Composer.generate` takes what changes from image to image directly and the
rest in two groups that a caller builds once and reuses: :class:`SamplingConfig` (what the
image is: steps, guidance, size, scheduler; every field is in the PNG record) and
:class:`RunOptions` (how the call runs and answers; none changes a pixel). Both are plain
data: ``generate`` checks their values against the model's limits, as it checks the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import checks
from .prompts import LoRAUse, Weight, check_steps
from .schedulers import DEFAULT_SCHEDULER

if TYPE_CHECKING:
    from .loop import StepCallback

LoRASpec = str | tuple[str, Weight] | tuple[str, Weight, str | None] | LoRAUse
"""One entry of ``loras=``: a name, ``(name, weight)``, ``(name, weight, blocks)`` or a use."""


@dataclass(frozen=True)
class SamplingConfig:
    """How :meth:`~compose.Composer.generate` samples: ``steps`` denoising steps at CFG
    ``guidance_scale`` (1 or less: no unconditional pass), images ``width`` x ``height``
    pixels (``None``: the model's native side; multiples of the VAE factor) with the
    :mod:`compose.schedulers` sampler ``scheduler``. The PNG record keeps each field under
    its name, so ``dataclasses.replace`` varies one setting of a recorded image."""

    steps: int = 25
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    scheduler: str = DEFAULT_SCHEDULER


@dataclass(frozen=True)
class RunOptions:
    """How a :meth:`~compose.Composer.generate` call runs and what it returns; no field
    changes the images. ``callback(step, steps, latents)`` is called after each step
    (returning ``False`` cancels: :class:`~compose.loop.GenerationCancelled`). ``max_batch``
    caps the UNet batch (rows) per call, Composite then running its N branches in chunks;
    ``None`` follows the device's free memory (:func:`compose.memory.memory_rows`, and
    ``COMPOSE_MEMORY_BUDGET`` in bytes, see docs/precision-and-memory.md). ``progress``
    shows a bar on stderr. ``output_type="latent"`` returns the final latents
    ``(B, C, h, w)`` instead of images, as diffusers pipelines do. ``return_masks=True``
    returns ``(images, masks)``: per image, each LoRA's region as a greyscale image of the
    output's size (white: the LoRA acts fully) for the methods that confine LoRAs to
    regions (``routed``, ``regional``), an empty dict for the others."""

    callback: StepCallback | None = None
    max_batch: int | None = None
    progress: bool = False
    output_type: str = "pil"
    return_masks: bool = False


def options(sampling: object, run: object) -> tuple[SamplingConfig, RunOptions]:
    """``generate``'s ``sampling`` and ``run``, ``None`` as the defaults; anything else
    (a dict of the old keywords, say) is refused by name."""
    groups = ((sampling, SamplingConfig, "sampling"), (run, RunOptions, "run"))
    for value, kind, name in groups:
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__} (from compose import {kind.__name__}), "
                            f"got {type(value).__name__}")  # fmt: skip
    return SamplingConfig() if sampling is None else sampling, RunOptions() if run is None else run


def batch(prompt: str | Sequence[str], seed: int | Sequence[int], negative_prompt: str) -> tuple[list[str], list[int]]:
    """One prompt and one checked seed per image: a single prompt or seed is repeated
    (an int seed counts up, ``seed, seed+1, ...``)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(prompts) == 1 and len(seeds) > 1:
        prompts = prompts * len(seeds)
    elif len(seeds) == 1 and len(prompts) > 1:
        seeds = [checks.seed(seeds[0]) + i for i in range(len(prompts))]
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed or one per prompt")
    seeds = [checks.seed(s) for s in seeds]
    if not all(isinstance(p, str) for p in [*prompts, negative_prompt]):
        raise ValueError("prompts and the negative prompt must be strings")
    return prompts, seeds


def lora_uses(loras: Sequence[LoRASpec] | dict[str, Weight] | None, sdxl: bool = False) -> list[LoRAUse]:
    """The ``loras`` argument as checked :class:`LoRAUse` entries (:func:`compose.checks.lora_use`)."""
    specs = loras.items() if isinstance(loras, dict) else (loras or [])
    if isinstance(specs, str):
        specs = [specs]
    return [_checked_use(spec, sdxl) for spec in specs]


def _checked_use(spec: object, sdxl: bool) -> LoRAUse:
    """One ``loras`` entry; a :class:`LoRAUse` (or a tuple of its 4 or 5 fields) also keeps
    its text-encoder weight and steps window, checked as the rest is."""
    extra = tuple(spec[3:]) if isinstance(spec, (tuple, list)) and 3 < len(spec) <= 5 else ()
    use = checks.lora_use(tuple(spec[:3]) if extra else spec, sdxl)
    text, steps = (*extra, None, None)[:2]
    return use._replace(
        text=None if text is None else checks.lora_weight(f"{use.name} (text encoder)", text),
        steps=None if steps is None else check_steps(f"LoRA {use.name!r}", tuple(steps)),
    )


def texts(prompts: Sequence[str], negative_prompt: str) -> list[tuple[str, str]]:
    """Each distinct prompt and the negative prompt, with what to call it in a message."""
    return [*(("the prompt", p) for p in dict.fromkeys(prompts)), ("the negative prompt", negative_prompt)]


def each_once(uses: list[LoRAUse], given: int) -> None:
    """Refuse a LoRA used twice, naming it and where: the first ``given`` uses come from
    ``loras=``, the rest from the prompt's ``<lora:...>`` tags."""
    seen: dict[str, int] = {}
    for index, use in enumerate(uses):
        if use.name in seen:
            where = ["in loras=" if i < given else "as a <lora:...> tag of the prompt" for i in (seen[use.name], index)]
            how = f"twice {where[0]}" if where[0] == where[1] else f"{where[0]} and {where[1]}"
            raise ValueError(f"LoRA {use.name!r} is listed {how}: list each LoRA once")
        seen[use.name] = index
