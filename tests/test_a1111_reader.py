"""Reading AUTOMATIC1111's ``parameters`` text (PNG Info) into :meth:`Composer.generate`'s
settings: our own text back to the same settings and pixels, A1111's 1.9 and older texts, and
the texts that are refused."""

from __future__ import annotations

import json

import pytest
from conftest import STEPS

from compose import Composer, SamplingConfig
from compose.a1111 import parse_parameters, settings_from_parameters
from compose.metadata import a1111_parameters, schedule_type
from compose.prompts import LoRAUse, extract_lora_tags
from compose.schedulers import SCHEDULERS, a1111_sampler_name
from compose.tiny import tiny_pipeline, write_random_loras

PROMPT = "a zq creature in a red hat, <lora:random-character:0.5:1>\n(watercolor:1.2) <lora:random-style:1>"


@pytest.fixture(scope="module")
def composer(tmp_path_factory) -> Composer:
    pipeline = tiny_pipeline("sd1")
    paths = write_random_loras(pipeline, tmp_path_factory.mktemp("loras"))
    composer = Composer(pipeline)
    for path in paths:
        composer.load_lora(path)
    return composer


def generated(composer: Composer, scheduler: str, method: str, params: dict):
    sampling = SamplingConfig(steps=STEPS, guidance_scale=6.0, width=48, height=32, scheduler=scheduler)
    return composer.generate(PROMPT, method=method, method_params=params, negative_prompt="blurry,\nlowres", seed=7,
                             sampling=sampling)[0]  # fmt: skip


ROUND_TRIPS = [("dpm++2m-karras", "merge", {}), ("euler-a", "merge", {}), ("dpm++2m", "switch", {"tau": 2})]
"""Karras read from its schedule type, an ancestral sampler's noise, a method with parameters."""


@pytest.fixture(scope="module")
def record(composer) -> dict:
    return json.loads(generated(composer, "dpm++2m", "merge", {}).info["compose"])


@pytest.mark.parametrize(("scheduler", "method", "params"), ROUND_TRIPS)
def test_our_text_reads_back_to_the_record_and_the_same_pixels(composer, scheduler, method, params):
    image = generated(composer, scheduler, method, params)
    record = json.loads(image.info["compose"])
    assert (record["scheduler"], record["width"], record["height"], record["method"]["name"]) == (
        scheduler, 48, 32, method)  # fmt: skip
    settings = settings_from_parameters(image.info["parameters"])
    names = settings.pop("loras")
    assert names == [lora["name"] for lora in record["loras"]] and set(names) <= set(composer.loras)
    text, tags = extract_lora_tags(settings.pop("prompt"))
    assert text == extract_lora_tags(record["prompt"])[0]
    scale = record["lora_scale"]  # the tags carry the weights A1111 applies: weight x LoRA scale
    assert tags == [
        LoRAUse(
            lora["name"],
            lora["weight"] * scale,
            text=None if lora["text_weight"] is None else lora["text_weight"] * scale,
        )  # fmt: skip
        for lora in record["loras"]
    ]
    sampling = SamplingConfig(steps=record["steps"], guidance_scale=record["guidance_scale"], width=record["width"],
                              height=record["height"], scheduler=record["scheduler"])  # fmt: skip
    assert settings == {
        "negative_prompt": record["negative_prompt"],
        "seed": record["seed"],
        "sampling": sampling,
        "method": record["method"]["name"],
        "method_params": record["method"]["parameters"],
        "lora_scale": 1.0,
    }
    kwargs = settings_from_parameters(image.info["parameters"])
    kwargs.pop("loras")  # the tags stay in the prompt, where generate reads them
    again = composer.generate(**kwargs)[0]
    assert list(again.getdata()) == list(image.getdata())
    assert settings_from_parameters(again.info["parameters"]) == {**kwargs, "loras": names}


