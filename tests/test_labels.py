"""The detectors against the eye: the shipped labelled set of generated pictures
(``assets/labels``), each slot marked right or wrong by looking at it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from compose.cli import main
from compose.demo_world.detectors import slot_check
from compose.demo_world.labels import (
    LABELLED,
    LABELS,
    agreement,
    disagreement_sheet,
    records,
    save_candidates,
    scene_from_dict,
    scene_to_dict,
)
from compose.demo_world.render import render
from compose.demo_world.scenes import composition_scene, sample_generic_scene

pytestmark = pytest.mark.skipif(not (LABELLED / LABELS).is_file(), reason=f"no labelled set at {LABELLED}")


def test_the_set_is_large_varied_and_small_on_disk():
    records = json.loads((LABELLED / LABELS).read_text(encoding="utf-8"))["images"]
    labelled = [r for r in records if r["seen"]]
    assert len(labelled) >= 334
    kinds = {r["kind"].split(":")[0] for r in labelled}
    assert {"base", "lora", "N=2", "N=3", "N=4", "N=5"} <= kinds
    assert {r["split"] for r in labelled} == {"tune", "held-out"}
    assert sum(p.stat().st_size for p in LABELLED.iterdir()) < 6e6


def test_detectors_agree_with_the_labels_on_the_held_out_third():
    """Measured on the held-out third, which no tuning of the detectors reads: 88% of 554
    verdicts on 110 pictures, clothing and figure lowest (81-82%), short of the 95% per
    slot aimed at; this test holds the present level."""
    result = agreement(LABELLED, split="held-out")
    assert result["all"]["n"] >= 550 and result["all"]["rate"] >= 0.86, result["all"]
    for slot in ("figure", "clothing", "object", "background", "style"):
        assert result["slots"][slot]["rate"] >= 0.78, (slot, result["slots"][slot])


def test_scenes_round_trip_through_the_label_file(tmp_path):
    scenes = [sample_generic_scene(4), composition_scene(("klinko", "wuzzle", "vosh"), 2)]
    for scene in scenes:
        assert scene_from_dict(json.loads(json.dumps(scene_to_dict(scene)))) == scene
    image = Image.new("RGB", (64, 64), "white")
    entries = [{"image": image, "kind": "base", "method": None, "scene": scene_to_dict(s), "caption": s.caption(),
                "seen": None} for s in scenes]  # fmt: skip
    path = save_candidates(tmp_path, entries)
    records = json.loads(path.read_text())["images"]
    assert [r["file"] for r in records] == ["000.png", "001.png"] and (tmp_path / "sheet-000.png").is_file()


def _entry(scene, image):
    return {"image": image, "kind": "base", "method": None, "scene": scene_to_dict(scene), "caption": scene.caption(),
            "seen": None}  # fmt: skip


def _key_labelled_missing(folder) -> None:
    """Three perfect renders of zorbo beside brakka's key, each labelled as if the key were missing."""
    scene = composition_scene(("zorbo", "brakka"), 3)
    path = save_candidates(folder, [_entry(scene, render(scene)) for _ in range(3)])
    saved = json.loads(path.read_text())
    for record in saved["images"]:
        record["seen"] = {slot: slot != "object" for slot in slot_check(render(scene), scene)}
    path.write_text(json.dumps(saved))


def test_a_second_batch_is_added_after_the_first_with_a_third_held_out(tmp_path):
    scenes = [sample_generic_scene(seed) for seed in range(7)]
    white = Image.new("RGB", (64, 64), "white")
    save_candidates(tmp_path, [_entry(s, white) for s in scenes[:4]], model="first")
    path = save_candidates(tmp_path, [_entry(s, white) for s in scenes[4:]], model="second")
    saved = json.loads(path.read_text())["images"]
    assert [r["file"] for r in saved] == [f"{i:03d}.png" for i in range(7)]
    assert [r["model"] for r in saved] == ["first"] * 4 + ["second"] * 3
    assert [r["split"] for r in saved] == ["tune", "tune", "held-out", "tune", "tune", "tune", "held-out"]
    assert (tmp_path / "sheet-004.png").is_file()
    assert records(tmp_path) == [], "pictures nobody has looked at yet are not labels"


def test_agreement_counts_a_detector_that_sees_a_concept_the_eye_did_not_as_a_false_positive(tmp_path):
    """A perfect render of brakka's key, labelled as if the key were missing: the detectors
    see it, so the held-out verdict disagrees and counts as brakka's false positive; the
    tune split is not read."""
    _key_labelled_missing(tmp_path)
    result = agreement(tmp_path)
    assert result["images"] == 1 and result["split"] == "held-out"
    assert result["false_positives"]["brakka"] == {**result["false_positives"]["brakka"], "rate": 1.0, "n": 1}
    assert result["false_positives"]["zorbo"]["n"] == 0
    assert result["slots"]["object"]["rate"] == 0.0 and result["slots"]["figure"]["rate"] == 1.0
    assert agreement(tmp_path, None)["images"] == 3
    assert disagreement_sheet(tmp_path).size == disagreement_sheet(tmp_path, "held-out").size
    with pytest.raises(ValueError, match="unknown split 'train'"):
        records(tmp_path, "train")


def test_the_command_line_reports_a_split_and_draws_its_disagreements(tmp_path, capsys):
    _key_labelled_missing(tmp_path)
    sheet = tmp_path / "disagree.png"
    assert main(["demo-world", "agreement", "--out", str(tmp_path), "--split", "tune", "--sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[: printed.rindex("}") + 1])
    assert report["split"] == "tune" and report["images"] == 2 and report["slots"]["object"]["rate"] == 0.0
    with Image.open(sheet) as image:
        assert image.height > 3 * 64, "two disagreeing pictures, 3x enlarged, titled"
