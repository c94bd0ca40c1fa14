"""The shipped demo world: it loads (through the project and through plain diffusers),
draws what it is asked in every slot, its LoRAs are ordinary LoRA files that add their
concept and only with it, and its offline CLIP ranks captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from compose import Composer, RunOptions, SamplingConfig
from compose.demo_world import (
    CONCEPTS,
    Figure,
    Scene,
    composition_scene,
    detect,
    render,
    sample_concept_scene,
    sample_generic_scene,
)
from compose.demo_world.cards import CARD_SEEDS, write_cards
from compose.demo_world.detectors import slot_check
from compose.demo_world.evaluate import (
    EXAMPLE_LAYOUT,
    EXAMPLE_METHOD,
    EXAMPLE_SEED,
    EXAMPLE_SET,
    first_picture_rate,
    lora_rates,
)
from compose.demo_world.train import STAGES
from compose.demo_world.world import (
    CEILING,
    WORLD_VERSION,
    demo_world_clip,
    demo_world_folder,
    lora_path,
    trained_version,
)
from compose.evaluation.clipscore import CLIPScorer
from compose.loading import load_lora, preview_path
from compose.metadata import read_record
from compose.methods.references import DEFAULT_LORA_SCALE

FOLDER = demo_world_folder()
pytestmark = [
    pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(), reason=f"no demo world is trained at {FOLDER}"),
    pytest.mark.skipif((FOLDER / "model_index.json").is_file() and trained_version(FOLDER) != WORLD_VERSION,
                       reason=f"the world at {FOLDER} was trained for world version {trained_version(FOLDER)}, "
                       f"this code draws version {WORLD_VERSION}: retrain it (compose demo-world train)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def world() -> Composer:
    return Composer.load("demo-world")


def test_assets_are_small_and_complete():
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 45e6
    for name in [*CONCEPTS, CEILING]:
        assert lora_path(FOLDER, name).is_file()
    record = json.loads((FOLDER / "training.json").read_text())
    assert set(record["stages"]) == set(STAGES)


def test_the_world_loads_its_loras_in_the_concepts_order(world):
    """The studio shows LoRAs in load order: the shipped ``loras/order.json`` keeps the
    concepts' order, which the engine reads without importing the demo world."""
    assert list(world.loras) == list(CONCEPTS)
    assert world.model_name == "demo-world"


def test_loras_load_through_the_public_loader():
    for name, concept in CONCEPTS.items():
        lora = load_lora(lora_path(FOLDER, name))
        assert lora.category == concept.category
        assert lora.triggers == [concept.trigger]
        assert lora.unused_keys == []


def test_generic_prompts_come_out_right_in_every_slot(world):
    scenes = [sample_generic_scene(seed) for seed in range(8)]
    images = world.generate([s.caption() for s in scenes], seed=list(range(8)))
    assert images[0].size == (64, 64)
    checks = [slot_check(i, s) for i, s in zip(images, scenes, strict=True)]
    # 90% of 100 generic prompts come out right in every slot (assets/README.md); these
    # eight gave 6 on the machine it was measured on.
    assert sum(all(c.values()) for c in checks) >= 5, checks


def test_left_and_right_put_the_figure_on_that_side(world):
    scenes = [Scene(Figure("square", "blue"), side, background="white") for side in ("left", "right")]
    images = world.generate([s.caption() for s in scenes], seed=[3, 3])
    assert all(slot_check(i, s)["figure"] for i, s in zip(images, scenes, strict=True))


def test_loras_put_their_concepts_in_and_only_with_them(world):
    """Seven LoRAs, three seeds each: the concept is found with the LoRA in at least 14 of
    the 21 pictures (19 where measured; the characters are the weakest, zorbo at 40% over
    30 seeds), and never without it."""
    hits = 0
    for name in ("zorbo", "klinko", "flimbo", "dottix", "quarn", "vosh", "brakka"):
        prompts = [sample_concept_scene(name, seed).caption() for seed in range(3)]
        with_lora = world.generate(prompts, [name], seed=[0, 1, 2])
        without = world.generate(prompts, seed=[0, 1, 2])
        hits += sum(detect(i)[name] for i in with_lora)
        assert not any(detect(i)[name] for i in without), name
    assert hits >= 14, hits


def test_a_lora_rates_report_says_what_the_pictures_show(world):
    """``evaluate``'s per-LoRA rates on three seeds of dottix: its dots found with the
    LoRA, never without, and the base alone keeps the prompts' other slots right (80%
    of 30 in the shipped report, so at least two of three here)."""
    rates = lora_rates(world, "dottix", 3, 25, DEFAULT_LORA_SCALE)
    assert set(rates) == {"hit", "others", "without", "others_without"}
    assert rates["hit"]["n"] == 3 and rates["hit"]["rate"] >= 2 / 3, rates
    assert rates["without"]["rate"] == 0 and rates["others_without"]["rate"] >= 2 / 3, rates
    assert rates["others"]["low"] <= rates["others"]["rate"] <= rates["others"]["high"]


