"""PNG metadata that artists' tools read, and that reproduces an image exactly.

Two text chunks: ``parameters`` in the format AUTOMATIC1111 writes (read by its PNG
Info tab and by Civitai), and ``compose`` with a JSON record of every setting. Files
are written atomically (:func:`compose.files.atomic_open`).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .files import atomic_open

PARAMETERS_KEY = "parameters"
RECORD_KEY = "compose"


def _weight(weight: float | str) -> str:
    return weight if isinstance(weight, str) else f"{weight:g}"


def a1111_parameters(record: dict) -> str:
    """The A1111 ``parameters`` text for a generation record.

    ``prompt``, then ``Negative prompt: ...``, then one line of ``Key: value`` pairs;
    the fields A1111 does not know (``Composition method`` ...) are kept by its PNG
    Info and by Civitai as extra fields.
    """
    loras = record["loras"]
    fields = [
        ("Steps", record["steps"]),
        ("Sampler", record["sampler"]),
        ("CFG scale", record["guidance_scale"]),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model", record["model"]),
    ]
    if loras:
        hashes = ", ".join(f"{lora['name']}: {lora['a1111_hash']}" for lora in loras)
        fields.append(("Lora hashes", f'"{hashes}"'))
        weights = ", ".join(f"{lora['name']}: {_weight(lora['weight'])}" for lora in loras)
        fields.append(("Lora weights", f'"{weights}"'))
        fields.append(("Lora scale", f"{record['lora_scale']:g}"))
    fields.append(("Composition method", record["method"]["name"]))
    params = record["method"]["parameters"]
    if params:
        text = ", ".join(f"{k}={v}" for k, v in params.items())
        fields.append(("Composition parameters", f'"{text}"'))
    fields.append(("Version", f"compose {record['versions']['compose']}"))
    line = ", ".join(f"{k}: {v}" for k, v in fields)
    return f"{record['prompt']}\nNegative prompt: {record['negative_prompt']}\n{line}"


def attach(image: Image.Image, record: dict) -> Image.Image:
    """Store the record on ``image.info`` so :func:`save_png` and viewers find it."""
    image.info[PARAMETERS_KEY] = a1111_parameters(record)
    image.info[RECORD_KEY] = json.dumps(record, sort_keys=True)
    return image


def read_record(path: str | Path) -> dict:
    """The ``compose`` JSON record of a PNG written by this project."""
    with Image.open(path) as image:
        raw = image.info.get(RECORD_KEY) or getattr(image, "text", {}).get(RECORD_KEY)
    if raw is None:
        raise ValueError(f"{path}: no '{RECORD_KEY}' metadata; it was not made by compose")
    return json.loads(raw)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG with its text chunks, atomically."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key in (PARAMETERS_KEY, RECORD_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])
    with atomic_open(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return path
