"""X/Y plots: a grid of images, one setting varied along each axis, as AUTOMATIC1111 draws them.

An :class:`Axis` names what it varies (``method``, ``weight:<LoRA name>``, ``seed``, ``steps``,
``guidance``, ``lora_scale``) and its values; :func:`parse_axis` reads the values the way A1111's
X/Y/Z plot script does (``1, 2, 3``; ``1-5``; ``0-1 (+0.25)``; ``0-1 [5]``). :func:`xy_plot`
generates every cell with its own :meth:`compose.Composer.generate` call, so each cell is exactly
the image its settings give alone (and carries that image's own PNG record), and draws the
labelled grid. :meth:`XYPlot.save` writes the grid with the settings of every cell, which
:func:`read_xy` reads back.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from . import calls, checks
from .calls import RunOptions, SamplingConfig
from .composer import Composer
from .files import OutputError, atomic_open
from .metadata import PARAMETERS_KEY, RECORD_KEY, RecordError, check_record
from .methods import METHODS
from .prompts import extract_lora_tags
from .sheets import contact_sheet

XY_KEY = "compose_xy"
"""The PNG text chunk of a saved grid: JSON with the base settings, the axes and every cell's record."""
MAX_VALUES = 16
MAX_CELLS = 64
"""At most this many values per axis and cells per plot: each cell is a full generation."""
MIN_TILE = 128
"""Cells smaller than this (pixels, the shorter side) are enlarged with nearest-neighbour so
that labels and pixels stay legible; larger ones are drawn at their size."""
GAP = 2
"""Pixels between tiles (:func:`compose.sheets.contact_sheet`'s ``gap``)."""

KINDS = ("method", "weight:<LoRA name>", "seed", "steps", "guidance", "lora_scale")
_SETTINGS = {"method": "method", "seed": "seed", "steps": "steps", "guidance": "guidance_scale",
             "lora_scale": "lora_scale", "weight": "loras"}  # fmt: skip
_SAMPLING = {field.name for field in fields(SamplingConfig)}
"""Settings an axis sets in the cell's ``sampling`` rather than as a keyword of its own."""
_WHOLE = ("seed", "steps")
_REFUSED = ("callback", "output_type", "return_masks")
""":class:`~compose.calls.RunOptions` a plot sets itself: one image per cell, its own step callback."""
_NUMBER = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?")
"""``start-end``, ``start-end (+step)`` or ``start-end [count]``, both ends included."""

CellCallback = Callable[[int, int, Image.Image], None]
"""Called after each cell with ``(cells done, cells in all, the cell's image)``."""


def _base_kind(kind: str) -> str:
    """``kind`` without a weight axis' LoRA name, or ``ValueError`` for an unknown kind."""
    base, colon, lora = kind.partition(":")
    if base == "weight" and colon and lora.strip():
        return base
    if base in _SETTINGS and base != "weight" and not colon:
        return base
    raise ValueError(f"unknown X/Y axis {kind!r}: choose one of {', '.join(KINDS)}")


def _check_count(kind: str, count: int) -> None:
    if count > MAX_VALUES:
        raise ValueError(f"{kind} axis: {count} values is more than the {MAX_VALUES} an axis may have "
                         f"(and a plot at most {MAX_CELLS} cells)")  # fmt: skip


def _checked_value(kind: str, value: object) -> str | int | float:
    """One axis value checked as :meth:`Composer.generate` checks its setting, the message
    naming the axis."""
    base = _base_kind(kind)
    try:
        if base == "method":
            if not (isinstance(value, str) and value in METHODS):
                raise ValueError(f"unknown method {value!r}: choose one of {', '.join(METHODS)}")
            return value
        if base == "seed":
            return checks.seed(value)
        if base == "steps":
            return checks.integer("steps", value, 1)
        if base == "guidance":
            return checks.number("guidance", value, 0.0, checks.MAX_GUIDANCE)
        if base == "lora_scale":
            return checks.number("lora_scale", value, -checks.MAX_WEIGHT, checks.MAX_WEIGHT)
        return checks.weight(repr(kind.partition(":")[2]), value)
    except ValueError as error:
        raise ValueError(f"{kind} axis: {error}") from None


