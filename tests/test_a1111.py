"""AUTOMATIC1111 compatibility: our PNGs as A1111 and a third-party parser read them, A1111's
LoRA tag forms, and its prompt syntax (emphasis, BREAK, 75-token chunks)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE, STEPS
from sd_parsers import ParserManager

from compose import Composer, SamplingConfig, generate_kwargs, read_record, save_png
from compose.emphasis import _token_ids, batch_chunks, chunks, emphasised, parse_attention
from compose.metadata import RecordError, a1111_hash_name, check_record
from compose.prompts import LoRAUse, a1111_tag, extract_lora_tags
from compose.tiny import tiny_pipeline
from compose.tokenizer import clip_tokenizer
from compose.weights import weight_plan

# -- A1111's reader, written from its documented infotext format (modules/infotext_utils.py) -----

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_generation_parameters(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters``: prompt lines, ``Negative prompt:`` lines, and a
    last line of ``Key: value`` pairs (values JSON-quoted where they hold ``,`` or ``:``)."""
    res: dict[str, str] = {}
    prompt, negative, done = "", "", False
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in RE_PARAM.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = RE_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.groups()
        else:
            res[key] = value
    res["Prompt"], res["Negative prompt"] = prompt, negative
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    return res


def a1111_loras(prompt: str) -> dict[str, tuple[float, float]]:
    """``{name: (te, unet)}`` as A1111's built-in Lora extension reads the prompt's tags."""
    found = {}
    for kind, body in RE_EXTRA_NETWORK.findall(prompt):
        items = body.split(":")
        positional = [i for i in items if len(i.split("=", 2)) != 2]
        named = dict(i.split("=", 1) for i in items if len(i.split("=", 2)) == 2)
        if kind == "lora":
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
            found[positional[0]] = (te, unet)
    return found


def a1111_hashes(field: str) -> dict[str, str]:
    """``Lora hashes`` as A1111 reads it when the infotext is pasted (lora_script.infotext_pasted)."""
    pairs = [x.strip().split(":", 1) for x in field.split(",")]
    return {name.strip().replace(",", ""): digest.strip() for name, digest in pairs}


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "myModel_v2.safetensors"
    path.write_bytes(b"not a real checkpoint, only hashed" * 100)
    return path


@pytest.fixture(scope="module")
def composer(lora_files, checkpoint) -> Composer:
    composer = Composer(tiny_pipeline("sd1"), model_name=str(checkpoint))
    for i, name in enumerate(("a", "b", "c")):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name)
    return composer


def gen(composer, prompt, **kwargs):
    return composer.generate(prompt, seed=2, sampling=SAMPLING, run=AS_LATENTS, **kwargs)


# -- PNG metadata -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png(composer, tmp_path_factory):
    image = composer.generate(
        "a cat, <lora:b:0.5:1>, (watercolor:1.2) <lora:c:0@0,1@0.5>",
        loras=[("a", 0.7)],
        negative_prompt="blurry, (lowres)",
        seed=11,
        sampling=SamplingConfig(steps=STEPS, guidance_scale=6.0, width=SIZE, height=SIZE),
    )[0]
    return save_png(image, tmp_path_factory.mktemp("png") / "x.png")


