"""Concept presence: exact on the demo world's own renders, absent elsewhere."""

from __future__ import annotations

from PIL import Image

from compose.demo_world import composition_scene, render, sample_concept_scene, two_character_scene
from compose.evaluation.presence import concept_presence
from compose.evaluation.report import concept_table, markdown_tables, ranking, write_report
from compose.evaluation.sets import load_manifest, two_character_manifest


def test_presence_of_a_rendered_composition():
    names = ["zorbo", "flimbo", "quarn"]
    image = render(composition_scene(names, 4))
    assert concept_presence(image, names) == {"concepts_present": 1.0, "all_present": 1.0, "missing": []}
    alone = render(sample_concept_scene("zorbo", 4))
    expected = {"concepts_present": 1 / 3, "all_present": 0.0, "missing": ["flimbo", "quarn"]}
    assert concept_presence(alone, names) == expected
    assert concept_presence(image.resize((256, 256)), names)["all_present"] == 1.0


def test_two_characters_count_only_on_their_sides(tmp_path):
    image = render(two_character_scene("zorbo", "klinko", "vosh", 3))
    names = ["zorbo", "klinko", "vosh"]
    placed = concept_presence(image, names, {"zorbo": "left", "klinko": "right"})
    assert placed["all_present"] == placed["sides_present"] == 1.0
    swapped = concept_presence(image, names, {"zorbo": "right", "klinko": "left"})
    assert swapped == {"concepts_present": 1 / 3, "all_present": 0.0, "missing": ["zorbo", "klinko"],
                       "sides_present": 0.0}  # fmt: skip
    background = render(two_character_scene("zorbo", "klinko", "white", 3))
    plain = concept_presence(background, names, {"zorbo": "left", "klinko": "right"})
    assert plain["sides_present"] == 1.0 and plain["all_present"] == 0.0 and plain["missing"] == ["vosh"]
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


def test_the_report_says_which_concepts_each_method_loses(tmp_path):
    records = [
        {"set": f"s{k}", "method": m, "seed": 0, "n": 2, "loras": ["zorbo", "vosh"], "missing": missing,
         "concepts_present": 1 - len(missing) / 2, "all_present": float(not missing), "sides_present": 1.0,
         "image": "tile.png"}
        for k, (m, missing) in enumerate((("merge", ["vosh"]), ("merge", []), ("routed", ["zorbo", "vosh"])))
    ]  # fmt: skip
    table = concept_table(records, ["merge", "routed"])
    assert table.splitlines()[0] == "| method | zorbo | vosh |"
    assert "| merge | 1.000 [0.342, 1.000] | 0.500 [0.095, 0.905] |" in table
    assert "| routed | 0.000 [0.000, 0.793] | 0.000 [0.000, 0.793] |" in table
    summary = tmp_path / "summary.md"
    Image.new("RGB", (64, 64), "white").save(tmp_path / "tile.png")
    write_report(tmp_path, records, ["merge", "routed"])
    text = summary.read_text()
    assert "## Each concept present" in text and "placed concepts on their sides" in text
    assert "zorbo vosh" in (tmp_path / "results.csv").read_text()