@dataclass(frozen=True)
class Axis:
    """What one side of the grid varies: ``kind`` (``method``, ``weight:<LoRA name>``, ``seed``,
    ``steps``, ``guidance``, ``lora_scale``) and its ``values``, in the order drawn: method
    names, ints for seed and steps, floats for the others. Checked on construction (1 to
    :data:`MAX_VALUES` values, each valid for its setting); :func:`parse_axis` also checks
    them against a composer (loaded LoRAs, the step limit)."""

    kind: str
    values: tuple

    def __post_init__(self) -> None:
        _base_kind(self.kind)
        if not self.values:
            raise ValueError(f"{self.kind} axis: no values given")
        _check_count(self.kind, len(self.values))
        object.__setattr__(self, "values", tuple(_checked_value(self.kind, value) for value in self.values))

    @property
    def setting(self) -> str:
        """The setting this axis overrides: a :meth:`Composer.generate` keyword (``loras``
        for a weight) or, for steps and guidance, a field of its ``sampling``."""
        return _SETTINGS[_base_kind(self.kind)]

    @property
    def lora(self) -> str | None:
        """The LoRA whose weight a ``weight:<name>`` axis varies; ``None`` for the other kinds."""
        return self.kind.partition(":")[2].strip() if self.setting == "loras" else None

    @property
    def title(self) -> str:
        """The axis' name as the grid's corner shows it."""
        return f"{self.lora} weight" if self.lora else self.kind

    def labels(self) -> list[str]:
        """The values as the grid shows them (three significant digits, no trailing zeros)."""
        return [f"{value:.3g}" if isinstance(value, float) else str(value) for value in self.values]

    def as_json(self) -> dict:
        """``{kind, values}``, as the grid's ``compose_xy`` chunk records the axis."""
        return {"kind": self.kind, "values": list(self.values)}


def _number(kind: str, text: str, whole: bool) -> int | float:
    text = re.sub(r"\s+", "", text)
    try:
        return int(text) if whole else float(text)
    except ValueError:
        what = "a whole number" if whole else "a number"
        raise ValueError(f"{kind} axis: {text!r} is not {what} (give values like 1, 2, 3 or ranges like "
                         "1-5, 0-1 (+0.25), 0-1 [5])") from None  # fmt: skip


def _numbers(kind: str, item: str, whole: bool) -> list[int | float]:
    """One comma-separated item: a number, or an A1111 range with both ends included
    (``start-end`` steps by 1 towards ``end``)."""
    match = _RANGE.fullmatch(item)
    if match is None:
        return [_number(kind, item, whole)]
    start, end = (_number(kind, text, whole) for text in match.group(1, 2))
    step_text, count_text = match.group(3, 4)
    if count_text is not None:
        count = int(count_text)
        if count < 1:
            raise ValueError(f"{kind} axis: {item!r} asks for {count} values; give a count of at least 1")
        _check_count(kind, count)
        values = [start + i * (end - start) / max(1, count - 1) for i in range(count)]
    else:
        step = _number(kind, step_text, whole) if step_text else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise ValueError(f"{kind} axis: {item!r}: a step of {step:g} never goes from {start:g} to {end:g}")
        count = math.floor((end - start) / step + 1e-9) + 1
        _check_count(kind, count)
        values = [start + i * step for i in range(count)]
    return [round(value) if whole else round(value, 10) for value in values]


def _check_fits(axis: Axis, composer: Composer) -> None:
    """What only the composer knows: a weight axis' LoRA is loaded, steps are within its limit."""
    if axis.lora is not None and axis.lora not in composer.loras:
        loaded = ", ".join(composer.loras) or "none"
        raise ValueError(f"{axis.kind} axis: no LoRA named {axis.lora!r} is loaded (loaded: {loaded})")
    if axis.setting == "steps":
        most = composer.limits.steps_limit(composer.shape.train_steps)
        over = [value for value in axis.values if value > most]
        if over:
            raise ValueError(f"{axis.kind} axis: {over[0]} steps is over this model's limit of {most}")


