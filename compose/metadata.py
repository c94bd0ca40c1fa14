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

import hashlib
import json
import platform
import re
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import checks
from .calls import SamplingConfig
from .files import OutputError, atomic_open
from .prompts import LORA_TAG, a1111_tag, check_steps, extract_lora_tags, parse_schedule, schedule_value

PARAMETERS_KEY = "parameters"
RECORD_KEY = "compose"


TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")
"""A1111's samplers that take no schedule type (it writes "Automatic" for them)."""


def a1111_parameters(record: dict) -> str:
    """The ``parameters`` text A1111 (1.9 and later) writes for the same generation.

    The prompt with a ``<lora:name:weight>`` tag for every LoRA (A1111 and ComfyUI load LoRAs
    only from tags): a tag the prompt has is rewritten, the others are put before the prompt
    or after it so that the tags read in the LoRAs' order (Switch cycles in it). Tags carry
    the effective weights A1111 applies, ``weight * lora_scale``; a schedule, which A1111
    cannot read, is written as its mean over the steps it acts on (the constant of the same
    total effect); the schedule itself stays in the ``compose`` record. Then ``Negative
    prompt: ...`` (omitted when empty, as A1111 does), then one line of ``Key: value`` pairs,
    values quoted as A1111 quotes them. The fields A1111 does not know (``Composition method``
    ...) are kept by its PNG Info and by Civitai as extra fields.
    """
    negative = f"\nNegative prompt: {record['negative_prompt']}" if record["negative_prompt"] else ""
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in _fields(record) if value is not None)
    return f"{_a1111_prompt(record)}{negative}\n{line}"


def _fields(record: dict) -> list[tuple[str, object]]:
    sampler, schedule = record["sampler"], record.get("schedule_type")
    if sampler.endswith(" Karras"):  # A1111 before 1.9 named the schedule in the sampler
        sampler, schedule = sampler.removesuffix(" Karras"), "Karras"
    loras = record["loras"]
    params = record["method"]["parameters"]
    return [
        ("Steps", record["steps"]),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", record["guidance_scale"]),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", record.get("model_hash")),
        ("Model", model_short_name(record["model"])),
        ("RNG", "CPU"),
        ("Pad conds", True if record.get("pad_conds") else None),
        ("Lora hashes", ", ".join(f"{a1111_hash_name(e['name'])}: {e['a1111_hash']}" for e in loras) or None),
        ("Lora weights", ", ".join(f"{e['name']}: {_weight(e['weight'])}" for e in loras) or None),
        ("Lora scale", f"{record['lora_scale']:g}" if loras else None),
        ("Composition method", record["method"]["name"]),
        ("Composition parameters", ", ".join(f"{k}={v}" for k, v in params.items()) or None),
        ("Version", f"compose {record['versions']['compose']}"),
    ]


def _weight(weight: float | str) -> str:
    return weight if isinstance(weight, str) else f"{weight:g}"


def _quote(value: object) -> str:
    """A1111's ``infotext_utils.quote``: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_hash_name(name: str) -> str:
    """A LoRA's name as A1111 writes it in ``Lora hashes``: without ``:`` and ``,``."""
    return name.replace(":", "").replace(",", "")


def _a1111_prompt(record: dict) -> str:
    entries = {entry["name"]: entry for entry in record["loras"]}
    tagged: set[str] = set()

    def rewrite(match: re.Match) -> str:
        name = match.group(1).strip()
        if name not in entries:
            return match.group(0)
        tagged.add(name)
        return _tag(entries[name], record)

    prompt = LORA_TAG.sub(rewrite, record["prompt"])
    order = [entry["name"] in tagged for entry in record["loras"]]
    first = order.index(True) if True in order else 0
    before = [_tag(e, record) for e in record["loras"][:first] if e["name"] not in tagged]
    after = [_tag(e, record) for e in record["loras"][first:] if e["name"] not in tagged]
    return " ".join([*before, prompt, *after]).strip()


def _tag(entry: dict, record: dict) -> str:
    scale, window = record["lora_scale"], entry.get("step_window")
    unet = plain_weight(entry["weight"], record["steps"], window) * scale
    text = entry.get("text_weight")
    text = plain_weight(entry["weight"] if text is None else text, 1, None) * scale  # the encoders' first value
    return a1111_tag(entry["name"], unet, text, entry.get("blocks"), window)


def plain_weight(weight: float | str | None, steps: int, window: list | None) -> float:
    """A weight as one number: a schedule's mean over the steps it acts on (``window``),
    read as :func:`compose.prompts.weight_table` reads it."""
    if not isinstance(weight, str):
        return float(weight)
    points = parse_schedule(weight)
    start, stop = window or (0, None)
    active = range(start, min(stop or steps, steps)) or range(steps)
    return sum(schedule_value(points, i / steps) for i in active) / len(active)