def test_loras_given_beside_the_prompt_s_tags_read_back_in_their_order(composer):
    """A LoRA passed as an argument comes before the prompt's tags in the composition (the
    order Switch cycles in), so its tag is written before the prompt: the A1111 text alone
    gives the same order and the same pixels."""
    prompt = "a zq creature <lora:random-style:1>"
    image = composer.generate(prompt, loras=["random-character"], method="switch", method_params={"tau": 1}, seed=3,
                              sampling=SamplingConfig(steps=STEPS, width=32, height=32))[0]  # fmt: skip
    names = [lora["name"] for lora in json.loads(image.info["compose"])["loras"]]
    assert names == ["random-character", "random-style"]
    settings = settings_from_parameters(image.info["parameters"])
    assert settings.pop("loras") == names
    assert list(composer.generate(**settings)[0].getdata()) == list(image.getdata())


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_comes_back_from_the_sampler_we_write(composer, record, scheduler):
    sampler, schedule = a1111_sampler_name(scheduler), schedule_type(scheduler, composer.scheduler_config)
    text = a1111_parameters({**record, "scheduler": scheduler, "sampler": sampler, "schedule_type": schedule})
    assert settings_from_parameters(text)["sampling"].scheduler == scheduler


def test_method_parameters_come_back_with_their_types(record):
    parameters = {"alpha": 1.5, "beta": None, "top_k": 3, "scale": "s*", "reference": False,
                  "roles": {"random-character": "content", "it's, top_k=2": "style"}}  # fmt: skip
    settings = settings_from_parameters(
        a1111_parameters({**record, "method": {"name": "klora", "parameters": parameters}})
    )
    assert (settings["method"], settings["method_params"]) == ("klora", parameters)


A1111_19 = """masterpiece, best quality, 1girl, (red scarf:1.2),
snowy forest at dusk, <lora:x:0.7> <lora:add_detail:0.5>
Negative prompt: lowres, bad anatomy,
watermark, easynegative
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3581247762, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, Denoising strength: 0.4, Clip skip: 2, \
Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
ADetailer prompt: "a \\"smiling\\" face, blush", Lora hashes: "x: e3b0c44298fc, add_detail: 7c6bad76eb54", \
TI hashes: "easynegative: c74b4e810b03", Emphasis: Original, Version: v1.9.4"""


def test_an_a1111_1_9_text():
    prompt = "masterpiece, best quality, 1girl, (red scarf:1.2),\n"
    prompt += "snowy forest at dusk, <lora:x:0.7> <lora:add_detail:0.5>"
    negative = "lowres, bad anatomy,\nwatermark, easynegative"
    assert parse_parameters(A1111_19) == {
        "prompt": prompt,
        "negative_prompt": negative,
        "Steps": "28",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "6.5",
        "Seed": "3581247762",
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "VAE hash": "735e4c3a44",
        "Denoising strength": "0.4",
        "Clip skip": "2",
        "Hires upscale": "2",
        "Hires steps": "10",
        "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
        "ADetailer prompt": 'a "smiling" face, blush',
        "Lora hashes": "x: e3b0c44298fc, add_detail: 7c6bad76eb54",
        "TI hashes": "easynegative: c74b4e810b03",
        "Emphasis": "Original",
        "Version": "v1.9.4",
    }
    assert settings_from_parameters(A1111_19) == {
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": 3581247762,
        "sampling": SamplingConfig(steps=28, guidance_scale=6.5, width=512, height=768, scheduler="dpm++2m-karras"),
        "lora_scale": 1.0,
        "loras": ["x", "add_detail"],
    }


SAMPLERS = [
    ("Sampler: DPM++ 2M Karras", "dpm++2m-karras"),  # before 1.9: the schedule in the sampler's name
    ("Sampler: DPM++ 2M Karras, Schedule type: Karras", "dpm++2m-karras"),
    ("Sampler: DPM++ 2M", "dpm++2m"),
    ("Sampler: DPM++ 2M, Schedule type: SGM Uniform", "dpm++2m"),
    ("Sampler: Euler a", "euler-a"),
    ("Sampler: Euler, Schedule type: DDIM", "euler"),
    ("Sampler: DDIM, Schedule type: Automatic", "ddim"),
    ("Sampler: PLMS", "pndm"),
    ("Sampler: UniPC", "unipc"),
]


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLERS)
def test_samplers_old_and_new(sampler, scheduler):
    settings = settings_from_parameters(f"a cat\nSteps: 20, {sampler}, CFG scale: 7, Seed: 965400086, Size: 512x512")
    sampling = SamplingConfig(steps=20, guidance_scale=7.0, width=512, height=512, scheduler=scheduler)
    assert settings == {"prompt": "a cat", "negative_prompt": "", "seed": 965400086, "sampling": sampling, "loras": []}


