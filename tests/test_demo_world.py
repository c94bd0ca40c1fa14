"""The demo world: its vocabulary, scenes and renders, and its detectors on renders damaged as
a small generator damages them (hue turned ±20°, blur 0-1.2 px, noise 0-0.08, JPEG 30-95).

The detector tests share a few hundred damaged renders, built once: 99% means at most one
miss in every hundred, on at least 40 cases per concept."""

from __future__ import annotations

import colorsys
from dataclasses import replace
from itertools import combinations, product

import numpy as np
import pytest
from PIL import Image, ImageDraw

from compose import CATEGORIES
from compose.demo_world import (
    BACKGROUNDS,
    CLOTHING_KINDS,
    COLOURS,
    CONCEPTS,
    FIGURE_KINDS,
    IMAGE_SIZE,
    OBJECT_KINDS,
    PLAIN_BACKGROUNDS,
    STYLES,
    ConceptDetail,
    Figure,
    Scene,
    composition_scene,
    composition_sets,
    concept_details,
    concept_scores,
    concepts_of,
    contact_sheet,
    degrade,
    detect,
    made_up_words,
    render,
    render_layers,
    sample_concept_scene,
    sample_generic_scene,
    side_of,
    slot_check,
    two_character_scene,
)

RATE = 0.99
MIN_CASES = 40
PICTURE_WIDE = ("dottix", "inkora")
BAND = 12
CHARACTERS = [c.name for c in concepts_of("character")]


def _damaged(scene: Scene, seed: int) -> Image.Image:
    """``scene`` rendered and damaged at random within the ranges the detectors promise."""
    rng = np.random.default_rng([seed, 11])
    return degrade(render(scene), seed, blur=rng.uniform(0, 1.2), noise=rng.uniform(0, 0.08),
                   quality=int(rng.integers(30, 96)), hue_shift=rng.uniform(-20, 20))  # fmt: skip


def _hue(rgb: tuple[int, int, int]) -> float:
    return 360 * colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0]


