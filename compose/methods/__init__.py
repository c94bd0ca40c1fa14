"""Composition methods: strategies that set the composable layers' weights per step."""

from __future__ import annotations

from .bands import BandFusion
from .base import CompositionMethod, MethodContext
from .cmlora import CMLoRA
from .composite import Composite
from .klora import KLoRA
from .merge import Merge
from .patchwise import PatchComposite
from .prompt_aware import WComposite, WSwitch
from .regional import Regional
from .switch import Switch

METHODS: dict[str, type[CompositionMethod]] = {
    m.name: m
    for m in (Merge, Switch, Composite, KLoRA, CMLoRA, PatchComposite, BandFusion, WSwitch, WComposite, Regional)
}


def get_method(method: str | CompositionMethod, **parameters) -> CompositionMethod:
    """A method object from its name and parameters (or the object itself)."""
    if isinstance(method, CompositionMethod):
        if parameters:
            raise ValueError("give parameters either in the method object or as keywords, not both")
        return method
    try:
        cls = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}") from None
    return cls(**parameters)


__all__ = [
    "BandFusion",
    "CMLoRA",
    "METHODS",
    "Composite",
    "CompositionMethod",
    "KLoRA",
    "Merge",
    "MethodContext",
    "PatchComposite",
    "Regional",
    "Switch",
    "WComposite",
    "WSwitch",
    "get_method",
]
