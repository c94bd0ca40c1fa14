"""The controls artists already use in AUTOMATIC1111 and its extensions.

- ``<lora:name:weight>`` in a prompt selects a library LoRA and its weight; the tag is
  removed from the text the encoder sees (``<lora:name>`` means weight 1). As in A1111,
  ``<lora:name:te:unet>`` gives the text encoder and the UNet different weights (the UNet's
  defaults to the text encoder's), and the named forms ``te=``, ``unet=`` do the same;
  ``lbw=`` gives block weights (sd-webui-lora-block-weight), ``start=``/``stop=`` or
  ``step=A-B`` the steps the LoRA acts on (the same extension: from step ``A``, counting
  from 0, until before step ``B``). ``<lyco:...>`` is an alias, as in A1111.
- A weight may be a *schedule* over the generation's progress ``p`` in [0, 1], written
  as loractl does: ``"0@0,1@0.5"`` is 0 at the start, rising linearly to 1 at half way
  and 1 after. Points are ``weight@p`` separated by commas; before the first point and
  after the last the weight is constant. The text encoder runs once, before the steps: it
  uses a schedule's first value.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

MAX_WEIGHT = 100.0
"""The largest LoRA weight in magnitude (:data:`compose.checks.MAX_WEIGHT`); beyond it the
factors overflow and the latents become NaN."""

LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)((?::[^:>]*)*)>")
Weight = float | str
IGNORED_KEYS = ("hr", "hrte", "hrunet")
"""loractl's weights for a hires-fix pass, which compose does not run."""
TAG_KEYS = ("te", "unet", "lbw", "start", "stop", "step", *IGNORED_KEYS)


class LoRAUse(NamedTuple):
    """One LoRA in a generation: its UNet weight (a number or a schedule), optional block
    weights (:mod:`compose.block_weights`: a preset name or a vector), the text encoders'
    weight where it differs from the UNet's (``None``: the same), and the steps
    ``(start, stop)`` it acts on (``stop`` ``None``: to the end; ``None``: all)."""

    name: str
    weight: Weight = 1.0
    blocks: str | None = None
    text: Weight | None = None
    steps: tuple[int, int | None] | None = None


def extract_lora_tags(prompt: str) -> tuple[str, list[LoRAUse]]:
    """``(prompt without the tags, [LoRAUse, ...])`` in tag order; a malformed tag raises
    ``ValueError`` naming it."""
    tags = [parse_tag(match.group(0), match.group(1), match.group(2)) for match in LORA_TAG.finditer(prompt)]
    text = LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"\s{2,}", " ", text).strip(" ,")
    return text, tags


def parse_tag(tag: str, name: str, rest: str) -> LoRAUse:
    """One tag's :class:`LoRAUse`, read as A1111 reads ``<lora:name:positional...:key=value...>``."""
    positional, named = [], {}
    for item in (p.strip() for p in rest.split(":")[1:]):
        key, sep, value = item.partition("=")
        if not sep:
            positional.append(item)
        elif key.strip() not in TAG_KEYS:
            raise ValueError(f"{tag}: unknown option {key.strip()!r} (known: {', '.join(TAG_KEYS)}; "
                             "dyn= is not supported)")  # fmt: skip
        else:
            named[key.strip()] = value.strip()
    _tag_name(tag, name.strip())
    if len(positional) > 2:
        raise ValueError(f"{tag}: at most two weights (text encoder, UNet); the third, A1111's dyn, is not supported")
    text = _tag_weight(tag, "weight", named.get("te", positional[0] if positional else "1"))
    unet = _tag_weight(tag, "UNet weight", named.get("unet", positional[1] if len(positional) > 1 else None))
    blocks = named.get("lbw") or None
    separate = unet is not None and unet != text
    return LoRAUse(name.strip(), unet if separate else text, blocks, text if separate else None, _tag_steps(tag, named))


def _tag_name(tag: str, name: str) -> None:
    """A tag names a LoRA, never a path: with ``--lora-dir DIR`` the name becomes
    ``DIR/NAME.safetensors``, so ``/``, ``\\`` or ``..`` would read a file outside DIR."""
    bad = next((part for part in ("..", "/", "\\") if part in name), None)
    if bad is not None:
        raise ValueError(f"{tag}: a <lora:NAME> tag names a LoRA, never a path, and {name!r} holds {bad!r}; "
                         "give the LoRA's name (its file name without .safetensors, in --lora-dir or "
                         "loaded with --lora)")  # fmt: skip


