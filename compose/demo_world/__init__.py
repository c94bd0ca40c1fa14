"""The embedded demo world: a procedural 64×64 picture domain of five slots, and its detectors.

A :class:`Scene` (a figure, optionally wearing clothing, beside an object or a second
figure, on a background, in a style) is drawn by :func:`render`; :mod:`.scenes` samples
generic scenes (the base model's data), single-concept scenes (a LoRA's data) and
compositions; :func:`detect` says which of the eleven concepts an image shows, each looked
for in its slot's region only, and :func:`slot_check` checks an image slot by slot against
the scene it was asked for. See :mod:`.concepts` for the vocabulary and the concepts.
"""

from ..sheets import contact_sheet
from .concepts import (
    BACKGROUNDS,
    CLOTHING_KINDS,
    COLOURS,
    CONCEPTS,
    FIGURE_KINDS,
    IMAGE_SIZE,
    OBJECT_KINDS,
    PLAIN_BACKGROUNDS,
    POSITIONS,
    SHAPES,
    SLOTS,
    STYLES,
    Concept,
    concepts_of,
)
from .detectors import ConceptDetail, concept_details, concept_scores, degrade, detect, side_of, slot_check
from .render import render, render_layers
from .scenes import (
    Figure,
    Scene,
    composition_scene,
    composition_sets,
    made_up_words,
    sample_concept_scene,
    sample_generic_scene,
    two_character_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CLOTHING_KINDS",
    "COLOURS",
    "CONCEPTS",
    "FIGURE_KINDS",
    "IMAGE_SIZE",
    "OBJECT_KINDS",
    "PLAIN_BACKGROUNDS",
    "POSITIONS",
    "SHAPES",
    "SLOTS",
    "STYLES",
    "Concept",
    "ConceptDetail",
    "Figure",
    "Scene",
    "composition_scene",
    "composition_sets",
    "concept_details",
    "concept_scores",
    "concepts_of",
    "contact_sheet",
    "degrade",
    "detect",
    "made_up_words",
    "render",
    "render_layers",
    "sample_concept_scene",
    "sample_generic_scene",
    "side_of",
    "slot_check",
    "two_character_scene",
]
