"""compose: several LoRA adapters in one Stable Diffusion image.

The engine: :mod:`compose.loading` (LoRA files), :mod:`compose.layers` (the composable
layer), :mod:`compose.methods` (Merge, Switch, Composite, ...), :mod:`compose.loop` (the
denoising loop), :mod:`compose.pipelines` (the base model), :mod:`compose.encoding`
(prompts to conditioning), :mod:`compose.weights` (weights per LoRA, step and layer),
:mod:`compose.composer` (the Python API, over all of these) and :mod:`compose.bundles`
(models that bring their own LoRAs, such as the demo world). The Gradio studio is
``compose.app`` and the evaluation ``compose.evaluation``.

Names are imported on first use, so that ``compose --help`` starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .calls import RunOptions, SamplingConfig
    from .checks import CATEGORIES
    from .composer import Composer
    from .loading import LoRA, LoRAError, load_lora
    from .loop import GenerationCancelled, NonFiniteLatentsError
    from .metadata import generate_kwargs, read_record, save_png
    from .methods import METHODS, CMLoRA, Composite, CompositionMethod, KLoRA, Merge, Switch, get_method
    from .pipelines import ModelLoadError

_WHERE = {
    "CATEGORIES": "checks",
    "Composer": "composer",
    "SamplingConfig": "calls",
    "RunOptions": "calls",
    "ModelLoadError": "pipelines",
    "generate_kwargs": "metadata",
    "LoRA": "loading",
    "LoRAError": "loading",
    "load_lora": "loading",
    "GenerationCancelled": "loop",
    "NonFiniteLatentsError": "loop",
    "read_record": "metadata",
    "save_png": "metadata",
    "METHODS": "methods",
    "CMLoRA": "methods",
    "Composite": "methods",
    "CompositionMethod": "methods",
    "KLoRA": "methods",
    "Merge": "methods",
    "Switch": "methods",
    "get_method": "methods",
}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CATEGORIES",
    "CMLoRA",
    "METHODS",
    "Composer",
    "Composite",
    "CompositionMethod",
    "GenerationCancelled",
    "KLoRA",
    "LoRA",
    "LoRAError",
    "Merge",
    "ModelLoadError",
    "NonFiniteLatentsError",
    "RunOptions",
    "SamplingConfig",
    "Switch",
    "generate_kwargs",
    "get_method",
    "load_lora",
    "read_record",
    "save_png",
]