def parse_axis(kind: str, text: str, composer: Composer) -> Axis:
    """An axis from its values as typed in A1111's X/Y plot: comma-separated values; for the
    numeric kinds also ranges ``1-5`` (step 1), ``0-1 (+0.25)`` (that step) and ``0-1 [5]``
    (that many values, evenly spaced), both ends included; method names for ``method``.
    ``ValueError`` names the axis and the value at fault."""
    base = _base_kind(kind)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{kind} axis: no values given (type them comma-separated, e.g. 1, 2, 3)")
    values: list = []
    for item in items:
        values += [item] if base == "method" else _numbers(kind, item, base in _WHOLE)
        _check_count(kind, len(values))
    axis = Axis(kind, tuple(values))
    _check_fits(axis, composer)
    return axis


def _lora_name(entry: object) -> object:
    return entry[0] if isinstance(entry, (tuple, list)) and entry else entry


def _lora_list(loras: object) -> list:
    """``loras`` as :meth:`Composer.generate` takes it (names, pairs, ``{name: weight}``), as a list."""
    if loras is None:
        return []
    if isinstance(loras, (str, dict)):
        return list(loras.items()) if isinstance(loras, dict) else [loras]
    return list(loras)


def _with_weight(loras: list, name: str, weight: float) -> list:
    """``loras`` with ``name`` at ``weight`` (its other fields kept), appended when absent."""
    out = [(name, weight, *(() if isinstance(entry, str) else tuple(entry)[2:])) if _lora_name(entry) == name
           else entry for entry in loras]  # fmt: skip
    return out if any(_lora_name(entry) == name for entry in loras) else [*out, (name, weight)]


def _jsonable(settings: dict) -> dict:
    """``settings`` as the grid records them: ``sampling`` as a dict of its fields."""
    return {key: asdict(value) if is_dataclass(value) else value for key, value in settings.items()}


def _base_settings(settings: dict, axes: Sequence[Axis]) -> tuple[dict, RunOptions]:
    """``settings`` checked for a plot (one prompt, one seed, JSON values since the grid
    records them), ``loras`` as a list, a method object as its name, ``sampling`` filled
    in; and apart, its ``run`` options, which change no pixel and are not recorded."""
    sampling, run = calls.options(settings.get("sampling"), settings.get("run"))
    refused = sorted(key for key in _REFUSED if getattr(run, key) != getattr(RunOptions(), key))
    if refused:
        raise ValueError(f"an X/Y plot makes one image per cell and takes no {', '.join(refused)} setting")
    prompt = settings.get("prompt")
    if not isinstance(prompt, str) or isinstance(settings.get("seed", 0), (list, tuple)):
        raise ValueError("an X/Y plot makes one image per cell: give one prompt and one seed "
                         "(vary the seed on an axis)")  # fmt: skip
    if any(axis.setting == "method" for axis in axes) and settings.get("method_params"):
        raise ValueError("method_params belong to one method; a method axis runs each method with its defaults")
    tagged = {use.name for use in extract_lora_tags(prompt)[1]}
    for axis in axes:
        if axis.lora in tagged:
            raise ValueError(f"{axis.kind} axis: the prompt sets {axis.lora!r} with a <lora:...> tag; "
                             "give it in loras instead to vary its weight")  # fmt: skip
    method = settings.get("method", "merge")
    base = {**{key: value for key, value in settings.items() if key != "run"},
            "loras": _lora_list(settings.get("loras")), "method": method if isinstance(method, str) else method.name,
            "sampling": sampling}  # fmt: skip
    try:
        json.dumps(_jsonable(base), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the X/Y plot settings are saved in the grid, so they must be JSON values: {error}") from None
    return base, run


def _override(cell: dict, axis: Axis, value: str | int | float) -> dict:
    if axis.lora is not None:
        return {**cell, "loras": _with_weight(cell["loras"], axis.lora, value)}
    if axis.setting in _SAMPLING:
        return {**cell, "sampling": replace(cell["sampling"], **{axis.setting: value})}
    return {**cell, axis.setting: value}


@dataclass
class XYPlot:
    """A finished plot. ``cells``: rows (one per ``y`` value, one row without ``y``) of
    ``len(x.values)`` images, each with its own ``parameters`` and ``compose`` metadata;
    ``seconds``: the wall time of each cell's generation, the same shape; ``settings``: the
    base :meth:`Composer.generate` keywords the axes override (``run`` aside); ``grid``: the
    labelled sheet."""

    settings: dict
    x: Axis
    y: Axis | None
    cells: list[list[Image.Image]]
    seconds: list[list[float]]
    grid: Image.Image

    def records(self) -> list[list[dict]]:
        """Each cell's ``compose`` record (:func:`compose.generate_kwargs` reproduces it), by row."""
        return [[json.loads(image.info[RECORD_KEY]) for image in row] for row in self.cells]

    def as_json(self) -> dict:
        """What :meth:`save` writes in the grid's ``compose_xy`` chunk and :func:`read_xy` returns."""
        return {"settings": _jsonable(self.settings), "x": self.x.as_json(), "y": self.y.as_json() if self.y else None,
                "cells": self.records(), "seconds": self.seconds}  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write the grid as PNG, atomically (:func:`compose.files.atomic_open`), with the
        ``compose_xy`` chunk (compressed) and the first cell's A1111 ``parameters``, which
        A1111 also writes on its grids."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise OutputError(f"{path}: an X/Y plot is written as PNG (its settings are kept in PNG text chunks); "
                              "give a name ending in .png")  # fmt: skip
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, self.cells[0][0].info[PARAMETERS_KEY])
        info.add_text(XY_KEY, json.dumps(self.as_json(), sort_keys=True, allow_nan=False), zip=True)
        with atomic_open(path) as handle:
            self.grid.save(handle, format="PNG", pnginfo=info)
        return path


