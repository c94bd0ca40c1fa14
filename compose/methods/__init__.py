"""Composition methods: strategies that set the composable layers' weights per step.

The classes are imported on first use (``compose --help`` lists the method names
without importing torch): :data:`METHODS` maps each name to its class.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bands import BandFusion
    from .base import CompositionMethod, MethodContext
    from .cmlora import CMLoRA
    from .composite import Composite
    from .klora import KLoRA
    from .merge import Merge
    from .patchwise import PatchComposite
    from .prompt_aware import WComposite, WSwitch
    from .regional import Regional
    from .routed import Routed
    from .switch import Switch

_WHERE = {
    "merge": ("merge", "Merge"),
    "switch": ("switch", "Switch"),
    "composite": ("composite", "Composite"),
    "klora": ("klora", "KLoRA"),
    "cmlora": ("cmlora", "CMLoRA"),
    "patch": ("patchwise", "PatchComposite"),
    "bands": ("bands", "BandFusion"),
    "wswitch": ("prompt_aware", "WSwitch"),
    "wcomposite": ("prompt_aware", "WComposite"),
    "regional": ("regional", "Regional"),
    "routed": ("routed", "Routed"),
}
_CLASSES = {cls: module for module, cls in _WHERE.values()} | {"CompositionMethod": "base", "MethodContext": "base"}


class _Methods(Mapping):
    """Method name -> class, in the order the documentation lists them; a class is
    imported when it is first looked up."""

    def __getitem__(self, name: str) -> type[CompositionMethod]:
        module, cls = _WHERE[name]
        return getattr(import_module(f"{__name__}.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_WHERE)

    def __len__(self) -> int:
        return len(_WHERE)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(_WHERE)})"


METHODS: Mapping[str, type[CompositionMethod]] = _Methods()


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_method(method: str | CompositionMethod, **parameters) -> CompositionMethod:
    """A method object from its name and parameters (or the object itself)."""
    from .base import CompositionMethod

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
    "Routed",
    "Switch",
    "WComposite",
    "WSwitch",
    "get_method",
]
