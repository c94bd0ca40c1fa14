"""LoRA Block Weight: block numbering, presets, and exact equivalence with a LoRA cut to blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING
from loras import peft_state_dict, write

from compose import Composer
from compose.block_weights import block_of, parse_block_weights


@pytest.mark.parametrize(
    ("module", "block"),
    [
        ("conv_in", "IN00"),
        ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "IN02"),
        ("down_blocks.0.downsamplers.0.conv", "IN03"),
        ("down_blocks.1.resnets.0.conv1", "IN04"),
        ("down_blocks.3.resnets.1.conv2", "IN11"),
        ("mid_block.attentions.0.proj_in", "M00"),
        ("up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k", "OUT05"),
        ("up_blocks.3.attentions.0.proj_out", "OUT09"),
        ("time_embedding.linear_1", None),
    ],
)
def test_ldm_block_numbering(module, block):
    assert block_of(module) == block


def test_presets_and_vectors():
    inall = parse_block_weights("INALL", sdxl=False)
    assert inall["BASE"] == 1 and inall["IN08"] == 1 and inall["M00"] == 0 and inall["OUT11"] == 0
    assert parse_block_weights("outs", sdxl=True)["OUT05"] == 1
    assert len(parse_block_weights(",".join(["1"] * 26), sdxl=False)) == 26
    with pytest.raises(ValueError, match="takes 12 or 20 values, got 17"):
        parse_block_weights(",".join(["1"] * 17), sdxl=True)
    with pytest.raises(ValueError, match="a preset"):
        parse_block_weights("LOUD", sdxl=False)


@pytest.fixture(scope="module")
def composer(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    composer.load_lora(lora_files["sd1", 0]["peft"], name="a")
    return composer


def gen(composer, loras, method="composite"):
    return composer.generate("a cat", loras=loras, method=method, seed=1, sampling=SAMPLING, run=AS_LATENTS)


def test_all_and_none(composer):
    """Every block at 1 is the plain LoRA (26 values: the tiny UNet has attention in
    OUT00/OUT01, which SD1.5 and so the 17-value layout do not)."""
    every = ",".join(["1"] * 26)
    torch.testing.assert_close(gen(composer, [("a", 0.9, every)]), gen(composer, [("a", 0.9)]), atol=0, rtol=0)
    torch.testing.assert_close(gen(composer, [("a", 0.9, "NONE")], "merge"), gen(composer, [], "merge"))


@pytest.mark.parametrize("method", ["merge", "composite", "klora"])
def test_preset_equals_the_lora_cut_to_its_blocks(composer, lora_files, tmp_path, method):
    """INALL keeps the input blocks (and the text encoder): the same as a LoRA file that
    only has those modules."""
    parts = lora_files["sd1", 0]["parts"]
    cut = {**parts, "unet": {m: f for m, f in parts["unet"].items() if (block_of(m) or "").startswith("IN")}}
    assert 0 < len(cut["unet"]) < len(parts["unet"])
    composer.load_lora(write(tmp_path / "cut.safetensors", peft_state_dict(cut)), name=f"cut-{method}")
    try:
        expected = gen(composer, [(f"cut-{method}", 0.8)], method)
        torch.testing.assert_close(gen(composer, [("a", 0.8, "INALL")], method), expected, atol=1e-5, rtol=0)
        tagged = composer.generate("a cat <lora:a:0.8:lbw=INALL>", method=method, seed=1, sampling=SAMPLING,
                                   run=AS_LATENTS)  # fmt: skip
        torch.testing.assert_close(tagged, expected, atol=1e-5, rtol=0)
    finally:
        composer.unload_lora(f"cut-{method}")
