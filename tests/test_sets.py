"""Composition-set manifests: a valid one loads, each mistake is named where it is, and the
ComposLoRA generator gives the testbed's 24/72/96/48 sets."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compose.evaluation.clipscore import composition_text
from compose.evaluation.sets import (
    COMPOSLORA_COUNTS,
    CompositionSet,
    LoRAEntry,
    ManifestError,
    composlora_sets,
    load_manifest,
)

LIBRARY = {"character": 3, "clothing": 2, "style": 2, "background": 2, "object": 2}


@pytest.fixture
def library(tmp_path) -> list[dict]:
    """ComposLoRA-shaped library entries (11 LoRAs) whose files exist under ``tmp_path/loras``."""
    (tmp_path / "loras").mkdir()
    entries = []
    for category, count in LIBRARY.items():
        for i in range(1, count + 1):
            name = f"{category}_{i}"
            save_file({"x": torch.zeros(1)}, tmp_path / "loras" / f"{name}.safetensors")
            triggers = [f"{name} word", f"{category} detail {i}"]
            entries.append(
                {"name": name, "file": f"loras/{name}.safetensors", "category": category, "triggers": triggers}
            )
    return entries


@pytest.fixture
def manifest_data(library) -> dict:
    entries = [LoRAEntry(**e) for e in library]
    sets = [{"id": s.id, "loras": s.loras, "prompt": s.prompt} for s in composlora_sets(entries)]
    return {
        "base_model": "gsdf/Counterfeit-V2.5",
        "prompt_prefix": "masterpiece, best quality",
        "negative_prompt": "lowres",
        "seeds": [111],
        "one_per_category": True,
        "loras": library,
        "sets": sets,
    }


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "sets.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def test_valid_manifest_loads(tmp_path, manifest_data):
    manifest_data["loras"][0]["file"] = str(tmp_path / "loras" / "character_1.safetensors")
    manifest_data["loras"][1]["weight"] = 0.5
    manifest_data["sets"][0].update(negative_prompt="blurry", seeds=[1, 2])
    manifest = load_manifest(write(tmp_path, manifest_data))
    assert len(manifest.loras) == 11 and len(manifest.sets) == 240
    assert manifest.base_model == "gsdf/Counterfeit-V2.5" and manifest.one_per_category
    assert manifest.lora_path("character_1") == tmp_path / "loras" / "character_1.safetensors"
    assert manifest.lora_path("style_2") == tmp_path / "loras" / "style_2.safetensors"
    assert manifest.loras["character_2"].weight == 0.5 and manifest.loras["character_3"].weight == 1.0
    first, second = manifest.sets[:2]
    assert first == CompositionSet(
        "character_1+clothing_1",
        ["character_1", "clothing_1"],
        "character_1 word, character detail 1, clothing_1 word, clothing detail 1",
        "blurry",
        [1, 2],
    )
    assert first.n == 2 and manifest.sets[-1].n == 5
    assert manifest.prompt_for(first) == "masterpiece, best quality, " + first.prompt
    assert (manifest.negative_prompt_for(first), manifest.negative_prompt_for(second)) == ("blurry", "lowres")
    assert (manifest.seeds_for(first), manifest.seeds_for(second)) == ([1, 2], [111])
    assert composition_text(manifest.triggers(first)) == first.prompt


def test_defaults_and_save_round_trip(tmp_path, library):
    path = write(tmp_path, {"loras": library, "sets": [{"id": "a", "loras": ["style_1", "style_2"], "prompt": "p"}]})
    manifest = load_manifest(path)
    only = manifest.sets[0]
    assert (manifest.base_model, manifest.prompt_prefix, manifest.one_per_category) == (None, "", False)
    assert (manifest.prompt_for(only), manifest.negative_prompt_for(only), manifest.seeds_for(only)) == ("p", "", None)
    copied = load_manifest(manifest.save(tmp_path / "elsewhere" / "copy.json"))
    assert copied.loras["style_1"].file == "../loras/style_1.safetensors"
    assert [copied.lora_path(n).resolve() for n in copied.loras] == [manifest.lora_path(n) for n in manifest.loras]
    assert copied.sets == manifest.sets


SET17 = 'sets[17] ("character_3+background_2")'
ERRORS = {
    "missing field": (lambda d: d["loras"][1].pop("category"), 'loras[1] ("character_2"): missing required field'),
    "wrong type": (lambda d: d["loras"][2].update(triggers="goku"), "loras[2] (\"character_3\"): 'triggers' must be"),
    "wrong weight": (lambda d: d["loras"][2].update(weight="heavy"), "loras[2] (\"character_3\"): 'weight' must be"),
    "wrong seeds": (lambda d: d["sets"][17].update(seeds=[1.5]), f"{SET17}: 'seeds' must be a non-empty list"),
    "wrong flag": (lambda d: d.update(one_per_category="yes"), "top level: 'one_per_category' must be true or false"),
    "not an object": (lambda d: d["sets"].__setitem__(3, "x"), "sets[3]: expected a JSON object, got a string"),
    "unknown field": (lambda d: d.update(negative_promt="x"), "top level: unknown field 'negative_promt'"),
    "unknown category": (lambda d: d["loras"][0].update(category="hero"), 'loras[0] ("character_1"): unknown category'),
    "missing file": (lambda d: d["loras"][3].update(file="gone.safetensors"), 'loras[3] ("clothing_1"): LoRA file not'),
    "duplicate name": (lambda d: d["loras"][4].update(name="clothing_1"), 'loras[4] ("clothing_1"): duplicate LoRA'),
    "duplicate id": (
        lambda d: d["sets"][17].update(id="character_2+clothing_1"),
        'sets[17] ("character_2+clothing_1"): duplicate set id (also sets[2])',
    ),
    "unknown lora": (lambda d: d["sets"][17]["loras"].append("knight_2"), f"{SET17}: unknown LoRA 'knight_2'"),
    "repeated lora": (lambda d: d["sets"][17]["loras"].append("character_3"), f"{SET17}: lists LoRA 'character_3'"),
    "empty set": (lambda d: d["sets"][17].update(loras=[]), f"{SET17}: the list of LoRAs is empty"),
    "sides not an object": (lambda d: d["sets"][17].update(sides=["left"]), f"{SET17}: 'sides' must be an object"),
    "side of a stranger": (
        lambda d: d["sets"][17].update(sides={"style_1": "left"}),
        f"{SET17}: 'sides' names 'style_1', which the set does not compose",
    ),
    "no such side": (
        lambda d: d["sets"][17].update(sides={"character_3": "top"}),
        f"{SET17}: 'sides' puts 'character_3' on 'top'; a side is left or right",
    ),
    "two of a category": (
        lambda d: d["sets"][17].update(loras=["character_1", "style_1", "style_2"]),
        f"{SET17}: two LoRAs of category 'style' ('style_1', 'style_2'), but one_per_category is true",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_each_mistake_is_named_where_it_is(tmp_path, manifest_data, case):
    mutate, expected = ERRORS[case]
    mutate(manifest_data)
    path = write(tmp_path, manifest_data)
    with pytest.raises(ManifestError) as raised:
        load_manifest(path)
    assert str(raised.value).startswith(f"{path}: {expected}"), str(raised.value)


def test_malformed_json_gives_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "loras": [\n    {"name": "a",}\n  ]\n}')
    with pytest.raises(ManifestError, match=r"sets\.json: line 3, column 18: invalid JSON: Expecting property name"):
        load_manifest(path)


def test_one_per_category_off_allows_two_of_a_category(tmp_path, manifest_data):
    manifest_data.update(one_per_category=False)
    manifest_data["sets"][17]["loras"] = ["character_1", "style_1", "style_2"]
    assert load_manifest(write(tmp_path, manifest_data)).sets[17].n == 3


def test_composlora_counts_are_every_set():
    for n, count in COMPOSLORA_COUNTS.items():
        others = len(LIBRARY) - 1
        chosen = list(itertools.combinations(range(others), n - 1))
        assert count == 3 * len(chosen) * 2 ** (n - 1), n


def test_composlora_sets_shape(library):
    entries = [LoRAEntry(**e) for e in library]
    category = {e.name: e.category for e in entries}
    sets = composlora_sets(entries)
    assert Counter(s.n for s in sets) == COMPOSLORA_COUNTS
    assert len({s.id for s in sets}) == 240 and len({frozenset(s.loras) for s in sets}) == 240
    for s in sets:
        kinds = [category[name] for name in s.loras]
        assert kinds[0] == "character" and kinds.count("character") == 1
        assert len(set(kinds)) == s.n
    assert composlora_sets(entries) == sets
    sampled = composlora_sets(entries, {3: 10, 5: 4}, seed=7)
    assert Counter(s.n for s in sampled) == {3: 10, 5: 4}
    assert sampled == composlora_sets(entries, {3: 10, 5: 4}, seed=7) != composlora_sets(entries, {3: 10, 5: 4})
    assert [s for s in sets if s in sampled] == sampled
    with pytest.raises(ValueError, match="N=2: 25 sets asked for, but the library allows 24"):
        composlora_sets(entries, {2: 25})
    with pytest.raises(ValueError, match="N=6"):
        composlora_sets(entries, {6: 1})