def test_a1111_reads_every_field(png, composer, checkpoint):
    from PIL import Image

    with Image.open(png) as image:
        fields = parse_generation_parameters(image.text["parameters"])
    assert fields["Negative prompt"] == "blurry, (lowres)"
    assert fields["Steps"] == str(STEPS) and fields["Seed"] == "11" and fields["CFG scale"] == "6.0"
    assert (fields["Size-1"], fields["Size-2"]) == (str(SIZE), str(SIZE))
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "DDIM"  # tiny: leading, offset 1
    assert fields["RNG"] == "CPU"
    assert fields["Model"] == "myModel_v2"
    assert fields["Model hash"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert fields["Composition method"] == "merge"
    hashes = a1111_hashes(fields["Lora hashes"])
    assert hashes == {name: composer.loras[name].short_hash for name in ("b", "c", "a")}
    loras = a1111_loras(fields["Prompt"])
    # effective weights (x lora scale 0.8); c's UNet schedule as its mean over the 4 steps, (0 + .5 + 1 + 1) / 4,
    # its text encoder weight the schedule's first value, which the encoder used
    assert loras == {"a": (0.56, 0.56), "b": (0.4, 0.8), "c": (0.0, 0.5)}
    assert fields["Prompt"].count("<lora:b:") == 1
    assert fields["Prompt"].startswith("<lora:a:0.56> a cat, <lora:b:0.4:0.8>,")


def test_a_third_party_parser_reads_it(png, checkpoint):
    info = ParserManager().parse(png)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["scheduler"] == "DDIM"
    numbers = {key: sampler.parameters[key] for key in ("steps", "seed", "cfg_scale")}
    assert numbers == {"steps": str(STEPS), "seed": "11", "cfg_scale": "6.0"}
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (sampler.model.name, sampler.model.hash) == ("myModel_v2", digest[:10])
    assert sampler.prompts[0].value.startswith("<lora:a:0.56> a cat, <lora:b:0.4:0.8>, (watercolor:1.2)")
    assert sampler.prompts[0].value.endswith("<lora:c:0:0.5>")
    assert sampler.negative_prompts[0].value == "blurry, (lowres)"


def test_the_record_keeps_what_a1111_cannot_read_and_reproduces(png, composer):
    from PIL import Image

    record = read_record(png)
    by_name = {lora["name"]: lora for lora in record["loras"]}
    assert by_name["c"]["weight"] == "0@0,1@0.5"
    assert (by_name["b"]["weight"], by_name["b"]["text_weight"]) == (1.0, 0.5)
    assert record["prompt_syntax"] == "a1111" and record["prompt_chunks"] == 1 and record["pad_conds"] is False
    again = composer.generate(**generate_kwargs(record))[0]
    assert list(again.getdata()) == list(Image.open(png).convert("RGB").getdata())


def test_an_empty_negative_prompt_has_no_line_and_a_plain_model_no_hash():
    composer = Composer.tiny("sd1")
    text = composer.generate("a cat", sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))[0].info["parameters"]
    assert "Negative prompt" not in text and "Model hash" not in text
    fields = parse_generation_parameters(text)
    assert fields["Prompt"] == "a cat" and fields["Negative prompt"] == "" and fields["Model"] == "tiny:sd1"


def test_names_are_written_as_a1111_writes_them():
    assert a1111_hash_name("my,lo:ra") == "mylora"
    assert a1111_tag("my:lora", 0.8, 0.8, None, None) == "<lora:mylora:0.8>"
    assert a1111_tag("a", 1.0, 0.5, "OUTALL", [2, None]) == "<lora:a:0.5:1:lbw=OUTALL:start=2>"
    assert a1111_tag("a", 1.0, 1.0, None, [0, 3]) == "<lora:a:1:start=0:stop=3>"


def test_a_long_prompt_against_a_short_negative_pads_conds(composer):
    image = composer.generate(
        "a cat, " + "very " * 80 + "tail", sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE)
    )[0]
    record = json.loads(image.info["compose"])
    assert record["prompt_chunks"] == 2 and record["pad_conds"] is True and "prompt_dropped" not in record
    assert "Pad conds: True" in image.info["parameters"]


def test_forged_lora_fields_are_refused(png):
    record = read_record(png)
    record["loras"][0]["step_window"] = [3, 1]
    with pytest.raises(RecordError, match="0 <= start < stop"):
        check_record(record)
    record["loras"][0]["step_window"], record["loras"][0]["text_weight"] = None, float("nan")
    with pytest.raises(RecordError, match="finite"):
        check_record(record)


# -- LoRA tags ----------------------------------------------------------------------------------------

TAGS = [
    ("<lora:a>", LoRAUse("a", 1.0)),
    ("<lora:a:0.5>", LoRAUse("a", 0.5)),
    ("<lora:a:0.5:1>", LoRAUse("a", 1.0, text=0.5)),
    ("<lora:a:0.5:0.5>", LoRAUse("a", 0.5)),
    ("<lora:a:te=0.2:unet=0.9>", LoRAUse("a", 0.9, text=0.2)),
    ("<lora:a:te=0.2>", LoRAUse("a", 0.2)),
    ("<lora:a:unet=0.9>", LoRAUse("a", 0.9, text=1.0)),
    ("<lora:a:0.5:unet=1>", LoRAUse("a", 1.0, text=0.5)),
    ("<lora: a :0.7:lbw=OUTALL>", LoRAUse("a", 0.7, "OUTALL")),
    ("<lora:a:0@0,1@0.5>", LoRAUse("a", "0@0,1@0.5")),
    ("<lora:a:te=0.3:unet=0@0,1@1>", LoRAUse("a", "0@0,1@1", text=0.3)),
    ("<lora:a:1:step=2-4>", LoRAUse("a", 1.0, steps=(2, 4))),
    ("<lora:a:1:start=3>", LoRAUse("a", 1.0, steps=(3, None))),
    ("<lora:a:1:stop=5>", LoRAUse("a", 1.0, steps=(0, 5))),
    ("<lyco:a:0.5>", LoRAUse("a", 0.5)),
    ("<lora:a:0.5:hr=0.2>", LoRAUse("a", 0.5)),
]