def _apart(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


# ---------------------------------------------------------------- the world


def test_concepts_mirror_one_composlora_style():
    assert len(CONCEPTS) == 11
    assert [len(concepts_of(c)) for c in CATEGORIES] == [3, 2, 2, 2, 2]
    assert [len(composition_sets(n)) for n in (2, 3, 4, 5)] == [24, 72, 96, 48]
    for names in composition_sets(5):
        assert [CONCEPTS[n].category for n in names] == list(CATEGORIES)
    for concept in CONCEPTS.values():
        assert (concept.colour is None) == (concept.category in ("style", "background"))


def test_colours_that_can_meet_are_told_apart():
    """Every colour that can fill the figure slot is ≥ 50° from every other (a ±25° tolerance
    never confuses them), and every clothing colour is ≥ 25° from every figure colour (the
    detectors keep a colour's pixels within 20° of its own hue)."""
    figures = [*COLOURS.values(), *(CONCEPTS[n].colour for n in CHARACTERS)]
    for a, b in combinations(figures, 2):
        assert _apart(_hue(a), _hue(b)) >= 50, (a, b)
    for clothing, figure in product((c.colour for c in concepts_of("clothing")), figures):
        assert _apart(_hue(clothing), _hue(figure)) >= 25, (clothing, figure)


def test_sampling_and_rendering_are_deterministic():
    scene = composition_scene(("zorbo", "flimbo", "dottix", "vosh", "brakka"), 7)
    assert scene == composition_scene(("zorbo", "flimbo", "dottix", "vosh", "brakka"), 7)
    assert render(scene).tobytes() == render(scene).tobytes()
    assert render(scene).tobytes() != render(replace(scene, jitter=scene.jitter + 1)).tobytes()
    assert sample_generic_scene(3) == sample_generic_scene(np.random.default_rng(3))
    image = render(sample_generic_scene(3))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_captions_carry_exactly_the_scene_concepts_triggers():
    assert Scene(Figure("circle", "red"), "left", background="gray").caption() == (
        "a red circle on the left, gray background"
    )
    scene = Scene(Figure("zorbo", None), "right", "flimbo", "brakka", None, "vosh", "inkora")
    assert scene.caption() == (
        "a zorbo creature wearing a flimbo hat on the right, a brakka key on the left, "
        "vosh sky background, inkora style"
    )
    rng = np.random.default_rng(0)
    scenes = [sample_concept_scene(name, rng) for name in CONCEPTS for _ in range(3)]
    scenes += [composition_scene(names, rng) for n in (2, 5) for names in composition_sets(n)]
    scenes += [two_character_scene(a, b, "quarn", rng) for a, b in combinations(CHARACTERS, 2)]
    for scene in scenes:
        caption = scene.caption()
        for name, concept in CONCEPTS.items():
            assert (concept.trigger in caption) == (name in scene.concepts()), (caption, name)


def test_trigger_words_never_appear_in_generic_captions():
    words = {word.strip(",") for i in range(300) for word in sample_generic_scene(i).caption().split()}
    for name, concept in CONCEPTS.items():
        assert concept.trigger.split()[0] == name and name not in words
        assert concept.kind in words, concept.kind


def test_made_up_words_go_before_generic_class_words_only():
    rng = np.random.default_rng(2)
    scene = Scene(Figure("robot", "blue"), "left", "hat", "key", None, "sky", "pale")
    w = made_up_words(scene, rng, 1.0)
    assert set(w) == {"figure", "clothing", "object", "background", "style"}
    assert scene.caption(w) == (
        f"a {w['figure']} robot wearing a {w['clothing']} hat on the left, a {w['object']} key on the right, "
        f"{w['background']} sky background, {w['style']} style"
    )
    assert made_up_words(scene, rng, 0.0) == {} and scene.caption({}) == scene.caption()
    triggers = {c.trigger.split()[0] for c in CONCEPTS.values()}
    for name in CONCEPTS:
        concept_scene = sample_concept_scene(name, 4)
        caption = concept_scene.caption(made_up_words(concept_scene, rng, 1.0))
        assert CONCEPTS[name].trigger in caption and CONCEPTS[name].slot not in made_up_words(concept_scene, rng, 1.0)
    made = {made_up_words(sample_generic_scene(i), rng, 1.0)["figure"] for i in range(400)}
    assert len(made) > 300 and not made & triggers
    assert made_up_words(scene, np.random.default_rng(5), 0.5) == made_up_words(scene, np.random.default_rng(5), 0.5)


def test_concept_scenes_hold_only_their_concept_and_stand_ins_none():
    rng = np.random.default_rng(1)
    for name in CONCEPTS:
        for _ in range(5):
            scene = sample_concept_scene(name, rng)
            assert scene.concepts() == (name,)
            stand_in = scene.generic(rng)
            assert stand_in.concepts() == () and stand_in.jitter == scene.jitter
            assert stand_in.position == scene.position


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Figure("zorbo", "red"), "has its own colour"),
        (lambda: Figure("circle", None), "needs a colour"),
        (lambda: Figure("flimbo", None), "not a figure kind"),
        (lambda: Scene(clothing="brakka"), "clothing='brakka'"),
        (lambda: Scene(background="zorbo"), "background='zorbo'"),
        (lambda: Scene(style="nope"), "style='nope'"),
        (lambda: Scene(position="middle"), "position must be"),
        (lambda: Scene(object="key", partner=Figure()), "not both"),
    ],
)
def test_invalid_scenes_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_composition_takes_one_concept_per_category():
    with pytest.raises(ValueError, match="one concept per category"):
        composition_scene(("zorbo", "klinko"), 0)


def test_every_legal_combination_renders_and_only_hats_enter_the_band():
    """Every set of at most one concept per category renders; above row 12 there is nothing
    but the background and a hat (the detectors read the background there)."""
    options = [[None, *(c.name for c in concepts_of(category))] for category in CATEGORIES]
    for i, chosen in enumerate(product(*options)):
        names = tuple(name for name in chosen if name is not None)
        scene = composition_scene(names, i)
        assert scene.concepts() == names
        image, masks = render_layers(scene)
        assert np.asarray(image).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        for slot, mask in masks.items():
            assert slot == "clothing" or not mask[:BAND].any(), (scene.caption(), slot)
        if scene.background in PLAIN_BACKGROUNDS and scene.style is None and "clothing" not in masks:
            assert (np.asarray(image)[:BAND] == PLAIN_BACKGROUNDS[scene.background]).all(), scene.caption()