def test_one_lora_equals_diffusers_own_adapter(world):
    pipeline = type(world.pipeline).from_pretrained(FOLDER)
    pipeline.load_lora_weights(str(lora_path(FOLDER, "klinko")), adapter_name="klinko")
    pipeline.set_adapters(["klinko"], [0.8])
    pipeline.set_progress_bar_config(disable=True)
    prompt = sample_concept_scene("klinko", 0).caption()
    expected = pipeline(prompt, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images  # fmt: skip
    sampling, run = SamplingConfig(steps=6), RunOptions(output_type="latent")
    got = world.generate(prompt, ["klinko"], seed=0, sampling=sampling, run=run)
    base = world.generate(prompt, seed=0, sampling=sampling, run=run)
    assert (expected - base).abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_plain_diffusers_reproduces_a_merge_image():
    """No project code on the diffusers side: the folder, two LoRA files, set_adapters."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(FOLDER)
    for name in ("zorbo", "vosh"):
        pipeline.load_lora_weights(str(lora_path(FOLDER, name)), adapter_name=name)
    pipeline.set_adapters(["zorbo", "vosh"], [0.8, 0.8])
    pipeline.set_progress_bar_config(disable=True)
    prompt = "a zorbo creature on the left, vosh sky background"
    theirs = pipeline(prompt, num_inference_steps=10, generator=torch.Generator().manual_seed(4)).images[0]
    ours = Composer.load("demo-world").generate(
        prompt, ["zorbo", "vosh"], "merge", seed=4, sampling=SamplingConfig(steps=10)
    )[0]
    difference = np.abs(np.asarray(theirs, dtype=int) - np.asarray(ours, dtype=int))
    assert difference.max() <= 1


def test_offline_clip_ranks_the_matching_caption_first():
    scorer = CLIPScorer.from_folder(demo_world_clip(), device="cpu")
    scenes = [sample_concept_scene(name, 7) for name in CONCEPTS]
    images = [render(s) for s in scenes]
    captions = [s.caption() for s in scenes]
    similarity = scorer.image_embeddings(images) @ scorer.text_embeddings(captions).T
    assert (similarity.argmax(dim=1) == torch.arange(len(scenes))).float().mean() >= 0.9
    matched = scorer.score(images, captions)
    shuffled = scorer.score(images, captions[1:] + captions[:1])
    assert (matched > shuffled).all()


def test_the_example_grid_shows_routed_s_regions(world):
    from compose.demo_world.evaluate import GRID_SETS, example_grid

    grid = example_grid(world, ["merge", "routed"], steps=2)
    cell, columns = 128 + 2, max(len(CONCEPTS), 2 + 1 + 1)  # the render, merge, routed, routed's regions
    assert grid.size == (columns * cell + 2, (1 + len(GRID_SETS)) * cell + 2)
    regions = np.asarray(grid.convert("RGB"))[2 + cell : 2 * cell, 2 + 3 * cell : 4 * cell]
    regions = regions.reshape(-1, 3).astype(int)
    assert (regions.max(1) - regions.min(1) > 40).any(), "routed's regions are tinted"


def test_a_lora_card_shows_its_concept_and_says_how_to_draw_it_again(world, tmp_path):
    """The card of a LoRA is a picture of it alone that the detectors find right in every
    slot, and its PNG record's prompt and seed draw that very picture again; a concept no
    seed draws right keeps no (stale) card."""
    (tmp_path / "loras").mkdir()
    stale = preview_path(lora_path(tmp_path, "vosh"))
    stale.write_bytes(b"an old card")
    found = write_cards(world, tmp_path, names=["brakka", "vosh"], seeds=CARD_SEEDS)
    found.update(write_cards(world, tmp_path, names=["vosh"], seeds=0))
    assert found["vosh"] is None and not stale.exists()
    path = preview_path(lora_path(tmp_path, "brakka"))
    record = read_record(path)
    assert record["prompt"] == found["brakka"]["prompt"] and record["seed"] == found["brakka"]["seed"]
    scene = sample_concept_scene("brakka", record["seed"])
    assert scene.caption() == record["prompt"]
    with Image.open(path) as saved:
        shown = saved.convert("RGB")
    assert all(slot_check(shown, scene).values())
    again = world.generate(
        record["prompt"], ["brakka"], seed=record["seed"], sampling=SamplingConfig(steps=record["steps"])
    )[0]
    assert np.abs(np.asarray(again, np.int16) - np.asarray(shown, np.int16)).max() <= 1


def test_the_first_picture_shows_every_concept_it_names(world):
    """The README's quick start, its Python example and the studio's preloaded prompt are
    one example: on its seed every slot is right, and on at least 4 of the 5 seeds from
    it (``evaluate``'s ``first_picture`` rate, which the shipped report holds on 16)."""
    scene = composition_scene(EXAMPLE_SET, EXAMPLE_LAYOUT)
    first = world.generate(scene.caption(), list(EXAMPLE_SET), EXAMPLE_METHOD, seed=EXAMPLE_SEED)[0]
    assert all(slot_check(first, scene).values())
    assert first_picture_rate(world, 5)["rate"] >= 0.8
    shipped = json.loads((FOLDER / "report.json").read_text())["first_picture"]
    assert shipped["n"] == 16 and shipped["rate"] >= 0.8, shipped
