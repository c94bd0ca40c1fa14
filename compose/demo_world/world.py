"""Where a demo world lives and what its folder holds, without loading anything.

The engine (:meth:`compose.composer.Composer.demo_world`), the trainer and the
evaluation all find the parts of a world folder here, so that none of them imports
another to learn a path:

- a diffusers ``StableDiffusionPipeline`` folder (``model_index.json`` and its parts);
- ``loras/<concept>.safetensors``, one LoRA per concept;
- ``ceiling.safetensors``, the yardstick LoRA trained on composed scenes (outside
  ``loras/`` so that no library takes it for a concept);
- ``clip/``, the offline CLIP for CLIPScore; ``sets.json``, the benchmark's sets, and
  ``two_characters.json`` its two-character sets; ``training.json``, the record of how it
  was made.
"""

from __future__ import annotations

import os
from pathlib import Path

from .concepts import CONCEPTS

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo_world"
WORLD_VERSION = 2
"""The version of the world's vocabulary and renderer (:mod:`.concepts`, :mod:`.render`)
that a trained folder was made for, recorded in its ``training.json``: version 1 drew
one figure on a plain background; version 2 has five slots."""
CEILING = "ceiling"
CLIP_FOLDER = "clip"
LORA_FOLDER = "loras"
REPORT = "training.json"
SETS = "sets.json"
TWO_CHARACTERS = "two_characters.json"


def demo_world_folder() -> Path:
    """The shipped demo world: ``$COMPOSE_DEMO_WORLD`` or ``assets/demo_world`` of the checkout."""
    return Path(os.environ.get("COMPOSE_DEMO_WORLD", ASSETS))


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
    """Every concept's LoRA file in ``folder``, by concept name, after checking that the
    folder is a world: raises ``FileNotFoundError`` with what to do otherwise."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo world is not at {folder}: train it with `compose demo-world train`, set "
            "COMPOSE_DEMO_WORLD to its folder, or pass another model (tiny:sd1 needs nothing)"
        )
    files = {name: lora_path(folder, name) for name in CONCEPTS}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the LoRAs of {', '.join(missing)} are missing from {LORA_FOLDER}/")
    return files