@pytest.mark.parametrize(("tag", "use"), TAGS)
def test_tag_forms(tag, use):
    assert extract_lora_tags(f"a cat, {tag}, red") == ("a cat, red", [use])


BAD_TAGS = [
    ("<lora:a:unet=abc>", r"<lora:a:unet=abc>: the UNet weight 'abc' is neither a number nor a schedule"),
    ("<lora:a:1:IN02>", r"<lora:a:1:IN02>: .*block weights are written lbw="),
    ("<lora:a:1:1:8>", r"<lora:a:1:1:8>: at most two weights.*dyn"),
    ("<lora:a:dyn=8>", r"<lora:a:dyn=8>: unknown option 'dyn'"),
    ("<lora:a:1:foo=1>", r"unknown option 'foo'"),
    ("<lora:a:1:step=5>", r"step= is a range"),
    ("<lora:a:1:step=4-2>", r"0 <= start < stop"),
    ("<lora:a:1:start=x>", r"whole step numbers"),
    ("<lora:a:1:step=1-2:stop=3>", r"not both"),
    ("<lora:a:inf>", r"<lora:a:inf>: the weight must be a finite number"),
    ("<lora:a:te=>", r"the weight is empty"),
]


@pytest.mark.parametrize(("tag", "message"), BAD_TAGS)
def test_bad_tags_are_refused_naming_the_tag(tag, message):
    with pytest.raises(ValueError, match=message):
        extract_lora_tags(f"a cat {tag}")


def test_text_encoder_and_unet_weights_differ(composer):
    split = gen(composer, "a cat <lora:a:0.5:1>")
    assert not torch.equal(split, gen(composer, "a cat <lora:a:1>"))
    assert not torch.equal(split, gen(composer, "a cat <lora:a:0.5>"))
    torch.testing.assert_close(split, gen(composer, "a cat", loras=[LoRAUse("a", 1.0, text=0.5)]), atol=0, rtol=0)
    same = gen(composer, "a cat", loras=[("a", 1.0, None, 1.0, None)])
    torch.testing.assert_close(same, gen(composer, "a cat <lora:a:1>"), atol=0, rtol=0)


def test_steps_window(composer):
    layers = list(composer.registries["unet"].layers)
    plan = weight_plan([LoRAUse("a", 0.5, steps=(1, 3)), LoRAUse("b")], 4, 1.0, layers, composer.is_sdxl)
    assert plan.steps[:, 0].tolist() == [0.0, 0.5, 0.5, 0.0] and plan.steps[:, 1].tolist() == [1.0] * 4
    assert plan.text.tolist() == [0.5, 1.0]  # the text encoders run once, before the steps
    windowed = gen(composer, "a cat <lora:a:1:step=0-2>")
    torch.testing.assert_close(windowed, gen(composer, "a cat", loras=[LoRAUse("a", steps=(0, 2))]), atol=0, rtol=0)
    assert not torch.equal(windowed, gen(composer, "a cat <lora:a:1>"))


# -- prompt syntax -------------------------------------------------------------------------------------

ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a [b] c", [("a ", 1.0), ("b", 1 / 1.1), (" c", 1.0)]),
    ("(word:1.0)", [("word", 1.0)]),
    ("x BREAK y", [("x", 1.0), ("BREAK", -1.0), ("y", 1.0)]),
    ("xBREAKy", [("xBREAKy", 1.0)]),
    ("", [("", 1.0)]),
    (  # A1111's own docstring example
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION)
def test_parse_attention(text, expected):
    parsed = parse_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("text", ["[cat:dog:0.5]", "[cat|dog]", "(cat:1.2.3)"])
