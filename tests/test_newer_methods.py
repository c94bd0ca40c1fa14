"""The newer methods (patch-weighted, frequency-band and prompt-aware composition, regional
composition) reduce to Composite or Switch where they should."""

from __future__ import annotations

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE
from PIL import Image

from compose import Composer, SamplingConfig
from compose.methods import BandFusion, MethodContext, PatchComposite, Regional, Switch, WComposite, WSwitch
from compose.methods.bands import haar, inverse_haar
from compose.methods.regional import region_mask
from compose.prompts import without_phrases


@pytest.fixture(scope="module")
def pair(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, name in enumerate(("left", "right")):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name)
    return composer


def gen(composer, method):
    return composer.generate("two creatures", loras=["left", "right"], method=method, seed=5, sampling=SAMPLING,
                             run=AS_LATENTS)  # fmt: skip


def test_uniform_patch_weights_equal_composite(pair):
    torch.testing.assert_close(gen(pair, PatchComposite(temperature=float("inf"))), gen(pair, "composite"),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert (gen(pair, PatchComposite()) - gen(pair, "composite")).abs().max() > 1e-3


def test_patch_weights_are_a_partition():
    method = PatchComposite(temperature=0.1, patch=2, top_k=2)
    torch.manual_seed(0)
    base, cond = torch.randn(1, 4, 8, 8), torch.randn(3, 1, 4, 8, 8)
    weights = method.patch_weights(base, cond)
    assert weights.shape == (3, 1, 1, 8, 8)
    torch.testing.assert_close(weights.sum(0), torch.ones(1, 1, 8, 8))
    assert ((weights > 0).sum(0) == 2).all()
    assert torch.equal(weights[..., 0, 0], weights[..., 1, 1])


def test_full_regions_equal_composite(pair):
    full = Regional(regions={"left": [0, 0, 1, 1], "right": [0, 0, 1, 1]})
    torch.testing.assert_close(gen(pair, full), gen(pair, "composite"), atol=1e-5, rtol=0)
    torch.testing.assert_close(gen(pair, Regional()), gen(pair, "composite"), atol=1e-5, rtol=0)


def test_each_lora_draws_its_own_half(pair):
    method = Regional(regions={"left": [0, 0, 0.5, 1], "right": [0.5, 0, 1, 1]})
    loras = [pair.loras["left"], pair.loras["right"]]
    method.prepare(MethodContext(loras, torch.ones(2), 4, []))
    cond = torch.stack([torch.full((1, 4, 8, 8), 1.0), torch.full((1, 4, 8, 8), 2.0)])
    mixed = method.combine(None, cond, 7.5, 0)
    assert (mixed[..., :4] == 1).all() and (mixed[..., 4:] == 2).all()


def test_a_region_prompt_changes_its_region_and_equals_regional_when_it_is_the_prompt(pair):
    """A LoRA whose region attends to the prompt's own text is plain Regional (the branches
    now one per call); another text changes the picture."""
    halves = {"left": [0, 0, 0.5, 1], "right": [0.5, 0, 1, 1]}
    plain = gen(pair, Regional(regions=halves))
    torch.testing.assert_close(gen(pair, Regional(regions=halves, prompts={"left": "two creatures"})), plain,
                               atol=1e-4, rtol=0)  # fmt: skip
    changed = gen(pair, Regional(regions=halves, prompts={"left": "a tall red tower at night"}))
    assert (changed - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="give right a region"):
        gen(pair, Regional(regions={"left": [0, 0, 0.5, 1]}, prompts={"right": "a tower"}))


def test_region_inputs(tmp_path, pair):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    grid = region_mask(str(tmp_path / "mask.png"), 8, 8)
    assert grid[:, :3].min() > 0.99 and grid[:, 5:].max() < 0.01
    with pytest.raises(ValueError, match="region box"):
        region_mask([0.5, 0, 0.2, 1], 8, 8)
    with pytest.raises(ValueError, match="not in the composition: hero"):
        gen(pair, Regional(regions={"hero": [0, 0, 1, 1]}))


@pytest.fixture(scope="module")
def trio(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, (name, category, trigger) in enumerate(
        (("hero", "character", "zq hero"), ("cape", "clothing", "vx cape"), ("ink", "style", "qj ink"))
    ):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name, category=category, triggers=[trigger])
    return composer


def gen3(composer, method, prompt="a zq hero wearing a vx cape, qj ink"):
    return composer.generate(prompt, loras=["hero", "cape", "ink"], method=method, seed=5,
                             sampling=SamplingConfig(steps=6, width=SIZE, height=SIZE), run=AS_LATENTS)  # fmt: skip


def test_equal_band_weights_equal_composite(trio):
    torch.testing.assert_close(gen3(trio, BandFusion(temperature=float("inf"))), gen3(trio, "composite"),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert (gen3(trio, BandFusion()) - gen3(trio, "composite")).abs().max() > 1e-3


def test_the_haar_transform_is_orthonormal_and_inverts():
    x = torch.randn(3, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    bands = haar(x, 3)
    assert [b.shape[-1] for b in bands] == [2, 2, 2, 2, 4, 4, 4, 8, 8, 8]
    torch.testing.assert_close(sum(b.pow(2).sum() for b in bands), x.pow(2).sum())
    torch.testing.assert_close(inverse_haar(bands), x, atol=1e-5, rtol=0)


def test_band_weights_follow_energy_and_top_k():
    method = BandFusion(temperature=1.0, top_k=1)
    quiet, loud = torch.full((1, 1, 4, 4, 4), 0.1), torch.full((1, 1, 4, 4, 4), 1.0)
    weights = method.band_weights([torch.cat([quiet, loud]), torch.cat([loud, quiet])])
    assert weights[0].flatten().tolist() == [0.0, 1.0] and weights[1].flatten().tolist() == [1.0, 0.0]
    soft = BandFusion(temperature=1.0).band_weights([torch.cat([quiet, loud])])[0].flatten()
    torch.testing.assert_close(soft, torch.tensor([0.01, 1.0]) / 1.01)


def test_trigger_importance_measures_the_triggers_in_the_prompt(trio):
    importance = trio.trigger_importance("a zq hero wearing a vx cape", ["hero", "cape", "ink"])
    assert importance[0] > 0 and importance[1] > 0 and importance[2] == 0
    assert without_phrases("a zq hero wearing a vx cape, qj ink", ["qj ink"]) == "a zq hero wearing a vx cape"


def test_prompt_aware_methods_reduce_to_composite_and_switch(trio):
    torch.testing.assert_close(gen3(trio, WComposite(sharpness=0)), gen3(trio, "composite"), atol=1e-4, rtol=0)
    torch.testing.assert_close(gen3(trio, WSwitch(tau=2, sharpness=0, hold=0)), gen3(trio, Switch(tau=2)),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert (gen3(trio, WComposite()) - gen3(trio, "composite")).abs().max() > 1e-4


def test_wswitch_turns_follow_importance_and_the_character_holds_the_end(trio):
    method = WSwitch(tau=2, sharpness=1, hold=0.25)
    loras = [trio.loras[n] for n in ("cape", "hero", "ink")]
    method.prepare(MethodContext(loras, torch.ones(3), 8, [], importance=torch.tensor([1.0, 4.0, 1.0])))
    assert method.rotation == [0, 1, 1, 1, 1, 2]
    assert [method.active(i) for i in range(8)] == [0, 1, 1, 1, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="one prompt per call"):
        trio.generate(
            ["a zq hero", "a vx cape"],
            ["hero", "cape"],
            "wcomposite",
            sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE),
        )
