"""The labelled set: generated pictures, each slot marked right or wrong by a person.

The detectors are checked on renders by construction; on *generated* pictures only an
eye can say whether the hat is there. :func:`candidates` generates a varied set (the
base on generic prompts, each LoRA alone, compositions of every N by several methods),
:func:`save_candidates` writes them with a numbered contact sheet to look at, and a
person fills each entry's ``seen``: per slot of the scene asked, whether the picture
shows it. :func:`agreement` then compares the detectors' verdicts
(:func:`~compose.demo_world.detectors.slot_check`) with those labels, per slot and per
concept.

``labels.json``: ``{"images": [{"file", "kind", "method", "scene", "caption", "seen"}]}``,
``scene`` as :func:`scene_to_dict` writes it and ``seen`` ``{slot: true/false}``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..composer import Composer
from ..files import atomic_open
from ..sheets import contact_sheet
from .concepts import CONCEPTS
from .detectors import slot_check
from .evaluate import rate
from .scenes import Figure, Scene, composition_scene, composition_sets, sample_concept_scene, sample_generic_scene

LABELS = "labels.json"
LABELLED = Path(__file__).resolve().parents[2] / "assets" / "labels"
"""The labelled set shipped with the checkout."""
METHODS = ("merge", "composite", "switch", "cmlora")


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def scene_from_dict(data: dict) -> Scene:
    figures = {k: Figure(**data[k]) if data.get(k) else None for k in ("figure", "partner")}
    return Scene(**{**data, **figures})


def candidates(composer: Composer, base: int = 40, per_lora: int = 4, per_n: int = 17, seed: int = 0,
               steps: int = 25) -> list[dict]:  # fmt: skip
    """``base`` generic pictures, ``per_lora`` of each LoRA alone and ``per_n`` compositions
    of each N = 2..5 (methods in turn from :data:`METHODS`): entries of ``labels.json``
    with the image under ``"image"`` and ``seen`` still empty."""
    rng = np.random.default_rng(seed)
    entries = []

    def add(scene: Scene, kind: str, loras: list[str], method: str, image_seed: int) -> None:
        image = composer.generate(scene.caption(), loras, method, seed=image_seed, steps=steps)[0]
        entries.append({"image": image, "kind": kind, "method": method if loras else None,
                        "scene": scene_to_dict(scene), "caption": scene.caption(), "seen": None})  # fmt: skip

    for i in range(base):
        add(sample_generic_scene(rng), "base", [], "merge", 1000 + i)
    for name in CONCEPTS:
        for i in range(per_lora):
            add(sample_concept_scene(name, rng), f"lora:{name}", [name], "merge", 2000 + i)
    for n in range(2, 6):
        sets = composition_sets(n)
        for i in range(per_n):
            names = sets[int(rng.integers(len(sets)))]
            add(composition_scene(names, rng), f"N={n}", list(names), METHODS[i % len(METHODS)], 3000 + i)
    return entries


def save_candidates(folder: str | Path, entries: list[dict], columns: int = 5, per_sheet: int = 20) -> Path:
    """The images as ``NNN.png``, ``labels.json`` (without images) and ``sheet-K.png``
    contact sheets of ``per_sheet`` numbered pictures, 3× enlarged, to label from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, entry in enumerate(entries):
        name = f"{i:03d}.png"
        entry["image"].save(folder / name)
        records.append({"file": name, **{k: v for k, v in entry.items() if k != "image"}})
    for k, start in enumerate(range(0, len(entries), per_sheet)):
        tiles = [_numbered(e["image"], start + j) for j, e in enumerate(entries[start : start + per_sheet])]
        contact_sheet(tiles, columns=columns, scale=1).save(folder / f"sheet-{k}.png")
    with atomic_open(folder / LABELS, "w") as handle:
        json.dump({"images": records}, handle, indent=1)
    return folder / LABELS


def _numbered(image: Image.Image, index: int) -> Image.Image:
    tile = image.convert("RGB").resize((image.width * 3, image.height * 3), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (tile.width, tile.height + 12), "white")
    canvas.paste(tile, (0, 12))
    ImageDraw.Draw(canvas).text((2, 0), str(index), fill="black")
    return canvas


def agreement(folder: str | Path) -> dict:
    """The detectors against the labels of ``folder/labels.json``: per slot and per
    concept, the share of labelled verdicts the detector shares (rate, Wilson interval,
    count), and in all. Entries whose ``seen`` is empty are skipped."""
    folder = Path(folder)
    records = json.loads((folder / LABELS).read_text(encoding="utf-8"))["images"]
    by_slot: dict[str, list[bool]] = defaultdict(list)
    by_concept: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if not record.get("seen"):
            continue
        scene = scene_from_dict(record["scene"])
        with Image.open(folder / record["file"]) as image:
            verdicts = slot_check(image.convert("RGB"), scene)
        for slot, seen in record["seen"].items():
            same = verdicts[slot] == seen
            by_slot[slot].append(same)
            name = _concept_in(scene, slot)
            if name:
                by_concept[name].append(same)
    every = [v for values in by_slot.values() for v in values]
    return {"slots": {k: rate(v) for k, v in sorted(by_slot.items())},
            "concepts": {k: rate(v) for k, v in sorted(by_concept.items())}, "all": rate(every)}  # fmt: skip


def _concept_in(scene: Scene, slot: str) -> str | None:
    value = {"figure": scene.figure.kind, "partner": scene.partner.kind if scene.partner else None}.get(slot)
    value = value if slot in ("figure", "partner") else getattr(scene, slot)
    return value if value in CONCEPTS else None
