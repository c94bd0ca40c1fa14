"""The labelled set: generated pictures, each slot marked right or wrong by a person.

The detectors are checked on renders by construction; on *generated* pictures only an
eye can say whether the hat is there. :func:`candidates` generates a varied set (the
base on generic prompts, each LoRA alone, compositions of every N by several methods),
:func:`save_candidates` writes them with a numbered contact sheet to look at, and a
person fills each entry's ``seen``: per slot of the scene asked, whether the picture
shows it. :func:`agreement` then compares the detectors' verdicts
(:func:`~compose.demo_world.detectors.slot_check`) with those labels, per slot and per
concept.

``labels.json``: ``{"images": [{"file", "kind", "method", "scene", "caption", "seen",
"split", "model"}]}``, ``scene`` as :func:`scene_to_dict` writes it, ``seen`` ``{slot:
true/false}``, ``split`` ``"tune"`` or ``"held-out"`` (one picture in three, in every
kind, fixed when the pictures are saved) and ``model`` the world that drew it
(:func:`model_id`).

The rule the eye labels by is strict: a slot is right only where what it asks is
recognisable by its identity, its hue *and* its shape (a charcoal key is not the pink
brakka key, a green blob is not the zorbo creature, a blue smear is not flimbo's hat); a
slot that asks nothing is right when nothing is drawn there. Tuning the detectors reads
only the ``tune`` split (:func:`records`); the ``held-out`` split measures them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..calls import SamplingConfig
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
SPLITS = ("tune", "held-out")
HELD_OUT_EVERY = 3
"""Every third picture of a batch, counted from its first, is held out."""


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
        image = composer.generate(
            scene.caption(), loras, method, seed=image_seed, sampling=SamplingConfig(steps=steps)
        )[0]
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


def model_id(world: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of a world folder's UNet weights: which
    trained world drew a labelled picture."""
    import hashlib

    weights = next(iter(sorted((Path(world) / "unet").glob("*.safetensors"))))
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def save_candidates(folder: str | Path, entries: list[dict], model: str | None = None, columns: int = 5,
                    per_sheet: int = 20) -> Path:  # fmt: skip
    """Add the images to ``folder`` as ``NNN.png``, numbered after those already there, and
    their records (without images) to ``labels.json``, each with its ``split`` and
    ``model``; and ``sheet-NNN.png`` contact sheets of ``per_sheet`` numbered pictures, 3×
    enlarged, to label from (named by their first picture; the shipped set keeps none)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LABELS
    records = json.loads(path.read_text(encoding="utf-8"))["images"] if path.is_file() else []
    first = len(records)
    for i, entry in enumerate(entries):
        name = f"{first + i:03d}.png"
        entry["image"].save(folder / name)
        split = SPLITS[i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        records.append({"file": name, **{k: v for k, v in entry.items() if k != "image"}, "split": split,
                        "model": model})  # fmt: skip
    for start in range(0, len(entries), per_sheet):
        tiles = [_numbered(e["image"], first + start + j) for j, e in enumerate(entries[start : start + per_sheet])]
        contact_sheet(tiles, columns=columns, scale=1).save(folder / f"sheet-{first + start:03d}.png")
    with atomic_open(path, "w") as handle:
        json.dump({"images": records}, handle, indent=1)
    return path


def _numbered(image: Image.Image, index: int | str) -> Image.Image:
    tile = image.convert("RGB").resize((image.width * 3, image.height * 3), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (tile.width, tile.height + 12), "white")
    canvas.paste(tile, (0, 12))
    ImageDraw.Draw(canvas).text((2, 0), str(index), fill="black")
    return canvas


def pictures(folder: str | Path) -> int:
    """How many pictures ``folder/labels.json`` holds, labelled or not (0 without one)."""
    path = Path(folder) / LABELS
    return len(json.loads(path.read_text(encoding="utf-8"))["images"]) if path.is_file() else 0


def records(folder: str | Path, split: str | None = None) -> list[dict]:
    """The labelled records of ``folder/labels.json`` (those whose ``seen`` is filled), of
    one ``split`` or of both. A record from before splits existed counts as ``tune``."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    every = json.loads((Path(folder) / LABELS).read_text(encoding="utf-8"))["images"]
    return [r for r in every if r.get("seen") and split in (None, r.get("split", "tune"))]


def agreement(folder: str | Path, split: str | None = "held-out") -> dict:
    """The detectors against the labels of ``folder/labels.json`` on ``split`` (both when
    None): per slot and per concept, the share of labelled verdicts the detector shares;
    per concept, its false positives, the share of the slots that ask for it and that the
    eye saw without it where the detector says it is there; and agreement in all. Each a
    rate with its Wilson interval and count (:func:`~compose.demo_world.evaluate.rate`)."""
    by_slot: dict[str, list[bool]] = defaultdict(list)
    by_concept: dict[str, list[bool]] = defaultdict(list)
    false_positives: dict[str, list[bool]] = defaultdict(list)
    chosen = records(folder, split)
    for record, _, verdicts in _verdicts(folder, chosen):
        scene = scene_from_dict(record["scene"])
        for slot, seen in record["seen"].items():
            same = verdicts[slot] == seen
            by_slot[slot].append(same)
            name = _concept_in(scene, slot)
            if name:
                by_concept[name].append(same)
                if not seen:
                    false_positives[name].append(verdicts[slot])
    every = [v for values in by_slot.values() for v in values]
    return {"split": split or "all", "images": len(chosen), "slots": {k: rate(v) for k, v in sorted(by_slot.items())},
            "concepts": {k: rate(v) for k, v in sorted(by_concept.items())},
            "false_positives": {k: rate(false_positives.get(k, [])) for k in sorted(by_concept)},
            "all": rate(every)}  # fmt: skip


def _verdicts(folder: str | Path, chosen: list[dict]):
    """Each record of ``chosen`` with its picture (RGB) and the detectors' slot verdicts on it."""
    for record in chosen:
        with Image.open(Path(folder) / record["file"]) as image:
            picture = image.convert("RGB")
        yield record, picture, slot_check(picture, scene_from_dict(record["scene"]))


def disagreement_sheet(folder: str | Path, split: str | None = "tune", columns: int = 6) -> Image.Image | None:
    """The pictures of ``split`` where the detectors and the eye disagree on a slot, 3×
    enlarged, each titled with its number and, per such slot, what the eye saw (``+``
    right, ``-`` wrong) against the detectors: the page to tune the detectors from (or
    ``None`` when they agree on every picture)."""
    tiles = []
    for record, picture, verdicts in _verdicts(folder, records(folder, split)):
        seen = record["seen"]
        differ = [f"{slot[:4]}{'+' if seen[slot] else '-'}" for slot in seen if verdicts[slot] != seen[slot]]
        if differ:
            tiles.append(_numbered(picture, f"{record['file'][:-4]} eye {' '.join(differ)}"))
    return contact_sheet(tiles, columns=columns) if tiles else None


def _concept_in(scene: Scene, slot: str) -> str | None:
    value = {"figure": scene.figure.kind, "partner": scene.partner.kind if scene.partner else None}.get(slot)
    value = value if slot in ("figure", "partner") else getattr(scene, slot)
    return value if value in CONCEPTS else None
