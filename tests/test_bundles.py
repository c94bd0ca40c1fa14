"""Bundled models (:mod:`compose.bundles`): the engine finds a bundle's folder and its
LoRAs, in the bundle's order, from the folder alone, without importing the demo world
that made the shipped one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from compose import Composer, ModelLoadError
from compose.bundles import DEMO_WORLD, brought_loras, bundle_folder, bundle_loras, write_lora_order
from compose.demo_world.concepts import CONCEPTS
from compose.demo_world.world import world_loras

MISSING = (
    "the demo world is not at {}: train it with `compose demo-world train`, set COMPOSE_DEMO_WORLD to its folder, "
    "or pass another model (tiny:sd1 needs nothing)"
)


def _bundle(folder, names):
    """A bundle folder with empty LoRA files ``names`` (only their names are read here)."""
    (folder / "loras").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    for name in names:
        (folder / "loras" / f"{name}.safetensors").write_bytes(b"")
    return folder


def test_the_engine_imports_no_demo_world_and_the_cli_no_torch():
    """The demo world imports the engine, not the other way round; the CLI reads a
    bundle's LoRA names without torch, so that a misspelt name is answered at once."""
    code = (
        "import sys; import compose.cli; torch = 'torch' in sys.modules; import compose.composer; "
        "print(torch, sorted(m for m in sys.modules if m.startswith('compose.demo_world')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "[]"]


def test_the_loras_load_in_the_order_file_s_order_then_sorted(tmp_path):
    folder = _bundle(tmp_path, ["b", "a", "d", "c"])
    (folder / "loras" / "notes.txt").write_text("not a LoRA")
    assert list(bundle_loras(folder)) == ["a", "b", "c", "d"]  # no order file: sorted
    write_lora_order(folder, ["c", "gone", "a", "c"])
    loras = bundle_loras(folder)
    assert list(loras) == ["c", "a", "b", "d"]  # listed first (a name with no file passed over), the rest sorted
    assert loras["c"] == folder / "loras" / "c.safetensors"
    assert bundle_loras(tmp_path / "empty") == {}


@pytest.mark.parametrize("text", ["not json", '{"a": 1}', '["a", 2]'])
def test_a_broken_order_file_is_a_model_that_does_not_load(tmp_path, monkeypatch, text):
    folder = _bundle(tmp_path, ["a"])
    (folder / "loras" / "order.json").write_text(text)
    with pytest.raises(ValueError, match="not a JSON list of LoRA names"):
        bundle_loras(folder)
    monkeypatch.setenv("COMPOSE_DEMO_WORLD", str(folder))
    with pytest.raises(ModelLoadError, match="order.json: not a JSON list of LoRA names"):
        Composer.load(DEMO_WORLD)


def test_a_missing_bundle_says_what_to_do(tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("COMPOSE_DEMO_WORLD", str(nowhere))
    assert bundle_folder(DEMO_WORLD) == nowhere
    with pytest.raises(FileNotFoundError) as error:
        brought_loras(DEMO_WORLD)
    assert str(error.value) == MISSING.format(nowhere)
    with pytest.raises(ModelLoadError) as error:
        Composer.bundled(DEMO_WORLD, tmp_path / "elsewhere")
    assert str(error.value) == MISSING.format(tmp_path / "elsewhere")


def test_a_world_needs_every_concept_s_lora(tmp_path):
    folder = _bundle(tmp_path, [name for name in CONCEPTS if name != "vosh"])
    with pytest.raises(FileNotFoundError, match="the LoRAs of vosh are missing from loras/"):
        world_loras(folder)
    (folder / "loras" / "vosh.safetensors").write_bytes(b"")
    assert list(world_loras(folder)) == list(CONCEPTS)  # the concepts' order, with no order file


def test_the_shipped_world_lists_its_loras_in_the_concepts_order():
    """The studio shows LoRAs in load order; the shipped world's ``loras/order.json`` keeps
    the concepts' order, as the trainer writes it."""
    if not (bundle_folder(DEMO_WORLD) / "model_index.json").is_file():
        pytest.skip(f"no demo world is trained at {bundle_folder(DEMO_WORLD)}")
    assert list(brought_loras(DEMO_WORLD)) == list(CONCEPTS)
