"""Scenes: what one picture of the demo world shows, its caption, and how to sample them.

A :class:`Scene` is plain data; :func:`compose.demo_world.render.render` draws it. The
samplers make the three kinds of training and evaluation pictures: generic scenes (what
the base model learns), single-concept scenes (one LoRA's training data: the concept and
nothing but generic context) and compositions (one character and up to one concept of
each other category). They are deterministic functions of a ``numpy.random.Generator``
or an integer seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations, product

import numpy as np

from ..loading import CATEGORIES
from .concepts import COLOURS, CONCEPTS, PLAIN_BACKGROUNDS, POSITIONS, SHAPES, concepts_of

_SCENE_FIELDS = ("character", "clothing", "style", "object")


@dataclass(frozen=True)
class Scene:
    """Everything one image shows.

    The figure is a generic ``shape`` of a generic ``colour``, or a ``character`` concept
    (then ``shape`` and ``colour`` are ``None``); it stands in the ``position`` half and an
    ``object`` concept stands in the other half. ``background`` is a plain background or a
    background concept, ``clothing`` is worn by the figure and ``style`` restyles the whole
    picture. ``jitter`` seeds the small variations: figure size (0.9 to 1.08×), offsets of a
    few pixels, the bricks' shades, the stars.
    """

    shape: str | None = "circle"
    colour: str | None = "red"
    position: str = "left"
    background: str = "white"
    character: str | None = None
    clothing: str | None = None
    object: str | None = None
    style: str | None = None
    jitter: int = 0

    def __post_init__(self) -> None:
        if self.character is None:
            if self.shape not in SHAPES or self.colour not in COLOURS:
                raise ValueError(f"a generic figure needs a shape in {SHAPES} and a colour in {tuple(COLOURS)}")
        elif self.shape is not None or self.colour is not None:
            raise ValueError("a character replaces the generic figure: leave shape and colour None")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.background not in PLAIN_BACKGROUNDS and _category(self.background) != "background":
            raise ValueError(f"unknown background {self.background!r}")
        for category in _SCENE_FIELDS:
            name = getattr(self, category)
            if name is not None and _category(name) != category:
                raise ValueError(f"{category}={name!r} is not a {category} concept")

    @property
    def other_position(self) -> str:
        """The half the object stands in."""
        return POSITIONS[1 - POSITIONS.index(self.position)]

    def concepts(self) -> tuple[str, ...]:
        """The concept names in the scene, in ``CATEGORIES`` order."""
        by_category = {c: getattr(self, c) for c in _SCENE_FIELDS}
        by_category["background"] = self.background if self.background in CONCEPTS else None
        return tuple(by_category[c] for c in CATEGORIES if by_category[c] is not None)

    def caption(self) -> str:
        """The prompt that describes the scene: generic words plus the concepts' triggers.

        ``"a red circle on the left, gray background"``, or with concepts
        ``"a zorbo creature wearing a flimbo hat on the right, a brakka key on the left,
        vosh sky background, inkora style"``.
        """
        subject = f"a {_trigger(self.character)}" if self.character else f"a {self.colour} {self.shape}"
        if self.clothing:
            subject += f" wearing a {_trigger(self.clothing)}"
        parts = [f"{subject} on the {self.position}"]
        if self.object:
            parts.append(f"a {_trigger(self.object)} on the {self.other_position}")
        background = _trigger(self.background) if self.background in CONCEPTS else self.background
        parts.append(f"{background} background")
        if self.style:
            parts.append(_trigger(self.style))
        return ", ".join(parts)


def sample_generic_scene(rng: np.random.Generator | int) -> Scene:
    """A coloured shape on a plain background, everything drawn uniformly."""
    rng = np.random.default_rng(rng)
    return Scene(
        shape=_pick(rng, SHAPES),
        colour=_pick(rng, tuple(COLOURS)),
        position=_pick(rng, POSITIONS),
        background=_pick(rng, tuple(PLAIN_BACKGROUNDS)),
        jitter=int(rng.integers(2**31)),
    )


def sample_concept_scene(concept: str, rng: np.random.Generator | int) -> Scene:
    """``concept`` alone in random generic context: its LoRA's training data.

    A character stands on a plain background; clothing is worn by a generic shape, an
    object stands beside one, a background stands behind one, a style restyles a generic
    scene. No other concept ever appears.
    """
    return composition_scene((concept,), rng)


def composition_scene(concept_names: tuple[str, ...] | list[str], rng: np.random.Generator | int) -> Scene:
    """A scene with all of ``concept_names`` (at most one per category) and random generic
    context: a generic shape stands in when there is no character, a plain background
    when there is no background concept."""
    categories = [_category(name) for name in concept_names]
    if len(set(categories)) != len(categories):
        raise ValueError(f"at most one concept per category, got {list(concept_names)}")
    scene = sample_generic_scene(rng)
    for name, category in zip(concept_names, categories, strict=True):
        if category == "character":
            scene = replace(scene, shape=None, colour=None, character=name)
        elif category == "background":
            scene = replace(scene, background=name)
        else:
            scene = replace(scene, **{category: name})
    return scene


def composition_sets(size: int) -> list[tuple[str, ...]]:
    """Every set of ``size`` concepts (1..5) made of one character and one concept from each
    of ``size - 1`` other categories, as in the ComposLoRA testbed: 24, 72, 96 and 48 sets
    for sizes 2, 3, 4 and 5. Names are in ``CATEGORIES`` order."""
    if not 1 <= size <= len(CATEGORIES):
        raise ValueError(f"a composition has 1 to {len(CATEGORIES)} concepts, not {size}")
    others = [c for c in CATEGORIES if c != "character"]
    sets = []
    for character in concepts_of("character"):
        for chosen in combinations(others, size - 1):
            for names in product(*([c.name for c in concepts_of(category)] for category in chosen)):
                picked = dict(zip(chosen, names, strict=True), character=character.name)
                sets.append(tuple(picked[c] for c in CATEGORIES if c in picked))
    return sets


def _category(name: str) -> str:
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; expected one of {', '.join(CONCEPTS)}")
    return CONCEPTS[name].category


def _trigger(name: str) -> str:
    return CONCEPTS[name].trigger


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]