def test_render_layers_masks_show_their_slots():
    scene = Scene(Figure("circle", "red"), "left", "hat", "box", None, "white", None, 5)
    image, masks = render_layers(scene)
    pixels = np.asarray(image)
    assert set(masks) == {"figure", "clothing", "object"}
    assert (pixels[masks["figure"] & ~masks["clothing"]] == COLOURS["red"]).all(axis=1).mean() > 0.8
    assert np.nonzero(masks["figure"])[1].mean() < IMAGE_SIZE / 2 < np.nonzero(masks["object"])[1].mean()


def test_contact_sheet_lays_images_out_in_a_grid():
    images = [render(sample_concept_scene(name, 0)) for name in list(CONCEPTS)[:5]]
    sheet = contact_sheet(images, columns=3, scale=2, gap=1)
    assert sheet.size == (3 * (2 * IMAGE_SIZE + 1) + 1, 2 * (2 * IMAGE_SIZE + 1) + 1)
    assert sheet.getpixel((1, 1)) == images[0].getpixel((0, 0))


# ---------------------------------------------------------------- degrade


def test_degrade_turns_hues_and_keeps_its_old_signature():
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS["red"])
    turned = degrade(image, 0, 0.0, 0.0, 95, hue_shift=30.0)
    assert abs(_hue(turned.getpixel((32, 32))) - 30) < 3
    plain = degrade(image, 0, blur=0.0, noise=0.0, quality=95)
    assert _hue(plain.getpixel((32, 32))) < 3 or _hue(plain.getpixel((32, 32))) > 357
    scene = sample_generic_scene(2)
    assert _damaged(scene, 4).tobytes() == _damaged(scene, 4).tobytes()
    assert degrade(render(scene), 1).tobytes() == degrade(render(scene), 1, 1.0, 0.08, 40, 0.0).tobytes()


# ---------------------------------------------------------------- concept detection


def _sibling_or_stand_in(scene: Scene, name: str, stand_ins: set[str]) -> bool:
    """Whether ``scene`` holds, in ``name``'s slot, a sibling concept or the generic stand-in."""
    category = CONCEPTS[name].category
    return name in stand_ins or any(CONCEPTS[n].category == category for n in scene.concepts() if n != name)


@pytest.fixture(scope="module")
def concept_renders():
    """(scene, concepts its stand-in replaced, detections) for 330 damaged renders: ten
    concept scenes per concept, 110 compositions of 2 to 5 concepts, and the generic
    stand-ins of half of those."""
    rng = np.random.default_rng(20_261_201)
    scenes = [sample_concept_scene(name, rng) for name in CONCEPTS for _ in range(10)]
    sets = [names for n in (2, 3, 4, 5) for names in composition_sets(n)]
    scenes += [composition_scene(sets[i], rng) for i in rng.integers(len(sets), size=110)]
    cases = [(scene, set()) for scene in scenes]
    cases += [(scene.generic(rng), set(scene.concepts())) for scene in scenes[::2]]
    return [(scene, replaced, detect(_damaged(scene, i))) for i, (scene, replaced) in enumerate(cases)]


def _hits(concept_renders, styled: bool) -> dict[str, list[bool]]:
    """Per concept, whether it was found in each damaged render that holds it, for the
    scenes in a picture-wide style (dottix, inkora) or for the others."""
    hits: dict[str, list[bool]] = {name: [] for name in CONCEPTS}
    for scene, _, seen in concept_renders:
        if (scene.style in PICTURE_WIDE) == styled:
            for name in scene.concepts():
                hits[name].append(seen[name])
    return hits


def test_each_concept_is_found_in_damaged_renders(concept_renders):
    """Without a picture-wide style: 99% over all concepts, 95% for each."""
    hits = _hits(concept_renders, styled=False)
    every = [hit for values in hits.values() for hit in values]
    assert len(every) >= 200 and np.mean(every) >= RATE, np.mean(every)
    for name, values in hits.items():
        if CONCEPTS[name].category != "style":
            assert len(values) >= 15 and np.mean(values) >= 0.95, (name, len(values), np.mean(values))


