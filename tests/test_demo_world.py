"""The demo world: deterministic scenes and renders, captions, and the concept detectors'
accuracy on held-out renders, clean and degraded (blur, noise, JPEG)."""

from __future__ import annotations

import colorsys
from dataclasses import replace
from itertools import product

import numpy as np
import pytest

from compose import CATEGORIES
from compose.demo_world import (
    COLOURS,
    CONCEPTS,
    IMAGE_SIZE,
    PLAIN_BACKGROUNDS,
    POSITIONS,
    SHAPES,
    Scene,
    composition_scene,
    composition_sets,
    concepts_of,
    contact_sheet,
    degrade,
    detect,
    detect_generic,
    render,
    sample_concept_scene,
    sample_generic_scene,
)

CLEAN_ACCURACY, DEGRADED_ACCURACY, MAX_FALSE_POSITIVES = 0.97, 0.90, 0.05


def _generic_captions() -> set[str]:
    return {
        Scene(shape=s, colour=c, position=p, background=b).caption()
        for s, c, p, b in product(SHAPES, COLOURS, POSITIONS, PLAIN_BACKGROUNDS)
    }


def test_concepts_mirror_one_composlora_style():
    assert len(CONCEPTS) == 11
    assert [len(concepts_of(c)) for c in CATEGORIES] == [3, 2, 2, 2, 2]
    assert [len(composition_sets(n)) for n in (2, 3, 4, 5)] == [24, 72, 96, 48]
    for names in composition_sets(5):
        assert [CONCEPTS[n].category for n in names] == list(CATEGORIES)


def test_signature_hues_are_far_from_every_other_colour():
    colours = dict(COLOURS) | {c.name: c.colour for c in CONCEPTS.values() if c.colour is not None}
    hues = {name: 360 * colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in colours.items()}
    for a, b in product(hues, hues):
        if a != b:
            assert abs((hues[a] - hues[b] + 180) % 360 - 180) >= 25, (a, b)


def test_sampling_and_rendering_are_deterministic():
    scene = composition_scene(("zorbo", "flimbo", "dottix", "vosh", "brakka"), 7)
    assert scene == composition_scene(("zorbo", "flimbo", "dottix", "vosh", "brakka"), 7)
    assert render(scene).tobytes() == render(scene).tobytes()
    assert render(scene).tobytes() != render(replace(scene, jitter=scene.jitter + 1)).tobytes()
    assert sample_generic_scene(3) == sample_generic_scene(np.random.default_rng(3))
    image = render(sample_generic_scene(3))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_captions_carry_exactly_the_scene_concepts_triggers():
    assert Scene("circle", "red", "left", "gray").caption() == "a red circle on the left, gray background"
    scene = Scene(None, None, "right", "vosh", character="zorbo", clothing="flimbo", object="brakka", style="inkora")
    assert scene.caption() == (
        "a zorbo creature wearing a flimbo hat on the right, a brakka key on the left, "
        "vosh sky background, inkora style"
    )
    rng = np.random.default_rng(0)
    scenes = [sample_concept_scene(name, rng) for name in CONCEPTS for _ in range(3)]
    scenes += [composition_scene(names, rng) for n in (2, 5) for names in composition_sets(n)]
    for scene in scenes:
        caption = scene.caption()
        for name, concept in CONCEPTS.items():
            assert (concept.trigger in caption) == (name in scene.concepts()), (caption, name)


def test_trigger_words_never_appear_in_generic_captions():
    generic_words = {word.strip(",") for caption in _generic_captions() for word in caption.split()}
    for concept in CONCEPTS.values():
        made_up = concept.trigger.split()[0]
        assert made_up not in generic_words and made_up == concept.name
        assert not set(concept.trigger.split()) & generic_words, concept.trigger


def test_single_concept_scenes_hold_only_their_concept():
    rng = np.random.default_rng(1)
    for name, concept in CONCEPTS.items():
        for _ in range(5):
            scene = sample_concept_scene(name, rng)
            assert scene.concepts() == (name,)
            if concept.category != "character":
                assert scene.shape in SHAPES and scene.colour in COLOURS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"character": "zorbo"}, "replaces the generic figure"),
        ({"shape": None}, "generic figure needs"),
        ({"clothing": "brakka"}, "not a clothing concept"),
        ({"background": "zorbo"}, "unknown background"),
        ({"style": "nope"}, "unknown concept"),
        ({"position": "middle"}, "position must be"),
    ],
)
def test_invalid_scenes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scene(**kwargs)


