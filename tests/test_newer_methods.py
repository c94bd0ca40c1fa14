"""Patch-weighted composite and regional composition reduce to Composite where they should."""

from __future__ import annotations

import pytest
import torch
from conftest import SIZE, STEPS
from PIL import Image

from compose import Composer
from compose.methods import MethodContext, PatchComposite, Regional
from compose.methods.regional import region_mask


@pytest.fixture(scope="module")
def pair(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, name in enumerate(("left", "right")):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name)
    return composer


def gen(composer, method):
    return composer.generate("two creatures", loras=["left", "right"], method=method, steps=STEPS, width=SIZE,
                             height=SIZE, seed=5, output_type="latent")  # fmt: skip


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
