"""The detectors against the eye: the shipped labelled set of generated pictures
(``assets/labels``), each slot marked right or wrong by looking at it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from compose.demo_world.labels import LABELLED, LABELS, agreement, save_candidates, scene_from_dict, scene_to_dict
from compose.demo_world.scenes import composition_scene, sample_generic_scene

pytestmark = pytest.mark.skipif(not (LABELLED / LABELS).is_file(), reason=f"no labelled set at {LABELLED}")


def test_the_set_is_large_varied_and_small_on_disk():
    records = json.loads((LABELLED / LABELS).read_text(encoding="utf-8"))["images"]
    labelled = [r for r in records if r["seen"]]
    assert len(labelled) >= 150
    kinds = {r["kind"].split(":")[0] for r in labelled}
    assert {"base", "lora", "N=2", "N=3", "N=4", "N=5"} <= kinds
    assert sum(p.stat().st_size for p in LABELLED.iterdir()) < 5e6


def test_detectors_agree_with_the_labels_in_every_slot():
    """Measured on the shipped set: 84% in all, the figure slot lowest (69%), short of the
    95% aimed at. Most disagreements are the detectors refusing a blurred but recognisable
    element of the undertrained world; this test holds the present level."""
    result = agreement(LABELLED)
    assert result["all"]["n"] >= 500 and result["all"]["rate"] >= 0.8, result["all"]
    for slot in ("figure", "clothing", "object", "background", "style"):
        assert result["slots"][slot]["rate"] >= 0.65, (slot, result["slots"][slot])


def test_scenes_round_trip_through_the_label_file(tmp_path):
    scenes = [sample_generic_scene(4), composition_scene(("klinko", "wuzzle", "vosh"), 2)]
    for scene in scenes:
        assert scene_from_dict(json.loads(json.dumps(scene_to_dict(scene)))) == scene
    image = Image.new("RGB", (64, 64), "white")
    entries = [{"image": image, "kind": "base", "method": None, "scene": scene_to_dict(s), "caption": s.caption(),
                "seen": None} for s in scenes]  # fmt: skip
    path = save_candidates(tmp_path, entries)
    records = json.loads(path.read_text())["images"]
    assert [r["file"] for r in records] == ["000.png", "001.png"] and (tmp_path / "sheet-0.png").is_file()