def test_a_composition_takes_one_concept_per_category():
    with pytest.raises(ValueError, match="one concept per category"):
        composition_scene(("zorbo", "klinko"), 0)


def test_every_legal_combination_renders_with_a_clear_sky():
    """Every set of at most one concept per category, with a character or a generic shape
    standing, renders; above row 12 only the background shows (the detectors rely on it)."""
    options = [[None, *(c.name for c in concepts_of(category))] for category in CATEGORIES]
    for i, chosen in enumerate(product(*options)):
        names = tuple(name for name in chosen if name is not None)
        scene = composition_scene(names, i)
        assert scene.concepts() == names
        image = np.asarray(render(scene))
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        if scene.background in PLAIN_BACKGROUNDS and scene.style is None:
            assert (image[:12] == PLAIN_BACKGROUNDS[scene.background]).all(), scene.caption()


@pytest.fixture(scope="module")
def held_out():
    """About 300 scenes the thresholds were not tuned on: generic, single-concept and
    compositions of 2 to 5 concepts, with their clean and degraded detections."""
    rng = np.random.default_rng(20_240_601)
    scenes = [sample_generic_scene(rng) for _ in range(40)]
    scenes += [sample_concept_scene(name, rng) for name in CONCEPTS for _ in range(10)]
    sets = [names for n in (2, 3, 4, 5) for names in composition_sets(n)]
    scenes += [composition_scene(sets[int(i)], rng) for i in rng.integers(len(sets), size=150)]
    images = [render(scene) for scene in scenes]
    clean = [detect(image) for image in images]
    degraded = [detect(degrade(image, seed)) for seed, image in enumerate(images)]
    return scenes, clean, degraded


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_detector_accuracy_on_held_out_renders(held_out, name):
    scenes, clean, degraded = held_out
    present = np.array([name in scene.concepts() for scene in scenes])
    assert present.sum() >= 40 and (~present).sum() >= 150
    for found, accuracy in ((clean, CLEAN_ACCURACY), (degraded, DEGRADED_ACCURACY)):
        said = np.array([f[name] for f in found])
        assert said[present].mean() >= accuracy
        assert said[~present].mean() <= MAX_FALSE_POSITIVES


def test_generic_detector_checks_shape_colour_position_and_background():
    rng = np.random.default_rng(99)
    misses = {"clean": 0, "degraded": 0}
    for seed in range(60):
        scene = sample_generic_scene(rng)
        image = render(scene)
        for kind, picture in (("clean", image), ("degraded", degrade(image, seed))):
            misses[kind] += sum(not ok for ok in detect_generic(picture, scene).values())
        wrong = {
            "shape": replace(scene, shape=SHAPES[(SHAPES.index(scene.shape) + 1) % len(SHAPES)]),
            "colour": replace(scene, colour=[c for c in COLOURS if c != scene.colour][seed % 3]),
            "position": replace(scene, position=scene.other_position),
            "background": replace(scene, background=[b for b in PLAIN_BACKGROUNDS if b != scene.background][0]),
        }
        for key, asked in wrong.items():
            assert detect_generic(image, asked) == {k: k != key for k in wrong}, (scene, key)
    assert misses["clean"] == 0 and misses["degraded"] <= 0.03 * 60 * 4


def test_generic_detector_refuses_scenes_with_concepts():
    with pytest.raises(ValueError, match="generic scenes"):
        detect_generic(render(Scene(clothing="flimbo")), Scene(clothing="flimbo"))


def test_contact_sheet_lays_images_out_in_a_grid():
    images = [render(sample_concept_scene(name, 0)) for name in list(CONCEPTS)[:5]]
    sheet = contact_sheet(images, columns=3, scale=2, gap=1)
    assert sheet.size == (3 * (2 * IMAGE_SIZE + 1) + 1, 2 * (2 * IMAGE_SIZE + 1) + 1)
    assert sheet.getpixel((1, 1)) == images[0].getpixel((0, 0))