def _tag_weight(tag: str, what: str, value: str | None) -> Weight | None:
    if value is None:
        return None
    if not value:
        raise ValueError(f"{tag}: the {what} is empty")
    try:
        number = float(value)
    except ValueError:
        try:
            parse_schedule(value)
        except ValueError as error:
            hint = " (block weights are written lbw=...)" if "@" not in value else ""
            raise ValueError(f"{tag}: the {what} {value!r} is neither a number nor a schedule{hint}: {error}") from None
        return value
    if not math.isfinite(number) or abs(number) > MAX_WEIGHT:
        raise ValueError(f"{tag}: the {what} must be a finite number within -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return number


def _tag_steps(tag: str, named: dict[str, str]) -> tuple[int, int | None] | None:
    """``start=``/``stop=`` or ``step=A-B`` as ``(start, stop)``."""
    if "step" in named:
        if "start" in named or "stop" in named:
            raise ValueError(f"{tag}: give step=A-B or start=/stop=, not both")
        start, sep, stop = named["step"].partition("-")
        if not sep:
            raise ValueError(f"{tag}: step= is a range of steps such as step=0-10")
        named = {**named, "start": start, "stop": stop}
    if "start" not in named and "stop" not in named:
        return None
    try:
        window = (int(named.get("start") or 0), int(named["stop"]) if named.get("stop") else None)
    except ValueError:
        raise ValueError(f"{tag}: start, stop and step take whole step numbers") from None
    return check_steps(tag, window)


def check_steps(what: str, window: object) -> tuple[int, int | None]:
    """A steps window ``(start, stop)``: whole numbers, ``0 <= start < stop``; ``stop`` may be ``None``."""
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    start, stop = window if ok else (None, None)
    ints = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop if stop is not None else 0))
    if not ints or start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"{what}: the steps must be whole numbers with 0 <= start < stop, got {window!r}")
    return start, stop


def a1111_tag(name: str, unet: float, text: float, blocks: str | None, steps: list | None) -> str:
    """The tag A1111 reads for a LoRA at constant weights ``text`` and ``unet`` (its
    extensions read ``lbw=``, ``start=``, ``stop=``; A1111 itself ignores them)."""
    weights = f"{text:g}" if text == unet else f"{text:g}:{unet:g}"
    extra = [f"lbw={blocks}"] if blocks else []
    if steps:
        extra += [f"start={steps[0]}"] + ([f"stop={steps[1]}"] if steps[1] is not None else [])
    return f"<lora:{name.replace(':', '')}:{':'.join([weights, *extra])}>"


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """``"0@0,1@0.5"`` → ``[(p, weight), ...]`` sorted by ``p``."""
    points = []
    for part in text.split(","):
        weight, sep, progress = part.strip().partition("@")
        try:
            point = (float(progress), float(weight))
        except ValueError:
            raise ValueError(f"weight schedule {text!r}: expected points like 0@0,1@0.5 (weight@progress)") from None
        if not sep or not 0.0 <= point[0] <= 1.0:
            raise ValueError(f"weight schedule {text!r}: each point is weight@progress with progress in [0, 1]")
        if not math.isfinite(point[1]) or abs(point[1]) > MAX_WEIGHT:
            raise ValueError(f"weight schedule {text!r}: weight {point[1]:g} is not a finite number within "
                             f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")  # fmt: skip
        points.append(point)
    return sorted(points)


def schedule_value(points: list[tuple[float, float]], progress: float) -> float:
    """The piecewise-linear schedule at ``progress``."""
    if progress <= points[0][0]:
        return points[0][1]
    for (p0, w0), (p1, w1) in zip(points, points[1:], strict=False):
        if progress <= p1:
            return w0 + (w1 - w0) * (progress - p0) / (p1 - p0) if p1 > p0 else w1
    return points[-1][1]


def weight_table(weights: list[Weight], steps: int) -> torch.Tensor:
    """``(steps, N)`` weights per step: constants repeat, schedules are read at
    ``p = step / steps``."""
    import torch

    columns = []
    for weight in weights:
        if isinstance(weight, str):
            points = parse_schedule(weight)
            columns.append([schedule_value(points, i / steps) for i in range(steps)])
        else:
            columns.append([float(weight)] * steps)
    return torch.tensor(columns, dtype=torch.float32).reshape(len(weights), steps).T


def step_mask(windows: list[tuple[int, int | None] | None], steps: int) -> torch.Tensor:
    """``(steps, N)``: 1 where a LoRA acts (its ``(start, stop)`` window, or every step), else 0."""
    import torch

    mask = torch.ones(steps, len(windows))
    for column, window in enumerate(windows):
        if window is not None:
            mask[: window[0], column] = 0.0
            mask[window[1] if window[1] is not None else steps :, column] = 0.0
    return mask


def without_phrases(prompt: str, phrases: list[str]) -> str:
    """``prompt`` with every whole-word occurrence of ``phrases`` removed (case-insensitive),
    and the commas and spaces left behind tidied: what the prompt says without them."""
    for phrase in sorted(filter(None, phrases), key=len, reverse=True):
        prompt = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    prompt = re.sub(r"\s+", " ", prompt)
    prompt = re.sub(r"\s*,(\s*,)+", ",", prompt)
    return re.sub(r"\s+,", ",", prompt).strip(" ,")
