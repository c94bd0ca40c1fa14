"""The arguments of a generation call, checked and put in one form before any model work:
one prompt and seed per image, and the LoRAs as :class:`~compose.prompts.LoRAUse` entries."""

from __future__ import annotations

from collections.abc import Sequence

from . import checks
from .prompts import LoRAUse, Weight, check_steps

LoRASpec = str | tuple[str, Weight] | tuple[str, Weight, str | None] | LoRAUse
"""One entry of ``loras=``: a name, ``(name, weight)``, ``(name, weight, blocks)`` or a use."""


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
