"""Routed composition: per-position LoRA weights in the composable layer, cross-attention
maps read beside the layers, and the method that routes each LoRA to its region."""

from __future__ import annotations

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE
from torch import nn

from compose import Composer, RunOptions, SamplingConfig
from compose.attention_maps import AttentionProbe
from compose.emphasis import clause_positions, phrase_positions
from compose.layers import Factors, LayerRegistry, Routes
from compose.methods import Regional, Routed
from compose.region_prompts import own_texts


@pytest.fixture(scope="module")
def four(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, (name, category, trigger) in enumerate(
        (
            ("hero", "character", "zq hero"),
            ("cape", "clothing", "vx cape"),
            ("lamp", "object", "kw lamp"),
            ("ink", "style", "qj ink"),
        )  # fmt: skip
    ):
        composer.load_lora(lora_files["sd1", i % 3]["peft"], name=name, category=category, triggers=[trigger])
    return composer


PROMPT = "a zq hero wearing a vx cape, a kw lamp beside, qj ink"


def gen(composer, method, loras=("hero", "cape", "lamp", "ink"), prompt=PROMPT):
    return composer.generate(prompt, loras=list(loras), method=method, seed=[5, 6], sampling=SAMPLING, run=AS_LATENTS)


def _layer(conv: bool):
    torch.manual_seed(0)
    base = nn.Conv2d(6, 5, 3, padding=1) if conv else nn.Linear(6, 5)
    model = nn.Sequential(base)
    registry = LayerRegistry(model)
    layer = registry.wrap("0")
    shape = (4, 6, 3, 3) if conv else (4, 6)
    registry.activate([{"0": Factors(torch.randn(shape), torch.randn(5, 4, *([1, 1] if conv else [])))}
                       for _ in range(2)])  # fmt: skip
    return registry, layer


@pytest.mark.parametrize("conv", [False, True])
def test_routes_are_per_position_weights(conv):
    """All-ones routes are the unrouted layer; a LoRA masked off on the left half changes
    nothing there, and on the right half is what it is unrouted."""
    registry, layer = _layer(conv)
    x = torch.randn(2, 6, 4, 4) if conv else torch.randn(2, 16, 6)
    state = registry.state
    state.weights = torch.tensor([[0.7, 0.4]])
    state.sliced = False
    plain = layer(x)
    state.routes = Routes(torch.ones(2, 2, 4, 4))
    torch.testing.assert_close(layer(x), plain, atol=1e-6, rtol=0)
    right = torch.zeros(2, 2, 4, 4)
    right[:, 0] = 1
    right[:, 1, :, 2:] = 1
    state.routes = Routes(right)
    routed = layer(x)
    state.routes, state.weights = None, torch.tensor([[0.7, 0.0]])
    first_only = layer(x)
    as_grid = (lambda y: y) if conv else (lambda y: y.view(2, 4, 4, 5).permute(0, 3, 1, 2))
    torch.testing.assert_close(as_grid(routed)[..., :2], as_grid(first_only)[..., :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(as_grid(routed)[..., 2:], as_grid(plain)[..., 2:], atol=1e-6, rtol=0)


def test_a_coarser_layer_reads_the_area_average():
    registry, layer = _layer(False)
    x = torch.randn(1, 4, 6)  # a 2x2 layer of an 4x4 latent
    state = registry.state
    state.weights, state.sliced = torch.tensor([[1.0, 0.0]]), False
    half = torch.zeros(1, 2, 4, 4)
    half[:, 0, :, :2] = 1  # the left half: the left column of the 2x2 layer at full weight
    state.routes = Routes(half)
    routed = layer(x)
    state.routes = None
    plain, base = layer(x), layer.base(x)
    torch.testing.assert_close(routed[:, [0, 2]], plain[:, [0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[:, [1, 3]], base[:, [1, 3]], atol=1e-6, rtol=0)


def test_the_probe_leaves_the_step_bit_for_bit(four):
    unet = four.pipeline.unet
    torch.manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=text).sample
        with AttentionProbe(unet, [[1, 2], [5]]) as probe:
            probed = unet(latents, 10, encoder_hidden_states=text).sample
        probe.step((8, 8))
        after = unet(latents, 10, encoder_hidden_states=text).sample
    assert torch.equal(plain, probed) and torch.equal(plain, after)
    maps = probe.maps()
    assert maps.shape == (2, 2, 8, 8) and (maps > 0).all() and (maps <= 1).all()


def test_trigger_positions_in_the_encoding(four):
    tokenizer = four.pipeline.tokenizer
    twice = phrase_positions(tokenizer, "a zq hero and a zq hero", "zq hero")
    assert len(twice) == 2 * len(tokenizer("zq hero", add_special_tokens=False).input_ids)
    positions = phrase_positions(tokenizer, PROMPT, "vx cape")
    ids = tokenizer(PROMPT).input_ids
    cape = tokenizer("vx cape", add_special_tokens=False).input_ids
    assert [ids[p] for p in positions] == cape
    assert phrase_positions(tokenizer, PROMPT, "missing words") == []
    table = four.trigger_tokens(PROMPT, ["hero", "cape"])
    assert table.shape == (2, 77) and table[1, positions].all() and not table[0, positions].any()


def test_a_trigger_s_clause_runs_to_the_nearest_comma_or_and(four):
    tokenizer = four.pipeline.tokenizer
    ids = tokenizer(PROMPT).input_ids
    hero = clause_positions(tokenizer, PROMPT, "zq hero")
    assert tokenizer.decode([ids[p] for p in hero]) == "a zq hero wearing a vx cape"
    assert clause_positions(tokenizer, PROMPT, "vx cape") == hero
    assert clause_positions(tokenizer, PROMPT, "missing words") == []
    two = "a (zq hero:1.2) on the left and a kw lamp on the right; qj ink"
    assert four.clause_texts(two, ["hero", "cape", "lamp", "ink"]) == {
        "hero": "a zq hero on the left", "lamp": "a kw lamp on the right", "ink": "qj ink"}  # fmt: skip
    table = four.trigger_tokens(PROMPT, ["hero", "lamp"], clauses=True)
    assert table[0, hero].all() and table[0].sum() == len(hero) and not table[1, hero].any()


def test_loras_of_one_clause_share_its_region_and_its_text(four):
    by_clause, by_trigger = Routed(prompts=None), Routed(prompts=None, locate="trigger")
    gen(four, by_clause)
    gen(four, by_trigger)
    assert by_clause.group == [0, 0, 1] and by_trigger.group == [0, 1, 2]  # hero and cape, then the lamp
    assert torch.equal(by_clause.masks[:, 0], by_clause.masks[:, 1])
    assert not torch.equal(by_clause.masks, by_trigger.masks)
    clauses = Routed()
    assert clauses.prompts == "clauses" and clauses.probe_with == "base"  # the defaults
    latents = gen(four, clauses)
    assert not clauses.probe_row.any()  # no LoRA acts before its place is known
    merged_probe = Routed(probe_with="loras")
    assert (gen(four, merged_probe) - latents).abs().max() > 1e-3 and torch.equal(merged_probe.probe_row,
                                                                                    merged_probe.row)  # fmt: skip
    assert clauses.prompted == [[0, 1], [2]]  # the style reads no text of its own
    assert clauses.lora_on.tolist() == [[1, 1, 0, 1], [0, 0, 1, 1]]
    assert (latents - gen(four, by_clause)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="routed locate is clause or trigger"):
        Routed(locate="token")
    with pytest.raises(ValueError, match="a LoRA name -> text mapping or 'clauses', got 'clause'"):
        Routed(prompts="clause")


def test_regional_reads_each_region_s_clause(four):
    method = Regional(regions={"hero": [0, 0, 0.5, 1], "lamp": [0.5, 0, 1, 1]}, prompts="clauses")
    prompted = gen(four, method, ["hero", "lamp", "ink"])
    assert list(method.context.region_states) == ["hero", "lamp"]
    plain = gen(four, Regional(regions=method.regions), ["hero", "lamp", "ink"])
    assert (prompted - plain).abs().max() > 1e-3


def test_one_lora_or_every_lora_global_is_merge(four):
    torch.testing.assert_close(gen(four, Routed(), ["hero"]), gen(four, "merge", ["hero"]), atol=1e-4, rtol=0)
    everywhere = Routed(roles=dict.fromkeys(("hero", "cape", "lamp", "ink"), "global"))
    torch.testing.assert_close(gen(four, everywhere), gen(four, "merge"), atol=1e-4, rtol=0)
    assert (gen(four, Routed()) - gen(four, "merge")).abs().max() > 1e-3


def test_regions_follow_the_attention_maps():
    """Each map is scaled to [0, 1] over the image; a region LoRA owns the pixels where its
    share is the highest (the background's map competes) and at least the threshold; the
    background takes what no region does, the style everything."""
    method = Routed(threshold=0.5, grow=0)
    method.role, method.regions, method.group = ["region", "region", "complement", "global"], [0, 1, 2], [0, 1, 2]
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, :, :2] = 2.0  # hero on the left
    maps[0, 1, :, 3] = 0.5  # cape on the far right
    maps[0, 1, 0, 2] = 0.2  # too faint (a share of 0.4)
    maps[0, 2, :, 2] = 1.0  # the background's words in the third column
    masks = method.masks_from(maps)
    assert masks[0, 0, :, :2].eq(1).all() and masks[0, 0, :, 2:].eq(0).all()
    assert masks[0, 1, :, 3].eq(1).all() and masks[0, 1, :, :3].eq(0).all()
    assert masks[0, 2, :, 2].eq(1).all() and masks[0, 2, :, [0, 1, 3]].eq(0).all()
    assert masks[0, 3].eq(1).all()


def test_routed_keeps_its_masks_and_checks_its_settings(four):
    method = Routed()
    gen(four, method)
    side = SIZE // four.pipeline.vae_scale_factor
    assert method.masks.shape == (2, 4, side, side)
    assert method.masks[:, 3].eq(1).all()  # the style is global
    with pytest.raises(ValueError, match="not in the composition: nobody"):
        gen(four, Routed(roles={"nobody": "global"}))
    with pytest.raises(ValueError, match="routed roles are region, complement, global"):
        Routed(roles={"hero": "left"})
    with pytest.raises(ValueError, match="one prompt per call"):
        four.generate(["a zq hero", "a vx cape"], loras=["hero", "cape"], method="routed",
                      sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE))  # fmt: skip


def test_the_api_returns_each_lora_s_region_as_an_image(four):
    images, masks = four.generate(PROMPT, loras=["hero", "cape", "lamp", "ink"], method="routed", seed=[5, 6],
                                  sampling=SAMPLING, run=RunOptions(return_masks=True))  # fmt: skip
    assert len(images) == len(masks) == 2 and set(masks[0]) == {"hero", "cape", "lamp", "ink"}
    assert all(mask.size == images[0].size and mask.mode == "L" for mask in masks[1].values())
    assert min(masks[0]["ink"].getdata()) == 255  # the style acts everywhere
    _, none = four.generate(PROMPT, loras=["hero", "cape"], method="merge", sampling=SAMPLING,
                            run=RunOptions(return_masks=True))  # fmt: skip
    assert none == [{}]


def test_regional_returns_its_boxes(four):
    method = {"regions": {"hero": [0, 0, 0.5, 1]}}
    _, masks = four.generate(PROMPT, loras=["hero", "cape"], method="regional", method_params=method, sampling=SAMPLING,
                             run=RunOptions(return_masks=True))  # fmt: skip
    hero, cape = masks[0]["hero"], masks[0]["cape"]  # the cape covers everything: halves where both act
    assert hero.getpixel((0, 0)) == 128 and hero.getpixel((SIZE - 1, 0)) == 0 and cape.getpixel((SIZE - 1, 0)) == 255


def test_the_overlay_tints_partial_regions_only():
    from PIL import Image

    from compose.overlay import PALETTE, legend, mask_overlay

    image = Image.new("RGB", (4, 4), (128, 128, 128))
    left = Image.new("L", (4, 4), 0)
    left.paste(255, (0, 0, 2, 4))
    masks = {"hero": left, "ink": Image.new("L", (4, 4), 255)}
    out = mask_overlay(image, masks, size=8)
    assert out.size == (8, 8)
    tinted, plain = out.getpixel((0, 0)), out.getpixel((7, 0))
    assert plain[0] == plain[1] == plain[2] and tinted[0] > tinted[1]  # hero's colour is red, ink is not drawn
    assert legend(masks) == [("hero", PALETTE[0]), ("ink (everywhere)", (0, 0, 0))]


def test_region_prompts_change_only_their_regions(four):
    """A region that attends to the prompt's own encoding, or no region at all, leaves the
    layer's output as it was; the conditional rows change, the unconditional do not."""
    from compose.region_prompts import RegionPrompts

    unet = four.pipeline.unet
    state = four.registries["unet"].state
    torch.manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    other = torch.randn(1, 77, unet.config.cross_attention_dim)
    rows = torch.cat([torch.zeros_like(text), text]).expand(2, -1, -1)

    def call(masks=None, region=None):
        with torch.no_grad():
            if masks is None:
                return unet(latents, 10, encoder_hidden_states=rows).sample
            with RegionPrompts(unet, state, masks, [region], torch.ones(1, 0)):
                return unet(latents, 10, encoder_hidden_states=rows).sample

    plain = call()
    assert torch.equal(call(torch.zeros(1, 1, 8, 8), other), plain)
    torch.testing.assert_close(call(torch.ones(1, 1, 8, 8), text), plain, atol=1e-5, rtol=0)
    changed = call(torch.ones(1, 1, 8, 8), other)
    assert (changed - plain).abs().max() > 1e-3


def test_routed_with_a_prompt_per_region(four):
    plain = gen(four, Routed(prompts=None))
    prompted = gen(four, Routed(prompts={"hero": "a zq hero, tall", "lamp": "a lamp"}))
    assert prompted.shape == plain.shape and (prompted - plain).abs().max() > 1e-3
    assert own_texts({"lamp": "a lamp"}, [four.loras["lamp"]]) == {"lamp": "kw lamp, a lamp"}
    with pytest.raises(ValueError, match="ink acts on the whole picture"):
        gen(four, Routed(prompts={"ink": "in ink"}))
    with pytest.raises(ValueError, match="not in the composition: nobody"):
        gen(four, Routed(prompts={"nobody": "x"}))