def schedule_type(scheduler: str, config: dict) -> str:
    """The A1111 "Schedule type" of what ``scheduler`` does with a model's scheduler ``config``:
    Karras or Exponential sigmas by name; else by the config's timestep spacing, "leading"
    being A1111's DDIM schedule (timesteps 1, 1 + 1000 // n, ...) and "linspace"/"trailing"
    its SGM Uniform (the same evenly spaced timesteps, which diffusers rounds to integers).
    A1111's DDIM, PLMS and UniPC samplers take no schedule; it writes "Automatic" for them."""
    from .schedulers import SCHEDULERS

    _, overrides, sampler = SCHEDULERS[scheduler]
    settings = {**config, **overrides}
    if settings.get("use_karras_sigmas"):
        return "Karras"
    if settings.get("use_exponential_sigmas"):
        return "Exponential"
    if sampler in TIMESTEP_SAMPLERS:
        return "Automatic"
    return "DDIM" if settings.get("timestep_spacing", "linspace") == "leading" else "SGM Uniform"


def model_short_name(model: str) -> str:
    """The ``Model`` A1111 writes: a checkpoint's file stem (a folder's name, a Hub id's last
    part), not a path."""
    path = Path(model)
    if path.is_file():
        return path.stem
    return model.rstrip("/").rsplit("/", 1)[-1] if "/" in model else model


def model_hash(model: str) -> str | None:
    """A1111's ``Model hash`` of a single-file checkpoint: the first 10 hex digits of the
    file's sha256 (cached by path, size and time). ``None`` for a diffusers folder, a Hub id
    or a built-in model: A1111 and Civitai match the hash against checkpoint files, and a
    folder is none, so a hash of its UNet weights would match nothing and only mislead."""
    path = Path(model)
    if not path.is_file():
        return None
    stat = path.stat()
    return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _file_hash(path: str, size: int, mtime: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


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
    text = entry.get("text_weight")
    if isinstance(text, str):
        parse_schedule(text)
    elif text is not None:
        checks.weight(f"{name!r} (text encoder)", text)
    if entry.get("step_window") is not None:
        check_steps(f"loras[{index}].step_window", entry["step_window"])


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


def versions() -> dict[str, str]:
    """The versions of the libraries that drew an image (``compose`` is "source" when run
    from a checkout that was not installed), for its record; read once per process (each
    read opens the packages' metadata on disk), a fresh copy per call."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    names = ("compose-lora", "diffusers", "torch", "transformers")
    found = {name: version(name) for name in names[1:]}
    try:
        found["compose"] = version(names[0])
    except Exception:
        found["compose"] = "source"
    found["python"] = platform.python_version()
    return found


def lora_entry(lora, use) -> dict:
    """The record of one LoRA of a call: which file (name, sha256, A1111's short hash), at
    what weights and blocks, and what the file says it is (``lora``: a
    :class:`~compose.loading.LoRA`; ``use``: its :class:`~compose.prompts.LoRAUse`)."""
    return {
        "name": lora.name,
        "file": Path(lora.path).name,
        "sha256": lora.sha256,
        "a1111_hash": lora.short_hash,
        "weight": use.weight,
        "text_weight": use.text,
        "step_window": None if use.steps is None else list(use.steps),
        "blocks": use.blocks,
        "category": lora.category,
        "triggers": lora.triggers,
    }


def generate_kwargs(record: dict) -> dict:
    """The :meth:`Composer.generate` arguments that reproduce a ``compose`` record (its
    ``loras`` already include the prompt's ``<lora:...>`` tags, so the tags are dropped),
    the record's steps, guidance, size and scheduler as ``sampling``. The record is
    checked first (:func:`check_record`): it may be forged."""
    record = check_record(record)
    return {
        "prompt": extract_lora_tags(record["prompt"])[0],
        "loras": [
            (lora["name"], lora["weight"], lora.get("blocks"), lora.get("text_weight"), lora.get("step_window"))
            for lora in record["loras"]
        ],
        "method": record["method"]["name"],
        "method_params": record["method"]["parameters"],
        "negative_prompt": record["negative_prompt"],
        "seed": record["seed"],
        "lora_scale": record["lora_scale"],
        "sampling": SamplingConfig(
            steps=record["steps"],
            guidance_scale=record["guidance_scale"],
            width=record["width"],
            height=record["height"],
            scheduler=record["scheduler"],
        ),
    }