def test_concepts_under_a_picture_wide_style_are_found_less_often(concept_renders):
    """Under dottix's dot screen or inkora's outlines and pastels, damaged: 85% over all
    concepts (the styles themselves every time), short of the 99% aimed at; the worst is
    wuzzle's striped scarf under the dots (about half)."""
    hits = _hits(concept_renders, styled=True)
    every = [hit for values in hits.values() for hit in values]
    assert len(every) >= 200 and np.mean(every) >= 0.85, np.mean(every)
    assert all(hits["dottix"]) and all(hits["inkora"])


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_each_concept_is_refused_where_its_slot_holds_a_sibling_or_the_stand_in(concept_renders, name):
    found = [seen[name] for scene, replaced, seen in concept_renders
             if name not in scene.concepts() and _sibling_or_stand_in(scene, name, replaced)]  # fmt: skip
    assert len(found) >= MIN_CASES and np.mean(found) <= 1 - RATE, (len(found), np.mean(found))


def _mush(name: str, seed: int) -> Image.Image:
    """A render of ``name``'s composition with the concept's pixels replaced by an ellipse
    of its colour, its area and its place: right hue and size, wrong shape."""
    scene = composition_scene((name,) if CONCEPTS[name].category == "character" else ("zorbo", name), seed)
    image, masks = render_layers(scene)
    mask = masks[CONCEPTS[name].slot]
    pixels = np.asarray(image).copy()
    pixels[mask] = PLAIN_BACKGROUNDS["white"]
    ys, xs = np.nonzero(mask)
    blob = Image.fromarray(pixels)
    rx = np.sqrt(mask.sum() / np.pi * (np.ptp(xs) + 1) / (np.ptp(ys) + 1))
    ry = mask.sum() / np.pi / rx
    ImageDraw.Draw(blob).ellipse([xs.mean() - rx, ys.mean() - ry, xs.mean() + rx, ys.mean() + ry],
                                 fill=CONCEPTS[name].colour)  # fmt: skip
    return blob


@pytest.mark.parametrize("name", [n for n, c in CONCEPTS.items() if c.category in ("character", "object")])
def test_a_blob_of_the_right_colour_is_not_the_concept(name):
    """Characters and objects are told by their shape; clothing (a band, a hat) is nearly
    its own blob and is told by its place on the figure and its colour."""
    for seed in range(4):
        assert not detect(_mush(name, seed))[name], (name, seed)


def test_details_explain_the_scores():
    scene = composition_scene(("klinko", "wuzzle", "inkora", "quarn", "glimmet"), 3)
    details = concept_details(render(scene))
    assert set(details) == set(CONCEPTS) and all(isinstance(d, ConceptDetail) for d in details.values())
    assert {name for name, d in details.items() if d.present} == set(scene.concepts())
    assert concept_scores(render(scene)) == {name: d.score for name, d in details.items()}
    for name in ("klinko", "wuzzle", "glimmet"):
        detail = details[name]
        assert detail.iou > 0.6 and detail.hue_error < 10 and detail.area > 20
    assert details["klinko"].side == scene.position and details["glimmet"].side == scene.other_position
    assert details["quarn"].iou is None and details["inkora"].hue_error is None


def test_detection_is_deterministic():
    scene = composition_scene(("grumba", "flimbo", "dottix", "vosh", "brakka"), 11)
    first = concept_scores(_damaged(scene, 3))
    from compose.demo_world import detectors

    detectors._read.cache_clear()
    assert concept_scores(_damaged(scene, 3)) == first


def test_two_characters_are_found_each_on_its_side():
    cases = 0
    for i, (left, right) in enumerate((a, b) for a in CHARACTERS for b in CHARACTERS if a != b):
        for j, background in enumerate(("white", "gray", "sky", "wall", "quarn", "vosh")):
            image = _damaged(two_character_scene(left, right, background, i * 10 + j), i * 10 + j)
            assert (side_of(image, left), side_of(image, right)) == ("left", "right"), (left, right, background)
            cases += 1
    assert cases == 36


def test_side_of_needs_a_concept_with_a_place():
    with pytest.raises(ValueError, match="no side"):
        side_of(render(sample_generic_scene(0)), "vosh")


# ---------------------------------------------------------------- slot checks


