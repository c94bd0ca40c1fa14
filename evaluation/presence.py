"""Concept presence on the demo world: which of a composition's concepts an image shows.

CLIPScore correlates poorly with people's judgement of a composition (the Multi-LoRA
paper reports r = -0.006); on the demo world the detectors say exactly whether each
concept is there. A composition qualifies when every LoRA is named after a demo-world
concept (the demo world's own library does this).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image

from ..demo_world import CONCEPTS, IMAGE_SIZE, detect
from ..demo_world.detectors import side_of


def concept_presence(image: Image.Image, names: Sequence[str],
                     sides: Mapping[str, str] | None = None) -> dict[str, float | list[str]] | None:  # fmt: skip
    """``{"concepts_present": share of the concepts found, "all_present": 1.0 or 0.0,
    "missing": the names not found}``, or ``None`` when the LoRAs are not demo-world
    concepts. A concept that ``sides`` puts on the left or the right counts only when it is
    found on that side, and ``"sides_present"`` (1.0 or 0.0) says whether every such
    concept is (both characters of a two-character scene, whatever the background)."""
    if not names or any(name not in CONCEPTS for name in names):
        return None
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    image = image.convert("RGB")
    found = detect(image)
    present = {name: found[name] and (sides is None or name not in sides or side_of(image, name) == sides[name])
               for name in names}  # fmt: skip
    result: dict[str, float | list[str]] = {
        "concepts_present": sum(present.values()) / len(present),
        "all_present": float(all(present.values())),
        "missing": [name for name in names if not present[name]],
    }
    if sides:
        result["sides_present"] = float(all(present[name] for name in sides))
    return result
