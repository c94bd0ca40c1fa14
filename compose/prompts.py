"""The controls artists already use in AUTOMATIC1111 and its extensions.

- ``<lora:name:weight>`` in a prompt selects a library LoRA and its weight; the tag is
  removed from the text the encoder sees (``<lora:name>`` means weight 1).
- A weight may be a *schedule* over the generation's progress ``p`` in [0, 1], written
  as loractl does: ``"0@0,1@0.5"`` is 0 at the start, rising linearly to 1 at half way
  and 1 after. Points are ``weight@p`` separated by commas; before the first point and
  after the last the weight is constant.
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

LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")
Weight = float | str


class LoRAUse(NamedTuple):
    """One LoRA in a generation: its weight (a number or a schedule) and optional block
    weights (:mod:`compose.block_weights`: a preset name or a vector)."""

    name: str
    weight: Weight = 1.0
    blocks: str | None = None


def extract_lora_tags(prompt: str) -> tuple[str, list[LoRAUse]]:
    """``(prompt without the tags, [LoRAUse, ...])`` in tag order.

    ``<lora:name>``, ``<lora:name:weight>`` and A1111's block-weight form
    ``<lora:name:weight:lbw=PRESET_OR_VECTOR>``; ``weight`` may be a schedule.
    """
    tags = []
    for name, rest in LORA_TAG.findall(prompt):
        parts = [p.strip() for p in rest.split(":")[1:]]
        blocks = next((p.removeprefix("lbw=") for p in parts if p.startswith("lbw=")), None)
        numbers = [p for p in parts if p and not p.startswith("lbw=")]
        weight: Weight = numbers[0] if numbers else "1"
        try:
            weight = float(weight)
        except ValueError:
            parse_schedule(weight)
        else:
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise ValueError(f"<lora:{name.strip()}:{numbers[0]}>: the weight must be a finite number within "
                                 f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")  # fmt: skip
        tags.append(LoRAUse(name.strip(), weight, blocks))
    text = LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"\s{2,}", " ", text).strip(" ,")
    return text, tags


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


def without_phrases(prompt: str, phrases: list[str]) -> str:
    """``prompt`` with every whole-word occurrence of ``phrases`` removed (case-insensitive),
    and the commas and spaces left behind tidied: what the prompt says without them."""
    for phrase in sorted(filter(None, phrases), key=len, reverse=True):
        prompt = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    prompt = re.sub(r"\s+", " ", prompt)
    prompt = re.sub(r"\s*,(\s*,)+", ",", prompt)
    return re.sub(r"\s+,", ",", prompt).strip(" ,")
