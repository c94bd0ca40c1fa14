"""A1111's ``<lora:name:weight>`` prompt tags and loractl-style weight schedules."""

from __future__ import annotations

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING

from compose import Composer, generate_kwargs, read_record, save_png
from compose.prompts import LoRAUse, extract_lora_tags, parse_schedule, schedule_value, weight_table


def test_tags_are_extracted_and_stripped():
    text, tags = extract_lora_tags(
        "a knight, <lora:knight:0.7>, watercolor <lora:wc> <lora:x:0@0,1@0.5> <lora:y:0.5:lbw=OUTALL>"
    )
    assert text == "a knight, watercolor"
    assert tags == [LoRAUse("knight", 0.7), LoRAUse("wc", 1.0), LoRAUse("x", "0@0,1@0.5"), LoRAUse("y", 0.5, "OUTALL")]
    assert extract_lora_tags("no tags here") == ("no tags here", [])
    with pytest.raises(ValueError, match="weight@progress"):
        extract_lora_tags("<lora:a:heavy>")


def test_schedules():
    points = parse_schedule("1@0.5, 0@0")
    assert points == [(0.0, 0.0), (0.5, 1.0)]
    assert [schedule_value(points, p) for p in (0, 0.25, 0.5, 0.9)] == [0.0, 0.5, 1.0, 1.0]
    table = weight_table([0.8, "0@0,1@0.5"], 4)
    assert table.shape == (4, 2) and table[:, 0].tolist() == pytest.approx([0.8] * 4)
    assert table[:, 1].tolist() == [0, 0.5, 1, 1]
    with pytest.raises(ValueError, match="progress in"):
        parse_schedule("1@2")


@pytest.fixture(scope="module")
def composer(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, name in enumerate(("a", "b")):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name)
    return composer


def gen(composer, prompt, **kwargs):
    return composer.generate(prompt, seed=2, sampling=SAMPLING, run=AS_LATENTS, **kwargs)


@pytest.mark.parametrize("method", ["merge", "composite", "cmlora"])
def test_a_tag_equals_the_loras_argument(composer, method, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSE_CACHE", str(tmp_path))
    tagged = gen(composer, "a cat <lora:b:0.6>", loras=[("a", 1.0)], method=method)
    explicit = gen(composer, "a cat", loras=[("a", 1.0), ("b", 0.6)], method=method)
    torch.testing.assert_close(tagged, explicit, atol=0, rtol=0)
    with pytest.raises(ValueError, match="LoRA .a. is listed in loras= and as a <lora:...> tag"):
        gen(composer, "a cat <lora:a>", loras=["a"])


def test_constant_schedule_equals_the_constant_weight(composer):
    torch.testing.assert_close(
        gen(composer, "a cat", loras=[("a", "0.7@0,0.7@1")], method="composite"),
        gen(composer, "a cat", loras=[("a", 0.7)], method="composite"),
        atol=1e-6, rtol=0,
    )  # fmt: skip


def test_schedule_changes_weights_per_step(composer):
    seen = []
    hook = composer.registries["unet"].state
    original = hook.for_layer

    def spy(index):
        w = original(index)
        if index == 0 and w is not None:
            seen.append(w[0].tolist())
        return w

    hook.for_layer = spy
    try:
        gen(composer, "a cat", loras=[("a", "0@0,1@1"), ("b", 0.5)], method="merge", lora_scale=1.0)
    finally:
        del hook.for_layer
    assert [round(w[0], 4) for w in seen] == [0.0, 0.25, 0.5, 0.75] and {w[1] for w in seen} == {0.5}


def test_tags_survive_metadata_and_reproduce(composer, tmp_path):
    image = composer.generate("a cat <lora:b:0@0,1@0.5>", loras=["a"], sampling=SAMPLING)[0]
    # A1111 reads no schedule: the UNet's is its mean over the 4 steps, (0 + .5 + 1 + 1) / 4, x lora scale 0.8;
    # the text encoder's its first value, which the encoder used. "a", given beside the prompt, comes
    # first in Switch's order, so it is written before the prompt's own tag
    assert image.info["parameters"].startswith("<lora:a:0.8> a cat <lora:b:0:0.5>\n")
    assert 'Lora weights: "a: 1, b: 0@0,1@0.5"' in image.info["parameters"]
    record = read_record(save_png(image, tmp_path / "t.png"))
    again = composer.generate(**generate_kwargs(record))[0]
    assert list(again.getdata()) == list(image.getdata())
