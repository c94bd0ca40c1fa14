"""Concept presence on the demo world: which of a composition's concepts an image shows.

CLIPScore correlates poorly with people's judgement of a composition (the Multi-LoRA
paper reports r = -0.006); on the demo world the detectors say exactly whether each
concept is there. A composition qualifies when every LoRA is named after a demo-world
concept (the demo world's own library does this).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from ..demo_world import CONCEPTS, IMAGE_SIZE, detect


def concept_presence(image: Image.Image, names: Sequence[str]) -> dict[str, float] | None:
    """``{"concepts_present": share of the concepts found, "all_present": 1.0 or 0.0}``,
    or ``None`` when the LoRAs are not demo-world concepts."""
    if not names or any(name not in CONCEPTS for name in names):
        return None
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    found = detect(image.convert("RGB"))
    present = [found[name] for name in names]
    return {"concepts_present": sum(present) / len(present), "all_present": float(all(present))}
