"""Where a demo world lives and what its folder holds, without loading anything.

A world folder is a bundled model (:mod:`compose.bundles`: a pipeline folder with its
LoRAs in ``loras/``, in the order of ``loras/order.json``, and its CLIP in ``clip/``),
which the engine loads as ``demo-world`` without importing this package. The trainer and
the evaluation find the rest of a world here, so that neither imports the other to
learn a path:

- a diffusers ``StableDiffusionPipeline`` folder (``model_index.json`` and its parts);
- ``loras/<concept>.safetensors``, one LoRA per concept, and ``loras/order.json``, the
  concepts' order (the order they load in, and the studio shows them in);
- ``ceiling.safetensors``, the yardstick LoRA trained on composed scenes (outside
  ``loras/`` so that no library takes it for a concept);
- ``clip/``, the offline CLIP for CLIPScore; ``sets.json``, the benchmark's sets, and
  ``two_characters.json`` its two-character sets; ``training.json``, the record of how it
  was made.
"""

from __future__ import annotations

from pathlib import Path

from ..bundles import CLIP_FOLDER, DEMO_WORLD, LORA_FOLDER, brought_loras, bundle_folder
from .concepts import CONCEPTS

WORLD_VERSION = 3
"""The version of the world's vocabulary and renderer (:mod:`.concepts`, :mod:`.render`)
that a trained folder was made for, recorded in its ``training.json``: version 1 drew
one figure on a plain background; version 2 has five slots; version 3 draws quarn's
mortar white (version 2's dark mortar hid the charcoal objects) and vosh's sky as the day
sky's grey with a gold moon and stars (the world's VAE cannot draw a dark sky that keeps
the items on it)."""
CEILING = "ceiling"
REPORT = "training.json"
SETS = "sets.json"
TWO_CHARACTERS = "two_characters.json"


def demo_world_folder() -> Path:
    """The shipped demo world: ``$COMPOSE_DEMO_WORLD`` or ``assets/demo_world`` of the
    checkout (:data:`compose.bundles.BUNDLES`)."""
    return bundle_folder(DEMO_WORLD)


def demo_world_clip(folder: str | Path | None = None) -> Path:
    """The folder of a world's offline CLIP (for ``CLIPScorer.from_folder``)."""
    return Path(folder or demo_world_folder()) / CLIP_FOLDER


def lora_path(folder: str | Path, concept: str) -> Path:
    """Where a concept's LoRA (or the ceiling LoRA, ``concept="ceiling"``) lies in a world folder."""
    if concept == CEILING:
        return Path(folder) / f"{CEILING}.safetensors"
    return Path(folder) / LORA_FOLDER / f"{concept}.safetensors"


def trained_version(folder: str | Path) -> int:
    """The :data:`WORLD_VERSION` a world folder was trained for (1 when it does not say)."""
    import json

    record = Path(folder) / REPORT
    if not record.is_file():
        return 1
    return int(json.loads(record.read_text(encoding="utf-8")).get("world", 1))


def world_loras(folder: str | Path) -> dict[str, Path]:
    """Every concept's LoRA file in ``folder``, by concept name in the concepts' order,
    after checking that the folder is a world with all of them: raises
    ``FileNotFoundError`` with what to do otherwise."""
    brought = brought_loras(DEMO_WORLD, folder)
    missing = [name for name in CONCEPTS if name not in brought]
    if missing:
        raise FileNotFoundError(f"{folder}: the LoRAs of {', '.join(missing)} are missing from {LORA_FOLDER}/")
    return {name: brought[name] for name in CONCEPTS}
