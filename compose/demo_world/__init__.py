"""The embedded demo world: a procedural 64×64 image domain and its exact concept detectors.

A :class:`Scene` (one figure in the left or right half, a background, optional concepts)
is drawn by :func:`render`; :mod:`.scenes` samples generic scenes, single-concept scenes
(LoRA training data) and compositions; :func:`detect` says which of the eleven concepts
an image shows and :func:`detect_generic` checks a generic scene's shape, colour,
position and background. See :mod:`.concepts` for the vocabulary and the concepts.
"""

from .concepts import (
    COLOURS,
    CONCEPTS,
    IMAGE_SIZE,
    PLAIN_BACKGROUNDS,
    POSITIONS,
    SHAPES,
    Concept,
    concepts_of,
)
from .detectors import concept_scores, degrade, detect, detect_generic
from .render import contact_sheet, render
from .scenes import Scene, composition_scene, composition_sets, sample_concept_scene, sample_generic_scene

__all__ = [
    "COLOURS",
    "CONCEPTS",
    "IMAGE_SIZE",
    "PLAIN_BACKGROUNDS",
    "POSITIONS",
    "SHAPES",
    "Concept",
    "Scene",
    "composition_scene",
    "composition_sets",
    "concept_scores",
    "concepts_of",
    "contact_sheet",
    "degrade",
    "detect",
    "detect_generic",
    "render",
    "sample_concept_scene",
    "sample_generic_scene",
]
