"""Scenes: what one picture of the demo world shows, its caption, and how to sample them.

A :class:`Scene` is plain data; :func:`compose.demo_world.render.render` draws it. The
samplers make the three kinds of training and evaluation pictures:

- generic scenes, every slot drawn from the generic vocabulary (what the base learns);
- concept scenes, one concept in its slot and every other slot random generic, captioned
  in full (one LoRA's training data, as users caption theirs);
- compositions, one character and up to one concept of each other category, with the
  unnamed slots left empty (the benchmark's prompts).

All are deterministic functions of a ``numpy.random.Generator`` or an integer seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import combinations, product

import numpy as np

from ..loading import CATEGORIES
from .concepts import (
    BACKGROUNDS,
    CLOTHING_KINDS,
    COLOURS,
    CONCEPTS,
    FIGURE_KINDS,
    OBJECT_KINDS,
    POSITIONS,
    STYLES,
    concepts_of,
)

TWO_FIGURES = 0.15


@dataclass(frozen=True)
class Figure:
    """A figure: a generic ``kind`` (:data:`FIGURE_KINDS`) in a generic ``colour``, or a
    character concept's name as ``kind`` with ``colour`` ``None``."""

    kind: str = "circle"
    colour: str | None = "red"

    def __post_init__(self) -> None:
        if self.kind in FIGURE_KINDS:
            if self.colour not in COLOURS:
                raise ValueError(f"a generic {self.kind} needs a colour in {tuple(COLOURS)}, not {self.colour!r}")
        elif _category(self.kind) != "character":
            raise ValueError(f"{self.kind!r} is not a figure kind or a character")
        elif self.colour is not None:
            raise ValueError(f"character {self.kind!r} has its own colour: leave colour None")

    @property
    def character(self) -> str | None:
        return None if self.kind in FIGURE_KINDS else self.kind

    def phrase(self) -> str:
        """``"a red circle"`` or ``"a zorbo creature"``."""
        return f"a {CONCEPTS[self.kind].trigger}" if self.character else f"a {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Everything one image shows.

    ``figure`` stands in the ``position`` half. The other half holds either an ``object``
    or a second figure, ``partner``, never both. ``clothing`` (a generic kind or a
    clothing concept) is worn by ``figure``; ``background`` is a generic background or a
    background concept; ``style`` (a generic style, a style concept or ``None``) rewrites
    the picture. ``jitter`` seeds the layout: each figure's scale (0.85 to 1.15×), offsets
    of several pixels, the patterns' phases.
    """

    figure: Figure = Figure()
    position: str = "left"
    clothing: str | None = None
    object: str | None = None
    partner: Figure | None = None
    background: str = "white"
    style: str | None = None
    jitter: int = 0

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")
        _check_slot("clothing", self.clothing, CLOTHING_KINDS)
        _check_slot("object", self.object, OBJECT_KINDS)
        _check_slot("style", self.style, STYLES)
        _check_slot("background", self.background, BACKGROUNDS, optional=False)
        if self.partner is not None and self.object is not None:
            raise ValueError("the other half holds an object or a second figure, not both")

    @property
    def other_position(self) -> str:
        """The half the object or the second figure stands in."""
        return POSITIONS[1 - POSITIONS.index(self.position)]

    def concepts(self) -> tuple[str, ...]:
        """The concept names in the scene, in ``CATEGORIES`` order (a second character last)."""
        named = [self.figure.character, self.clothing, self.style, self.background, self.object]
        found = sorted({n for n in named if n in CONCEPTS}, key=lambda n: CATEGORIES.index(CONCEPTS[n].category))
        if self.partner is not None and self.partner.character:
            found.append(self.partner.character)
        return tuple(found)

    def caption(self, made_up: Mapping[str, str] | None = None) -> str:
        """The prompt that describes the scene: generic words plus the concepts' triggers.

        ``"a red circle wearing a hat on the left, a lamp on the right, sky background,
        pale style"``; ``"a red circle on the left and a blue robot on the right, white
        background"``; with concepts ``"a zorbo creature wearing a flimbo hat on the
        right, a brakka key on the left, vosh sky background, inkora style"``.

        ``made_up`` maps slots holding a generic element to a made-up word that is put
        before its class word, as a trigger is (``"a blorp creature"``, no colour word;
        ``"a blorp hat"``, ``"blorp sky background"``, ``"blorp style"``): captions the
        base learns from, so that a word it never saw leaves the class as it draws it
        (see :func:`made_up_words`).
        """
        made_up = made_up or {}

        def word(slot: str, name: str) -> str:
            return f"{made_up[slot]} {name}" if slot in made_up and name not in CONCEPTS else _word(name)

        plain = "figure" in made_up and not self.figure.character
        subject = f"a {made_up['figure']} {self.figure.kind}" if plain else self.figure.phrase()
        if self.clothing:
            subject += f" wearing a {word('clothing', self.clothing)}"
        subject += f" on the {self.position}"
        if self.partner is not None:
            subject += f" and {self.partner.phrase()} on the {self.other_position}"
        parts = [subject]
        if self.object:
            parts.append(f"a {word('object', self.object)} on the {self.other_position}")
        parts.append(f"{word('background', self.background)} background")
        if self.style in STYLES:
            parts.append(f"{made_up.get('style', self.style)} style")
        elif self.style:
            parts.append(_word(self.style))
        return ", ".join(parts)

    def generic(self, rng: np.random.Generator | int) -> Scene:
        """The *generic stand-in*: every concept replaced by the generic element of its
        class (zorbo creature → a creature of a generic colour, flimbo hat → a hat, vosh
        sky → a sky, inkora style → framed style); the layout is kept. The base alone
        shows on it whether the scene is drawable at all."""
        rng = np.random.default_rng(rng)

        def stand_in(name: str | None) -> str | None:
            return CONCEPTS[name].kind if name in CONCEPTS else name

        def figure(f: Figure | None) -> Figure | None:
            if f is None or not f.character:
                return f
            return Figure(CONCEPTS[f.kind].kind, _pick(rng, tuple(COLOURS)))

        slots = {slot: stand_in(getattr(self, slot)) for slot in ("clothing", "object", "background", "style")}
        return replace(self, figure=figure(self.figure), partner=figure(self.partner), **slots)


def sample_generic_scene(rng: np.random.Generator | int) -> Scene:
    """A scene of generic elements only, every slot drawn at random: a figure (15% of the
    time with a second figure beside it), clothing and an object each 60% of the time, a
    style half the time, any background."""
    rng = np.random.default_rng(rng)
    figure = _generic_figure(rng)
    two = rng.random() < TWO_FIGURES
    return Scene(
        figure=figure,
        position=_pick(rng, POSITIONS),
        clothing=_maybe(rng, CLOTHING_KINDS, 0.6),
        object=None if two else _maybe(rng, OBJECT_KINDS, 0.6),
        partner=_generic_figure(rng) if two else None,
        background=_pick(rng, BACKGROUNDS),
        style=_maybe(rng, STYLES, 0.5),
        jitter=int(rng.integers(2**31)),
    )


def made_up_words(scene: Scene, rng: np.random.Generator, share: float) -> dict[str, str]:
    """For each generic element of ``scene`` (the second figure aside), with probability
    ``share``, a made-up word of two or three syllables (never a concept's) to caption it
    with (:meth:`Scene.caption`).

    A user's trigger is a word the base never saw before a class word it knows. A base
    trained only on real words reads such a word as anything: the world's base drew a
    lamp and a key for "a zorbo creature wearing a flimbo hat", and nothing for a creature
    with no colour word. Seeing fresh made-up words in its captions, it learns that
    they change nothing, as Stable Diffusion's base behaves with a new trigger, and each
    LoRA only has to give its own word its meaning."""
    present = ["figure", "background"] + [slot for slot in ("clothing", "object", "style") if getattr(scene, slot)]
    out = {}
    for slot in present:
        generic = not scene.figure.character if slot == "figure" else getattr(scene, slot) not in CONCEPTS
        if rng.random() < share and generic:
            out[slot] = _made_up_word(rng)
    return out


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "fl", "gl", "kl", "sn", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee")
_CODAS = ("", "", "", "n", "k", "x", "sh", "m", "r")


def _made_up_word(rng: np.random.Generator) -> str:
    while True:
        syllables = int(rng.integers(2, 4))
        word = "".join(_pick(rng, _ONSETS) + _pick(rng, _VOWELS) for _ in range(syllables)) + _pick(rng, _CODAS)
        if word not in CONCEPTS:  # a concept's name is its trigger's made-up word
            return word


def sample_concept_scene(concept: str, rng: np.random.Generator | int) -> Scene:
    """``concept`` in its slot of a random generic scene: its LoRA's training data, and the
    prompts its LoRA is measured on. No other concept ever appears."""
    rng = np.random.default_rng(rng)
    return _with_concepts(sample_generic_scene(rng), (concept,), rng)


def composition_scene(concept_names: tuple[str, ...] | list[str], rng: np.random.Generator | int) -> Scene:
    """A scene with all of ``concept_names`` (at most one per category) and nothing else:
    an empty clothing, object and style slot where no concept fills it, a white background
    where no background concept is named, a random generic figure if no character is.
    Position and layout come from ``rng``."""
    rng = np.random.default_rng(rng)
    plain = Scene(figure=_generic_figure(rng), position=_pick(rng, POSITIONS), jitter=int(rng.integers(2**31)))
    return _with_concepts(plain, tuple(concept_names), rng)


def two_character_scene(left: str, right: str, background: str, rng: np.random.Generator | int) -> Scene:
    """Character ``left`` on the left and character ``right`` on the right before
    ``background`` (generic or a concept): the regional benchmark's scenes."""
    rng = np.random.default_rng(rng)
    return Scene(figure=Figure(left, None), position="left", partner=Figure(right, None), background=background,
                 jitter=int(rng.integers(2**31)))  # fmt: skip


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


def _with_concepts(scene: Scene, names: tuple[str, ...], rng: np.random.Generator) -> Scene:
    categories = [_category(name) for name in names]
    if len(set(categories)) != len(categories):
        raise ValueError(f"at most one concept per category, got {list(names)}")
    for name, category in zip(names, categories, strict=True):
        if category == "character":
            scene = replace(scene, figure=Figure(name, None))
        elif category == "object":
            scene = replace(scene, object=name, partner=None)
        else:
            scene = replace(scene, **{CONCEPTS[name].slot: name})
    return scene


def _generic_figure(rng: np.random.Generator) -> Figure:
    return Figure(_pick(rng, FIGURE_KINDS), _pick(rng, tuple(COLOURS)))


def _check_slot(slot: str, value: str | None, generic: tuple[str, ...], optional: bool = True) -> None:
    if value is None and optional:
        return
    if value in generic or (value in CONCEPTS and CONCEPTS[value].slot == slot):
        return
    raise ValueError(f"{slot}={value!r}: expected one of {', '.join(generic)} or a {slot} concept")


def _category(name: str) -> str:
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; expected one of {', '.join(CONCEPTS)}")
    return CONCEPTS[name].category


def _word(name: str) -> str:
    """A concept's trigger, or a generic element's own word."""
    return CONCEPTS[name].trigger if name in CONCEPTS else name


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _maybe(rng: np.random.Generator, options: tuple[str, ...], p: float) -> str | None:
    """One of ``options`` with probability ``p``, else ``None``; always draws twice, so the
    draws that follow do not depend on the outcome."""
    present, choice = rng.random() < p, _pick(rng, options)
    return choice if present else None