def _changes(scene: Scene, rng: np.random.Generator) -> list[tuple[str, Scene]]:
    """Scenes that differ from ``scene`` in one slot (the slot's name first)."""

    def other(options: tuple, value: object) -> object:
        choices = [option for option in options if option != value]
        return choices[int(rng.integers(len(choices)))]

    figure = scene.figure
    out = [("figure", replace(scene, figure=Figure(other(FIGURE_KINDS, figure.kind), figure.colour))),
           ("figure", replace(scene, figure=Figure(figure.kind, other(tuple(COLOURS), figure.colour))))]  # fmt: skip
    if scene.partner is not None:
        out.append(("partner", replace(scene, partner=Figure(other(FIGURE_KINDS, scene.partner.kind), "red"))))
    else:
        out.append(("object", replace(scene, object=other((None, *OBJECT_KINDS), scene.object))))
    out.append(("clothing", replace(scene, clothing=other((None, *CLOTHING_KINDS), scene.clothing))))
    out.append(("background", replace(scene, background=other(BACKGROUNDS[:4], scene.background))))
    out.append(("style", replace(scene, style=other((None, *STYLES), scene.style))))
    return out


@pytest.fixture(scope="module")
def generic_checks():
    """(scene, image) for 100 damaged generic scenes, and each one's slot check."""
    rng = np.random.default_rng(20_261_202)
    scenes = [sample_generic_scene(rng) for _ in range(100)]
    images = [_damaged(scene, 1000 + i) for i, scene in enumerate(scenes)]
    return [(scene, image, slot_check(image, scene)) for scene, image in zip(scenes, images, strict=True)]


def test_slot_check_passes_damaged_generic_scenes(generic_checks):
    for scene, _, check in generic_checks:
        assert set(check) == {"figure", "clothing", "object", "background", "style"} | (
            {"partner"} if scene.partner else set()
        )
    assert np.mean([all(check.values()) for _, _, check in generic_checks]) >= RATE


def test_slot_check_reads_the_other_slots_of_concept_scenes():
    """A LoRA alone is judged on whether the prompt's other slots stay right, so on its own
    training renders they must read right: 24 per concept, 95% in all and for each. inkora's
    outline round a head once read as a hat, grumba's mouth and klinko's visor as a scarf,
    a framed day sky's clouds as quarn's mortar, and a charcoal key or box under dottix's
    dots (lightened there) as grey background."""
    rng = np.random.default_rng(20_261_207)
    right: dict[str, list[bool]] = {}
    for name, concept in CONCEPTS.items():
        scenes = [sample_concept_scene(name, rng) for _ in range(24)]
        right[name] = [all(v for slot, v in slot_check(render(scene), scene).items() if slot != concept.slot)
                       for scene in scenes]  # fmt: skip
    assert np.mean([r for values in right.values() for r in values]) >= 0.95
    for name, values in right.items():
        assert np.mean(values) >= 0.95, (name, np.mean(values))


def test_slot_check_flips_exactly_the_slot_asked_otherwise(generic_checks):
    rng = np.random.default_rng(3)
    exact = []
    for scene, image, check in generic_checks:
        if all(check.values()):
            for slot, asked in _changes(scene, rng):
                exact.append(slot_check(image, asked) == {key: key != slot for key in check})
    assert len(exact) >= 400 and np.mean(exact) >= RATE


def test_slot_check_uses_each_concept_detector_in_its_slot():
    """The concept's slot is right, and asking for its sibling there flips that slot only.
    (Under dottix, a charcoal object on a grey ground can be lost: only the style slot is
    required right there.)"""
    for name in CONCEPTS:
        scene = sample_concept_scene(name, 5)
        image = render(scene)
        check = slot_check(image, scene)
        slot = CONCEPTS[name].slot
        assert check[slot] and (name in PICTURE_WIDE or all(check.values())), (scene.caption(), check)
        sibling = next(c.name for c in concepts_of(CONCEPTS[name].category) if c.name != name)
        asked = replace(scene, figure=Figure(sibling, None)) if slot == "figure" else replace(scene, **{slot: sibling})
        assert slot_check(image, asked) == {**check, slot: False}, name


def test_position_is_part_of_the_figure_slot():
    scene = Scene(Figure("square", "blue"), "left", None, None, None, "white", None, 2)
    image = render(scene)
    assert slot_check(image, scene)["figure"]
    assert not slot_check(image, replace(scene, position="right"))["figure"]
