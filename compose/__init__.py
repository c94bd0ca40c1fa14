"""compose: several LoRA adapters in one Stable Diffusion image.

The engine: :mod:`compose.loading` (LoRA files), :mod:`compose.layers` (the composable
layer), :mod:`compose.methods` (Merge, Switch, Composite), :mod:`compose.loop` (the
denoising loop) and :mod:`compose.composer` (the Python API). The Gradio studio is
``compose.app`` and the evaluation ``compose.evaluation``.
"""

from .composer import Composer, ModelLoadError, generate_kwargs
from .loading import CATEGORIES, LoRA, LoRAError, load_lora
from .loop import GenerationCancelled, NonFiniteLatentsError
from .metadata import read_record, save_png
from .methods import METHODS, CMLoRA, Composite, CompositionMethod, KLoRA, Merge, Switch, get_method

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
    "Switch",
    "generate_kwargs",
    "get_method",
    "load_lora",
    "read_record",
    "save_png",
]
