"""The demo world's LoRA cards: for each concept, a picture of its LoRA alone that shows it.

A card is what an artist judges a LoRA by before using it, so it must show what the
LoRA promises. :func:`card` draws the concept's own scenes
(:func:`~.scenes.sample_concept_scene`, its trigger in a generic context) on the first
few seeds, at the defaults a user gets, and keeps the first picture that the detectors
find right in every slot; :func:`write_cards` saves each beside its LoRA as
``<name>.preview.png``, the name A1111's and ComfyUI's LoRA browsers look for, with the
prompt and seed in its PNG text (so it can be redrawn, and the studio shows it as the
LoRA's card instead of drawing one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..calls import SamplingConfig
from ..composer import Composer
from ..loading import preview_path
from ..metadata import save_png
from .concepts import CONCEPTS
from .detectors import slot_check
from .scenes import Scene, sample_concept_scene
from .world import lora_path

CARD_SEEDS = 8


@dataclass(frozen=True)
class Card:
    """A concept's card: its ``image`` (PNG text included), the ``scene`` asked and its ``seed``."""

    image: Image.Image
    scene: Scene
    seed: int


def card(composer: Composer, name: str, seeds: int = CARD_SEEDS, steps: int = 25) -> Card | None:
    """The first of ``seeds`` pictures of LoRA ``name`` alone on its concept's scenes (scene
    and generation seed alike) that is right in every slot, or ``None`` when none is."""
    scenes = [sample_concept_scene(name, seed) for seed in range(seeds)]
    if not scenes:
        return None
    images = composer.generate(
        [s.caption() for s in scenes], [name], seed=list(range(seeds)), sampling=SamplingConfig(steps=steps)
    )
    for seed, (image, scene) in enumerate(zip(images, scenes, strict=True)):
        if all(slot_check(image, scene).values()):
            return Card(image, scene, seed)
    return None


def write_cards(composer: Composer, world: str | Path, say: Callable[[str], None] | None = None,
                names: list[str] | None = None, seeds: int = CARD_SEEDS) -> dict:  # fmt: skip
    """A card for each concept of ``names`` [all], saved beside its LoRA in ``world``;
    returns per concept its ``seed`` and ``prompt``, or ``None`` where none of ``seeds``
    gave a right picture (its old card, if any, is removed: a card that does not show the
    concept is worse than none)."""
    found = {}
    for name in names or list(CONCEPTS):
        path = preview_path(lora_path(world, name))
        drawn = card(composer, name, seeds)
        if drawn is None:
            path.unlink(missing_ok=True)
            found[name] = None
        else:
            save_png(drawn.image, path)
            found[name] = {"seed": drawn.seed, "prompt": drawn.scene.caption()}
        if say is not None:
            say(f"{name}: {found[name] or f'no right picture in {seeds} seeds'}")
    return found
