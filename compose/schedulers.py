"""Schedulers by name, with the sampler names AUTOMATIC1111 writes into PNG metadata.

Any diffusers scheduler works with the loop; these names cover what artists pick. Each
entry is a scheduler class and the config overrides that make it that sampler.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_SCHEDULER = "dpm++2m"

SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
"""Name -> (diffusers scheduler class name, config overrides, A1111 sampler name); the
class is imported when a scheduler is made, so the names cost no diffusers import."""


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler ``name`` configured from the model's own scheduler config."""
    try:
        cls_name, overrides, _ = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}") from None
    import diffusers

    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in base_config.items() if k != "algorithm_type"}
    return cls.from_config({**config, **overrides})


def a1111_sampler_name(name: str) -> str:
    """The sampler name A1111 would show for scheduler ``name``."""
    return SCHEDULERS[name][2]


def step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """The noise generators (ancestral samplers) and ``eta=0`` (DDIM) where ``step`` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("generator", generators), ("eta", 0.0)) if k in accepted}