def test_syntax_compose_cannot_honour_is_refused(text):
    with pytest.raises(ValueError, match="prompt editing|not a number"):
        parse_attention(text)


def test_chunks():
    tokenizer = clip_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    (short,) = chunks(tokenizer, "a (cat:1.5)")
    assert short.ids[:4] == [bos, 320, 2368, eos] and len(short.ids) == 77
    assert short.weights[:4] == [1.0, 1.0, 1.5, 1.0] and set(short.weights[4:]) == {1.0}
    assert [len(chunks(tokenizer, "word " * n)) for n in (0, 75, 76, 150, 151)] == [1, 1, 2, 2, 3]
    assert len(chunks(tokenizer, "a BREAK b")) == 2 and len(chunks(tokenizer, "BREAK a")) == 2
    vocab = tokenizer.get_vocab()
    first, second = chunks(tokenizer, "word " * 70 + ", " + "tail " * 10)  # the chunk ends at the comma
    assert first.ids[71:73] == [vocab[",</w>"], eos] and second.ids[1:12] == [vocab["tail</w>"]] * 10 + [eos]
    padded = batch_chunks(tokenizer, ["word " * 80, ""])
    assert [len(c) for c in padded] == [2, 2] and padded[1][1] == chunks(tokenizer, "")[0]
    unknown = tokenizer.unk_token
    assert _token_ids(tokenizer, [",</w>", "zqxjv</w>", unknown]) == [vocab[",</w>"], None, vocab[unknown]]


def test_emphasis_weights_tokens_and_restores_the_mean():
    states = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    out = emphasised(states, weights)
    torch.testing.assert_close(out.mean(dim=(1, 2)), states.mean(dim=(1, 2)))
    ratio = out[0] / states[0]
    torch.testing.assert_close(ratio[3], 1.5 * ratio[4])
    torch.testing.assert_close(ratio[4], ratio[5])
    assert torch.equal(out[1], states[1])  # a row without emphasis is untouched
    centred = states - states.mean(dim=(1, 2), keepdim=True)  # no mean to restore: the weights alone
    torch.testing.assert_close(emphasised(centred, weights), centred * weights[..., None])


def encode(composer, prompts, negative=""):
    return composer.encoder.encode(prompts, [negative] * len(prompts), True, (SIZE, SIZE)).encoder_hidden_states


def test_emphasis_changes_the_encoding_and_neutral_weights_do_not():
    composer = Composer.tiny("sd1")
    plain = encode(composer, ["a red cat"])
    torch.testing.assert_close(encode(composer, ["a red (cat:1.0)"]), plain, atol=0, rtol=0)
    strong = encode(composer, ["a red (cat:1.5)"])
    assert strong.shape == plain.shape and not torch.allclose(strong, plain)
    torch.testing.assert_close(strong[0], plain[0], atol=0, rtol=0)  # the negative is untouched
    chunked = composer.encoder.chunks(["", "a red cat"])[0]  # the A1111 path on a plain prompt: diffusers' result
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=0)


def test_long_prompts_are_no_longer_truncated():
    composer = Composer.tiny("sd1")
    head = "a cat, " + "very " * 80
    red, blue = encode(composer, [head + "red"]), encode(composer, [head + "blue"])
    assert red.shape[1] == 2 * 77  # the negative padded to the prompt's two chunks
    assert not torch.allclose(red[1, 77:], blue[1, 77:]) and torch.equal(red[1, :77], blue[1, :77])
    broken = encode(composer, ["a cat BREAK red"])
    assert broken.shape[1] == 2 * 77


def test_sdxl_reads_the_syntax_too():
    composer = Composer.tiny("sdxl")
    conditioning = composer.encoder.encode(["a (cat:1.4) " + "very " * 80], [""], True, (SIZE, SIZE))
    assert conditioning.encoder_hidden_states.shape[1] == 2 * 77
    plain = composer.encoder.encode(["a cat"], [""], True, (SIZE, SIZE))
    neutral = composer.encoder.encode(["a (cat:1.0)"], [""], True, (SIZE, SIZE))
    torch.testing.assert_close(neutral.encoder_hidden_states, plain.encoder_hidden_states, atol=0, rtol=0)
    assert conditioning.added_cond_kwargs["text_embeds"].shape == plain.added_cond_kwargs["text_embeds"].shape