def test_sampling_fields_the_text_leaves_out_keep_their_defaults():
    settings = settings_from_parameters("a cat\nSteps: 20, Seed: 1, Model: x")
    assert settings["sampling"] == SamplingConfig(steps=20) and settings["seed"] == 1


SETTINGS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
REFUSED = [
    (
        "Sampler: Euler a",
        "Sampler: DPM++ SDE",
        r"Sampler 'DPM\+\+ SDE' is not one compose has; it has DPM\+\+ 2M "
        r"\(dpm\+\+2m\), DPM\+\+ 2M Karras \(dpm\+\+2m-karras\), .*UniPC",
    ),
    ("Sampler: Euler a", "Sampler: Euler, Schedule type: Karras", r"'Euler' with schedule type 'Karras' is not one"),
    ("Sampler: Euler a", "Sampler: Euler, Schedule type: Exponential", r"'Euler' with schedule type 'Exponential'"),
    ("Steps: 20", "Steps: abc", r"Steps must be a whole number, got 'abc'"),
    ("Steps: 20", "Steps: 2.5", r"Steps must be a whole number, got '2.5'"),
    ("Steps: 20", "Steps: 0", r"Steps must be at least 1, got 0"),
    ("Steps: 20", "Steps: 20000", r"Steps must be at most 10000, got 20000"),
    ("Size: 512x512", "Size: 64x", r"Size must be WIDTHxHEIGHT in pixels, such as 512x768, got '64x'"),
    ("Size: 512x512", "Size: 60x64", r"Size 60x64: the width must be a positive multiple of 8 pixels"),
    ("Size: 512x512", "Size: 64x0", r"Size 64x0: the height must be a positive multiple of 8 pixels"),
    ("Size: 512x512", "Size: 64xabc", r"Size must be a whole number, got 'abc'"),
    ("Seed: 1", "Seed: abc", r"Seed must be a whole number, got 'abc'"),
    ("Seed: 1", "Seed: -1", r"Seed must be an integer in \[0, 2\*\*64\), got -1"),
    ("Seed: 1", f"Seed: {2**64}", r"Seed must be an integer in \[0, 2\*\*64\)"),
    ("Seed: 1", f"Seed: {'9' * 5000}", r"Seed '9{37}\.\.\.' is far out of range \(5000 digits\)"),
    ("CFG scale: 7", "CFG scale: nan", r"CFG scale must be a finite number, got nan"),
    ("CFG scale: 7", "CFG scale: high", r"CFG scale must be a number, got 'high'"),
    ("Version: v1", "Composition method: blend", r"Composition method 'blend' is not one compose has \(it has merge"),
]


@pytest.mark.parametrize(("field", "bad", "message"), REFUSED)
def test_refused_naming_the_field_and_the_value(field, bad, message):
    text = f"a cat\n{SETTINGS}, Version: v1".replace(field, bad)
    assert bad in text
    with pytest.raises(ValueError, match=message):
        settings_from_parameters(text)


def test_a_prompt_alone_is_only_a_prompt():
    assert settings_from_parameters("a cat in a hat,\nby the sea <lora:x:0.5>") == {
        "prompt": "a cat in a hat,\nby the sea <lora:x:0.5>", "lora_scale": 1.0, "loras": ["x"]}  # fmt: skip
    text = "portrait\nstyle: anime, mood: calm"  # two pairs: A1111 reads this last line as prompt
    assert parse_parameters(text) == {"prompt": text, "negative_prompt": ""}
    assert settings_from_parameters(text) == {"prompt": text, "loras": []}
    assert settings_from_parameters("a cat\nNegative prompt: dogs") == {"prompt": "a cat", "negative_prompt": "dogs",
                                                                       "loras": []}  # fmt: skip
    assert parse_parameters("") == {"prompt": "", "negative_prompt": ""}