def xy_plot(composer: Composer, settings: dict, x: Axis, y: Axis | None = None,
            callback: CellCallback | None = None, step: Callable | None = None) -> XYPlot:  # fmt: skip
    """Generate one image per cell, row by row: ``settings`` (the keywords of
    :meth:`Composer.generate`, one prompt and one seed) with the cell's ``x`` and ``y`` values
    put in. A weight axis on a LoRA that ``settings["loras"]`` lacks adds it. ``callback``
    is called after each cell, for a UI to show progress; ``step`` is every cell's step
    callback (:class:`~compose.calls.RunOptions`' ``callback``: returning ``False`` stops the
    plot within one step). Everything is checked before the first cell runs."""
    axes = [x] if y is None else [x, y]
    if y is not None and y.kind == x.kind:
        raise ValueError(f"the X and Y axes both vary {x.kind}; give them different kinds")
    total = len(x.values) * (len(y.values) if y else 1)
    if total > MAX_CELLS:
        shape = f"{len(x.values)} x {len(y.values)} = " if y else ""
        raise ValueError(f"an X/Y plot has at most {MAX_CELLS} cells; these axes make {shape}{total}")
    for axis in axes:
        _check_fits(axis, composer)
    base, run = _base_settings(settings, axes)
    run = replace(run, callback=step)
    cells, seconds = [], []
    for y_value in y.values if y else (None,):
        row = base if y is None else _override(base, y, y_value)
        cells.append([])
        seconds.append([])
        for x_value in x.values:
            start = time.perf_counter()
            image = composer.generate(**_override(row, x, x_value), run=run)[0]
            seconds[-1].append(time.perf_counter() - start)
            cells[-1].append(image)
            if callback is not None:
                callback(sum(map(len, cells)), total, image)
    return XYPlot(base, x, y, cells, seconds, draw_grid(cells, x, y))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """``text`` in lines at most ``width`` pixels wide: broken at spaces, a longer word cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
            continue
        while len(word) > 1 and font.getlength(word) > width:
            cut = next((k for k in range(len(word) - 1, 0, -1) if font.getlength(word[:k]) <= width), 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def draw_grid(cells: list[list[Image.Image]], x: Axis, y: Axis | None) -> Image.Image:
    """The cells on a white sheet (:func:`~compose.sheets.contact_sheet`), enlarged
    to at least :data:`MIN_TILE` px, with the ``x`` values over the columns, the ``y`` values
    left of the rows and the axes' names in the top-left corner; the label bands grow to fit
    their text (font size about a twelfth of a tile, 14 to 48 px)."""
    scale = max(1, math.ceil(MIN_TILE / min(cells[0][0].size)))
    tile_w, tile_h = cells[0][0].width * scale, cells[0][0].height * scale
    sheet = contact_sheet([image for row in cells for image in row], columns=len(x.values), scale=scale, gap=GAP)
    size = min(48, max(14, min(tile_w, tile_h) // 12))
    font = ImageFont.load_default(size=size)
    pad, line = size // 2, font.getbbox("Ay")[3] + size // 4
    x_labels = [_wrap(label, font, tile_w - pad) for label in x.labels()]
    y_labels = [_wrap(label, font, tile_w) for label in y.labels()] if y else []
    names = [f"X: {x.title}", *([f"Y: {y.title}"] if y else [])]
    corner = [part for name in names for part in _wrap(name, font, tile_w)]
    left = math.ceil(max(font.getlength(text) for lines in [corner, *y_labels] for text in lines)) + 2 * pad
    top = max(len(lines) for lines in [corner, *x_labels]) * line + 2 * pad
    canvas = Image.new("RGB", (left + sheet.width, top + sheet.height), "white")
    canvas.paste(sheet, (left, top))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(corner):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    for i, lines in enumerate(x_labels):
        centre = left + GAP + i * (tile_w + GAP) + tile_w / 2
        for k, text in enumerate(lines):
            draw.text((centre - font.getlength(text) / 2, top - pad - (len(lines) - k) * line), text,
                      fill="black", font=font)  # fmt: skip
    for j, lines in enumerate(y_labels):
        middle = top + GAP + j * (tile_h + GAP) + (tile_h - len(lines) * line) / 2
        for k, text in enumerate(lines):
            draw.text((left - pad - font.getlength(text), middle + k * line), text, fill="black", font=font)
    return canvas


def _axis_from_json(data: object, name: str) -> Axis:
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not isinstance(data.get("values"), list):
        raise ValueError(f"'{name}' must be an axis {{kind, values}}")
    return Axis(data["kind"], tuple(data["values"]))


def read_xy(path: str | Path) -> dict:
    """The ``compose_xy`` JSON of a grid :meth:`XYPlot.save` wrote: ``settings`` (``sampling``
    as a dict of its fields), the axes ``x`` and ``y`` (``{kind, values}``, ``y`` ``None``
    for one row), ``cells`` (rows of ``compose`` records, each checked by
    :func:`compose.metadata.check_record`, as anyone can write a PNG text chunk) and
    ``seconds`` per cell. :class:`~compose.metadata.RecordError`
    names the file and what is wrong."""
    try:
        with Image.open(path) as image:
            raw = getattr(image, "text", {}).get(XY_KEY)
    except (OSError, ValueError) as error:
        raise RecordError(f"{path}: cannot be read as a PNG image ({error})") from None
    if raw is None:
        raise RecordError(f"{path}: no '{XY_KEY}' metadata; it is not an X/Y plot saved by compose")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise ValueError("it must be an object with the plot's 'settings'")
        x = _axis_from_json(data.get("x"), "x")
        y = None if data.get("y") is None else _axis_from_json(data["y"], "y")
        shape = (len(y.values) if y else 1, len(x.values))
        for key in ("cells", "seconds"):
            rows = data.get(key)
            if not (isinstance(rows, list) and len(rows) == shape[0]
                    and all(isinstance(row, list) and len(row) == shape[1] for row in rows)):  # fmt: skip
                raise ValueError(f"'{key}' must be {shape[0]} rows of {shape[1]}, one per cell")
        for j, row in enumerate(data["cells"]):
            for i, record in enumerate(row):
                check_record(record, f"cell ({i}, {j})")
    except RecursionError:
        raise RecordError(f"{path}: the '{XY_KEY}' record is nested too deeply") from None
    except ValueError as error:
        raise RecordError(f"{path}: the '{XY_KEY}' record is not valid: {error}") from None
    return data
