"""The demo world's vocabulary, its five slots and its eleven concepts, as data.

A picture is 64×64 RGB (16×16 latent cells of 4 px). It has five *slots*, as a
ComposLoRA picture does:

- ``figure``: a figure standing on the ground in the left or right half. Generic
  figures are a kind (three plain shapes and three class silhouettes: a creature, a
  robot, a beast) in a generic colour. A scene may hold a second figure in the other
  half (``"a red circle on the left and a blue robot on the right"``), which regional
  composition needs.
- ``clothing``: an item the figure wears, a hat on its head or a scarf at its neck.
- ``object``: an item standing in the other half, beside the figure.
- ``background``: plain white or gray, a tiled wall or a daytime sky.
- ``style``: none, or a rendering style that rewrites the whole picture.

The base model learns every generic element in every combination. Generic clothing and
objects are achromatic (charcoal with white details) and generic walls and skies are
grey, so the only colour word of a generic caption binds to the figure.

Each concept is a *specific instance* of one slot that the base does not know, and its
trigger is a made-up word plus the class word the base knows (``"klinko robot"``,
``"flimbo hat"``), as real triggers are. Characters, clothing and objects own a
signature hue. Concepts that can share a region of the picture (a character and the
clothing it wears) are at least 60° apart on the colour wheel, and every hue that can
fill the figure slot (the two generic colours and the three characters) is at least 50°
from every other, so a detector tolerant by ±25° never mistakes one for another.
Backgrounds and styles are patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import CATEGORIES

RGB = tuple[int, int, int]

IMAGE_SIZE = 64

SLOTS = ("figure", "clothing", "object", "background", "style")
SHAPES = ("circle", "square", "triangle")
CLASS_FIGURES = ("creature", "robot", "beast")
FIGURE_KINDS = SHAPES + CLASS_FIGURES
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "blue": (50, 50, 230),
}
POSITIONS = ("left", "right")
CLOTHING_KINDS = ("hat", "scarf")
OBJECT_KINDS = ("lamp", "key", "ball", "box")
PLAIN_BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "gray": (125, 125, 125),
}
PATTERN_BACKGROUNDS = ("wall", "sky")
BACKGROUNDS = tuple(PLAIN_BACKGROUNDS) + PATTERN_BACKGROUNDS
STYLES = ("pale", "framed")


@dataclass(frozen=True)
class Concept:
    """One LoRA-sized idea of the world.

    ``trigger`` is the phrase a prompt uses (a made-up word and the slot's class word);
    ``kind`` is the generic element of the same class that stands in for it in a
    generic caption (``"creature"`` for zorbo, ``"hat"`` for flimbo, ``"pale"`` for a
    style); ``look`` says in words what :mod:`.render` draws; ``colour`` is the
    signature colour (0-255 RGB) of characters, clothing and objects, ``None`` for
    backgrounds and styles.
    """

    name: str
    category: str
    trigger: str
    kind: str
    look: str
    colour: RGB | None = None

    @property
    def slot(self) -> str:
        """The picture slot the concept fills (characters fill the ``figure`` slot)."""
        return "figure" if self.category == "character" else self.category


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("zorbo", "character", "zorbo creature", "creature",
                "green egg-shaped creature, two big eyes, two antennae with bobbles", (60, 200, 60)),
        Concept("klinko", "character", "klinko robot", "robot",
                "cyan robot: a black visor with white eyes, arms, an antenna", (30, 205, 205)),
        Concept("grumba", "character", "grumba beast", "beast",
                "amber dome beast: brown spikes on top, one big eye, a toothy grin", (235, 200, 20)),
        Concept("flimbo", "clothing", "flimbo hat", "hat",
                "tall violet top hat with a golden band", (180, 50, 230)),
        Concept("wuzzle", "clothing", "wuzzle scarf", "scarf",
                "magenta scarf with white stripes and a hanging tail", (230, 50, 170)),
        Concept("dottix", "style", "dottix style", "pale",
                "halftone print: a 45° screen of dots over everything, dark on light, light on dark"),
        Concept("inkora", "style", "inkora style", "framed",
                "ink drawing: pastel colours, thick dark outlines, a dark frame lined in cream"),
        Concept("quarn", "background", "quarn wall", "wall",
                "wall of grey bricks, ten staggered rows with white mortar"),
        Concept("vosh", "background", "vosh sky", "sky",
                "grey evening sky with a gold crescent moon and gold stars, no clouds"),
        Concept("glimmet", "object", "glimmet lamp", "lamp",
                "floor lamp with a teal shade and a big glowing bulb", (20, 190, 120)),
        Concept("brakka", "object", "brakka key", "key",
                "big pink key standing upright: a wide ring on top, three teeth", (240, 60, 120)),
    )
}  # fmt: skip


def concepts_of(category: str) -> list[Concept]:
    """The concepts of ``category`` (one of ``CATEGORIES``), in a fixed order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return [c for c in CONCEPTS.values() if c.category == category]
