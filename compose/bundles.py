"""Bundled models: a diffusers pipeline folder that brings its own LoRAs.

A bundle folder is a diffusers pipeline folder (``model_index.json`` and its parts) with

- ``loras/NAME.safetensors``: the LoRAs that come with the model, loaded with it under NAME;
- ``loras/order.json``, optional: a JSON list of those names in the order they load in
  (the studio and ``inspect`` show LoRAs in load order, so whoever makes the bundle
  decides it); the names it leaves out follow it, sorted, and without it the order is
  sorted;
- ``clip/``, optional: an open_clip model folder, for CLIPScore offline.

Some bundles go by a name (:data:`BUNDLES`): ``demo-world`` is the world that
:mod:`compose.demo_world` trains. The engine (:meth:`compose.composer.Composer.load`),
the CLI and the studio find a bundle and its LoRAs here, from the folder alone, so that
none of them imports the code that made it (that code imports the engine, not the other
way round). This module imports nothing but the standard library, so that the CLI can
answer a misspelt LoRA name before it imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_open

DEMO_WORLD = "demo-world"
LORA_FOLDER = "loras"
LORA_ORDER = "order.json"
CLIP_FOLDER = "clip"


@dataclass(frozen=True)
class Bundle:
    """Where a bundle that goes by a name lives, and what to say when it is not there."""

    variable: str
    """The environment variable that names another folder for it."""
    default: Path
    """Its folder where the variable is not set."""
    missing: str
    """What to do when its folder holds no pipeline; ``{folder}`` stands for the folder."""


BUNDLES: dict[str, Bundle] = {
    DEMO_WORLD: Bundle(
        variable="COMPOSE_DEMO_WORLD",
        default=Path(__file__).resolve().parents[1] / "assets" / "demo_world",
        missing="the demo world is not at {folder}: train it with `compose demo-world train`, set COMPOSE_DEMO_WORLD "
        "to its folder, or pass another model (tiny:sd1 needs nothing)",
    ),
}
"""The bundles a model name loads (``Composer.load("demo-world")``), by that name."""


def bundle_folder(name: str) -> Path:
    """The folder of the bundle ``name`` (a key of :data:`BUNDLES`): its variable's value
    where that is set, else its default; it may not exist."""
    bundle = BUNDLES[name]
    return Path(os.environ.get(bundle.variable, bundle.default))


def bundle_clip(name: str) -> Path:
    """Where the offline CLIP of the bundle ``name`` lies (``clip/``); it may carry none."""
    return bundle_folder(name) / CLIP_FOLDER


def brought_loras(name: str, folder: str | Path | None = None) -> dict[str, Path]:
    """The LoRA files the bundle ``name`` brings, by name in load order (:func:`bundle_loras`),
    from ``folder`` where given (a copy trained elsewhere, say), else from its own folder.
    Raises ``FileNotFoundError`` with the bundle's advice when the folder holds no pipeline."""
    where = bundle_folder(name) if folder is None else Path(folder)
    if not (where / "model_index.json").is_file():
        raise FileNotFoundError(BUNDLES[name].missing.format(folder=where))
    return bundle_loras(where)


def bundle_loras(folder: str | Path) -> dict[str, Path]:
    """The LoRA files in the ``loras/`` of a bundle folder, by name, in the order of its
    ``loras/order.json``, the others after them sorted (none: an empty dict). Raises
    ``ValueError`` when the order file is not a JSON list of names."""
    loras = Path(folder) / LORA_FOLDER
    files = dict(sorted((path.stem, path) for path in loras.glob("*.safetensors") if path.is_file()))
    listed = {name: files.pop(name) for name in _order(loras / LORA_ORDER) if name in files}
    return {**listed, **files}


def write_lora_order(folder: str | Path, names: Iterable[str]) -> None:
    """Record in the bundle ``folder`` that its LoRAs load in the order of ``names`` (for
    the code that makes a bundle; names with no file are passed over when it loads)."""
    with atomic_open(Path(folder) / LORA_FOLDER / LORA_ORDER, "w") as handle:
        json.dump(list(names), handle)
        handle.write("\n")


def _order(path: Path) -> list[str]:
    """The names an order file lists; none where there is no such file."""
    if not path.is_file():
        return []
    try:
        order = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        order = None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise ValueError(f"{path}: not a JSON list of LoRA names, the order the bundle's LoRAs load in")
    return order
