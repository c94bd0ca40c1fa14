"""PNG metadata that artists' tools read, and that reproduces an image exactly.

Two text chunks: ``parameters`` in the format AUTOMATIC1111 writes (read by its PNG
Info tab and by Civitai), and ``compose`` with a JSON record of every setting. Files
are written atomically (:func:`compose.files.atomic_open`).

A record read back is untrusted (anyone can write a PNG text chunk): :func:`read_record`
checks it against the schema of what :meth:`compose.Composer.generate` writes before
anything uses it, so a forged record is refused with the field at fault instead of
failing with an internal error, or allocating what a billion steps would take.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import checks
from .files import OutputError, atomic_open

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
    image.info[RECORD_KEY] = json.dumps(record, sort_keys=True, allow_nan=False)
    return image


class RecordError(ValueError):
    """A PNG record that cannot be reproduced; the message names the file and the field."""


MAX_RECORD_STEPS = 10_000
MAX_RECORD_SIDE = 16_384
"""No model draws beyond these; a record asking for more is forged or broken, and is
refused before a model is loaded (the model's own, tighter limits apply at generation)."""


def read_record(path: str | Path) -> dict:
    """The ``compose`` JSON record of a PNG written by this project, checked by
    :func:`check_record`."""
    try:
        with Image.open(path) as image:
            raw = image.info.get(RECORD_KEY) or getattr(image, "text", {}).get(RECORD_KEY)
    except OSError as error:
        raise RecordError(f"{path}: cannot be read as an image ({error})") from None
    if raw is None:
        raise RecordError(f"{path}: no '{RECORD_KEY}' metadata; it was not made by compose")
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: the '{RECORD_KEY}' record is not valid JSON ({error.msg})") from None
    except RecursionError:
        raise RecordError(f"{path}: the '{RECORD_KEY}' record is nested too deeply to be a compose record") from None
    return check_record(record, path)


def _require(record: dict, key: str, test: Callable[[object], bool], kind: str) -> object:
    if key not in record:
        raise ValueError(f"'{key}' is missing")
    value = record[key]
    if not test(value):
        raise ValueError(f"'{key}' must be {kind}, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _check_lora(entry: object, index: int) -> None:
    from .prompts import parse_schedule

    if not isinstance(entry, dict):
        raise ValueError(f"loras[{index}] must be an object, got {_shown(entry)}")
    name = _require(entry, "name", _is_str, "a string")
    for key in ("file", "sha256"):
        _require(entry, key, _is_str, "a string")
    weight = _require(entry, "weight", lambda v: _is_str(v) or isinstance(v, (int, float)), "a number or a schedule")
    if isinstance(weight, str):
        parse_schedule(weight)
    else:
        checks.weight(repr(name), weight)
    if entry.get("blocks") is not None:
        _require(entry, "blocks", _is_str, "a block-weight preset or vector")


def _check_method(method: object) -> None:
    from .methods import METHODS

    if not isinstance(method, dict):
        raise ValueError(f"'method' must be an object, got {_shown(method)}")
    name = _require(method, "name", lambda v: v in METHODS, f"one of {', '.join(METHODS)}")
    parameters = _require(method, "parameters", lambda v: isinstance(v, dict), "an object")
    checks.method_parameters(name, METHODS[name], parameters)
    checks.method_values(name, parameters, (MAX_RECORD_SIDE, MAX_RECORD_SIDE))
    for region in (parameters.get("regions") or {}).values() if name == "regional" else ():
        if not (_is_str(region) or (isinstance(region, list) and len(region) == 4)):
            raise ValueError(f"a region must be a box [x0, y0, x1, y1] or a mask file, got {_shown(region)}")
        for value in region if isinstance(region, list) else ():
            checks.number("a region coordinate", value, 0.0, 1.0)


def _check_fields(record: dict) -> None:
    from .schedulers import SCHEDULERS

    for key in ("prompt", "negative_prompt", "model"):
        _require(record, key, _is_str, "a string")
    checks.seed(_require(record, "seed", _is_int, "an integer"))
    steps = _require(record, "steps", _is_int, "an integer")
    checks.integer("'steps'", steps, 1, MAX_RECORD_STEPS)
    for key in ("width", "height"):
        checks.integer(f"'{key}'", _require(record, key, _is_int, "an integer"), 1, MAX_RECORD_SIDE)
    checks.number("'guidance_scale'", record.get("guidance_scale"), 0.0, checks.MAX_GUIDANCE)
    checks.number("'lora_scale'", record.get("lora_scale"), -checks.MAX_WEIGHT, checks.MAX_WEIGHT)
    _require(record, "scheduler", lambda v: v in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}")
    loras = _require(record, "loras", lambda v: isinstance(v, list), "a list")
    for index, entry in enumerate(loras):
        _check_lora(entry, index)
    _check_method(record.get("method"))


def check_record(record: object, source: str | Path = "record") -> dict:
    """``record`` if it has every field :func:`compose.generate_kwargs` needs, of the
    right type and in range; else :class:`RecordError` naming ``source`` and the field."""
    if not isinstance(record, dict):
        raise RecordError(f"{source}: the '{RECORD_KEY}' record must be a JSON object, got {_shown(record)}")
    try:
        _check_fields(record)
    except ValueError as error:
        raise RecordError(f"{source}: the '{RECORD_KEY}' record is not valid: {error}") from None
    return record


def record_masks(record: dict) -> list[str]:
    """The mask files a record's regional parameters name (files on the machine that made it)."""
    regions = record["method"]["parameters"].get("regions") or {} if record["method"]["name"] == "regional" else {}
    return [region for region in regions.values() if isinstance(region, str)]


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG with its text chunks, atomically (:func:`compose.files.atomic_open`
    says which paths are written). A name that does not end in ``.png`` is refused: the
    settings live in PNG text chunks, which another format would not keep."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: compose writes PNG images (the settings are kept in PNG text chunks); "
                          "give a name ending in .png")  # fmt: skip
    info = PngImagePlugin.PngInfo()
    for key in (PARAMETERS_KEY, RECORD_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])
    with atomic_open(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return path
