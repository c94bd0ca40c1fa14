"""Concept presence: exact on the demo world's own renders, absent elsewhere."""

from __future__ import annotations

from compose.demo_world import composition_scene, render, sample_concept_scene, two_character_scene
from compose.evaluation.presence import concept_presence
from compose.evaluation.report import markdown_tables, ranking
from compose.evaluation.sets import load_manifest, two_character_manifest


def test_presence_of_a_rendered_composition():
    names = ["zorbo", "flimbo", "quarn"]
    image = render(composition_scene(names, 4))
    assert concept_presence(image, names) == {"concepts_present": 1.0, "all_present": 1.0}
    alone = render(sample_concept_scene("zorbo", 4))
    assert concept_presence(alone, names) == {"concepts_present": 1 / 3, "all_present": 0.0}
    assert concept_presence(image.resize((256, 256)), names)["all_present"] == 1.0


def test_two_characters_count_only_on_their_sides(tmp_path):
    image = render(two_character_scene("zorbo", "klinko", "vosh", 3))
    names = ["zorbo", "klinko", "vosh"]
    assert concept_presence(image, names, {"zorbo": "left", "klinko": "right"})["all_present"] == 1.0
    swapped = concept_presence(image, names, {"zorbo": "right", "klinko": "left"})
    assert swapped == {"concepts_present": 1 / 3, "all_present": 0.0}
    manifest = two_character_manifest(tmp_path)
    assert len(manifest.sets) == 18 and all(len(s.sides) == 2 for s in manifest.sets)
    assert "zorbo creature on the left and a klinko robot on the right" in manifest.sets[0].prompt


def test_the_shipped_two_character_sets_are_the_manifest():
    from compose.demo_world.world import TWO_CHARACTERS, demo_world_folder

    shipped = load_manifest(demo_world_folder() / TWO_CHARACTERS)
    assert shipped.sets == two_character_manifest(demo_world_folder()).sets


def test_presence_needs_demo_world_loras():
    image = render(composition_scene(["zorbo"], 1))
    assert concept_presence(image, ["knight"]) is None and concept_presence(image, []) is None


def test_presence_reaches_the_tables():
    records = [
        {"set": "s", "method": m, "seed": 0, "n": 2, "clipscore": c, "concepts_present": p, "all_present": a,
         "seconds": 1.0}
        for m, c, p, a in (("merge", 20.0, 0.5, 0.0), ("composite", 22.0, 1.0, 1.0))
    ]  # fmt: skip
    tables = markdown_tables(records, ["merge", "composite"])
    assert "### all concepts present" in tables and "| composite | 1.000 [0.207, 1.000] |" in tables
    assert "Win rate against merge on all concepts present" in tables and "| composite | 100.0% | 1 |" in tables


def test_ranking_orders_by_presence_then_clipscore_and_prices_against_composite():
    rows = (("merge", 30.0, 0.5, 0.0, 1.0), ("composite", 22.0, 1.0, 1.0, 4.0), ("cmlora", 25.0, 1.0, 1.0, 3.0))
    records = [
        {"set": "s", "method": m, "seed": 0, "n": 2, "clipscore": c, "concepts_present": p, "all_present": a,
         "seconds": t}
        for m, c, p, a, t in rows
    ]  # fmt: skip
    lines = ranking(records, ["merge", "composite", "cmlora"]).splitlines()
    assert lines[0].endswith("| time ÷ composite N=2 |")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["cmlora", "composite", "merge"]
    assert lines[2].endswith("| 0.75 |") and lines[4].endswith("| 0.25 |")
