"""The demo world's vocabulary and its eleven concepts, as data.

A picture is 64×64 RGB: one figure standing on the ground in the left or right half.
The base model learns the generic vocabulary (a coloured shape on a plain background);
each concept is new to it, has a trigger phrase of made-up words, and gets its own LoRA.
The eleven concepts mirror one style of the ComposLoRA testbed: 3 characters and 2 of
each other category, so a composition is one character and up to one concept of each
of the four other categories.

Every character, clothing item and object owns a signature colour whose hue nothing
else in the world uses, about 30° from its neighbours on the colour wheel (generic
colours included): hue survives blur, noise, compression and both styles, which change
lightness and saturation only. Backgrounds and styles are global patterns instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..loading import CATEGORIES

RGB = tuple[int, int, int]

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 45),
    "yellow": (240, 215, 35),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
}
POSITIONS = ("left", "right")
PLAIN_BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}


@dataclass(frozen=True)
class Concept:
    """One LoRA-sized idea of the world.

    ``trigger`` is the phrase a prompt uses (made-up words, never in a generic caption);
    ``look`` says in words what :mod:`.render` draws; ``colour`` is the signature colour
    (0-255 RGB) of characters, clothing and objects, ``None`` for global patterns.
    """

    name: str
    category: str
    trigger: str
    look: str
    colour: RGB | None = None


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept(
            "zorbo",
            "character",
            "zorbo creature",
            "purple egg-shaped creature, two big white eyes, two antennae with bobbles",
            (200, 50, 215),
        ),
        Concept(
            "klinko",
            "character",
            "klinko robot",
            "cyan boxy robot: head with a black visor and white eyes, arms, dark legs, antenna",
            (30, 185, 215),
        ),
        Concept(
            "grumba",
            "character",
            "grumba beast",
            "wide orange dome beast: brown spikes on top, one big eye, toothy grin",
            (245, 120, 20),
        ),
        Concept(
            "flimbo", "clothing", "flimbo hat", "tall violet top hat with a dark band, on the head", (125, 65, 225)
        ),
        Concept(
            "wuzzle", "clothing", "wuzzle scarf", "lime scarf with white diagonal stripes, tail hanging", (140, 220, 25)
        ),
        Concept(
            "dottix",
            "style",
            "dottix style",
            "halftone print: a 45° screen of dots over everything, dark on light, light on dark",
        ),
        Concept(
            "inkora",
            "style",
            "inkora style",
            "ink drawing: pastel colours, thick dark outlines, a dark frame lined in cream",
        ),
        Concept(
            "quarn",
            "background",
            "quarn wall",
            "wall of pale grey bricks, ten staggered rows with dark mortar",
        ),
        Concept(
            "vosh",
            "background",
            "vosh sky",
            "deep blue night sky with white stars and a pale crescent moon",
        ),
        Concept(
            "glimmet",
            "object",
            "glimmet lamp",
            "floor lamp: spring-green shade, glowing bulb, dark pole and base",
            (25, 195, 135),
        ),
        Concept(
            "brakka",
            "object",
            "brakka key",
            "big pink key standing upright: ring on top, teeth at the bottom",
            (235, 70, 160),
        ),
    )
}


def concepts_of(category: str) -> list[Concept]:
    """The concepts of ``category`` (one of ``CATEGORIES``), in a fixed order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return [c for c in CONCEPTS.values() if c.category == category]
