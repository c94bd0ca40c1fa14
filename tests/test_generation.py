"""The Python API: batches, callbacks, cancellation, validation, metadata, reloading."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE, STEPS
from PIL import Image

from compose import (
    Composer,
    GenerationCancelled,
    ModelLoadError,
    NonFiniteLatentsError,
    RunOptions,
    SamplingConfig,
    generate_kwargs,
    read_record,
    save_png,
)
from compose.schedulers import SCHEDULERS


@pytest.fixture(scope="module")
def composer(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, name in enumerate(("a", "b", "c")):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name, category="style" if i else "character")
    return composer


def gen(composer, prompt="a cat", sampling=SAMPLING, run=AS_LATENTS, **kwargs):
    return composer.generate(prompt, sampling=sampling, run=run, **kwargs)


def test_batch_equals_singles(composer):
    batch = gen(composer, ["a cat", "a dog"], loras=["a", "b"], method="composite", seed=[4, 9])
    for row, (prompt, seed) in enumerate([("a cat", 4), ("a dog", 9)]):
        single = gen(composer, prompt, loras=["a", "b"], method="composite", seed=seed)
        # a batch of 2 takes other BLAS kernels than a batch of 1: CI's CPU differed by 1.8e-5
        torch.testing.assert_close(batch[row : row + 1], single, atol=1e-4, rtol=0)


def test_int_seed_counts_up_per_prompt(composer):
    images = composer.generate(["x", "y"], seed=5, sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))
    assert [read_record_from(i)["seed"] for i in images] == [5, 6]


def read_record_from(image: Image.Image) -> dict:
    import json

    return json.loads(image.info["compose"])


def test_callback_reports_every_step_and_cancels(composer):
    seen = []
    gen(composer, loras=["a"], run=replace(AS_LATENTS, callback=lambda i, n, latents: seen.append((i, n))))
    assert seen == [(i, STEPS) for i in range(STEPS)]
    with pytest.raises(GenerationCancelled, match="after step 2 of 4"):
        gen(composer, loras=["a"], method="composite", run=replace(AS_LATENTS, callback=lambda i, n, latents: i < 1))
    assert composer.registries["unet"].state.weights is None
    torch.testing.assert_close(gen(composer, loras=["a"]), gen(composer, loras=["a"]))


def test_weight_zero_and_unload_restore_the_base_model(lora_files):
    composer = Composer.tiny("sd1")
    base_modules = dict(composer.pipeline.unet.named_modules())
    before = gen(composer)
    composer.load_lora(lora_files["sd1", 0]["peft"], name="a")
    torch.testing.assert_close(gen(composer, loras=[("a", 0.0)]), before, atol=0, rtol=0)
    assert (gen(composer, loras=["a"]) - before).abs().max() > 0.01
    composer.unload_lora("a")
    assert len(composer.registries["unet"]) == 0 and composer.loras == {}
    after = dict(composer.pipeline.unet.named_modules())
    assert after.keys() == base_modules.keys()
    assert all(after[k] is base_modules[k] for k in after)
    torch.testing.assert_close(gen(composer), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling": replace(SAMPLING, width=31)}, "multiples of 2"),
        ({"sampling": replace(SAMPLING, steps=0)}, "steps must be at least 1"),
        ({"sampling": replace(SAMPLING, guidance_scale=float("nan"))}, "guidance_scale must be a finite number"),
        ({"run": replace(AS_LATENTS, max_batch=0)}, "max_batch must be at least 1"),
        ({"loras": ["zzz"]}, "'zzz' is not loaded"),
        ({"loras": ["a", "a"]}, "listed twice"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"sampling": replace(SAMPLING, scheduler="nope")}, "unknown scheduler"),
        ({"method": "composite"}, "needs at least one LoRA"),
        ({"seed": [1, 2, 3], "prompt": ["a", "b"]}, "2 prompts and 3 seeds"),
    ],
)
def test_bad_settings_are_refused(composer, kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        gen(composer, **kwargs)


def test_the_option_groups_are_refused_in_another_form(composer):
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig .* got dict"):
        composer.generate("a cat", sampling={"steps": 2})
    with pytest.raises(TypeError, match="run must be a RunOptions"):
        composer.generate("a cat", sampling=SAMPLING, run="latent")


def test_nan_latents_stop_with_the_step(lora_files):
    composer = Composer.tiny("sd1")
    lora = composer.load_lora(lora_files["sd1", 0]["peft"], name="a")
    for f in lora.factors["unet"].values():
        f.up.mul_(1e30)
    with pytest.raises(NonFiniteLatentsError, match="at step 1 of 4"):
        gen(composer, loras=["a"], run=RunOptions())


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_offered_runs(composer, scheduler):
    """Each name ``--scheduler`` offers generates (lms needs scipy, a dependency for it)."""
    latents = gen(composer, loras=["a", "b"], method="switch", sampling=replace(SAMPLING, scheduler=scheduler))
    assert torch.isfinite(latents).all()


def test_png_metadata_reproduces_the_image(composer, tmp_path):
    image = composer.generate(
        "a cat, watercolor",
        loras=[("a", 1.0), ("b", 0.5)],
        method="switch",
        method_params={"tau": 2},
        negative_prompt="blurry",
        seed=11,
        sampling=SamplingConfig(steps=STEPS, guidance_scale=6.0, width=SIZE, height=SIZE),
    )[0]
    path = save_png(image, tmp_path / "out" / "x.png")
    with Image.open(path) as png:
        parameters = png.text["parameters"]
    prompt, negative, fields = parameters.split("\n")
    assert prompt == "a cat, watercolor <lora:a:0.8> <lora:b:0.4>" and negative == "Negative prompt: blurry"
    expected = "Steps: 4, Sampler: DPM++ 2M, Schedule type: DDIM, CFG scale: 6.0, Seed: 11, Size: 32x32, "
    assert fields.startswith(expected)
    lora = composer.loras["a"]
    assert f'Lora hashes: "a: {lora.short_hash}, b: {composer.loras["b"].short_hash}"' in fields
    assert "Composition method: switch" in fields
    record = read_record(path)
    assert record["loras"][0]["sha256"] == lora.sha256 and record["method"]["parameters"]["tau"] == 2
    again = composer.generate(**generate_kwargs(record))[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(path).convert("RGB")))


def test_save_is_atomic(composer, tmp_path, monkeypatch):
    image = composer.generate("a cat", sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))[0]
    path = save_png(image, tmp_path / "x.png")
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    other = composer.generate("a dog", seed=3, sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))[0]
    with pytest.raises(OSError, match="No space left"):
        save_png(other, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_sdxl_generates_images_with_metadata(lora_files):
    composer = Composer.tiny("sdxl")
    composer.load_lora(lora_files["sdxl", 0]["kohya"], name="k")
    images = composer.generate(
        ["a", "b"], loras=["k"], method="composite", sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE)
    )
    assert [i.size for i in images] == [(SIZE, SIZE)] * 2
    assert 'Model: "tiny:sdxl"' in images[0].info["parameters"]


def test_from_pretrained_folder_round_trip(tmp_path):
    tiny = Composer.tiny("sd1")
    tiny.pipeline.save_pretrained(tmp_path / "model")
    loaded = Composer.from_pretrained(tmp_path / "model", device="cpu")
    assert loaded.family == tiny.family and loaded.model_name == str(tmp_path / "model")
    torch.testing.assert_close(gen(loaded, seed=2), gen(tiny, seed=2), atol=1e-6, rtol=0)


def test_unsupported_pipeline_class(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ModelLoadError, match="DDPMPipeline has no vae; compose needs a Stable Diffusion"):
        Composer.from_pretrained(tmp_path / "ddpm", device="cpu")


def test_hub_id_without_internet_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hf download nobody/no-such-model"):
        Composer.from_pretrained("nobody/no-such-model", device="cpu")


@pytest.mark.parametrize("method", ["merge", "switch", "composite", "klora", "cmlora"])
def test_half_precision_runs_every_method(lora_files, method, tmp_path, monkeypatch):
    """bf16 on CPU stands in for fp16 on GPU: the latents keep the model's dtype."""
    monkeypatch.setenv("COMPOSE_CACHE", str(tmp_path))
    composer = Composer.tiny("sd1")
    composer.pipeline.to(torch.bfloat16)
    for i in range(2):
        composer.load_lora(lora_files["sd1", i]["peft"], name=f"l{i}", category=("character", "style")[i])
    latents = gen(composer, loras=["l0", "l1"], method=method, sampling=replace(SAMPLING, steps=3))
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents).all()
