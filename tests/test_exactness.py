"""Every method equals the library's own computation where it reduces to one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE, STEPS, generator, reference_loop, reference_pipeline
from loras import attn_processor_state_dict, lora_parts, peft_state_dict, write

from compose import Composer, Switch
from compose.schedulers import make_scheduler
from compose.tiny import tiny_pipeline

ATOL = 1e-4
PROMPT = "a cat wearing a hat"


def ours(composer: Composer, loras, method="merge", seed=3, run=AS_LATENTS, **kwargs) -> torch.Tensor:
    return composer.generate(PROMPT, loras=loras, method=method, seed=seed, sampling=SAMPLING, run=run, **kwargs)


def diffusers_latents(pipe, seed=3, **kwargs) -> torch.Tensor:
    return pipe(
        PROMPT,
        negative_prompt="",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        guidance_scale=7.5,
        generator=generator(seed),
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
def test_one_lora_equals_diffusers(family, lora_files, fmt, method):
    entry = lora_files[family, 0]
    pipe = reference_pipeline(family, [("a", entry["parts"])])
    pipe.set_adapters(["a"], [0.8])
    expected = diffusers_latents(pipe)

    composer = Composer.tiny(family)
    lora = composer.load_lora(entry[fmt], name="a")
    assert lora.unused_keys == []
    got = ours(composer, ["a"], method, lora_scale=0.8)
    base = ours(composer, [], "merge")
    assert (expected - base).abs().max() > 0.05, "the LoRA must change the result for the test to mean anything"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_attention_processor_format_equals_diffusers(tmp_path):
    pipe = tiny_pipeline("sd1")
    parts = lora_parts(pipe, seed=5, text=False)
    state = attn_processor_state_dict(parts)
    pipe.unet.load_lora_adapter(dict(state), prefix=None, adapter_name="a")
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    expected = diffusers_latents(pipe, cross_attention_kwargs={"scale": 0.8})

    composer = Composer.tiny("sd1")
    lora = composer.load_lora(write(tmp_path / "proc.safetensors", state), name="a")
    assert lora.format == "attn-processor" and lora.unused_keys == []
    torch.testing.assert_close(ours(composer, ["a"]), expected, atol=ATOL, rtol=0)


def test_merge_equals_set_adapters(family, lora_files):
    names, weights = ["a", "b", "c"], [1.0, 0.5, 0.7]
    pipe = reference_pipeline(family, [(n, lora_files[family, i]["parts"]) for i, n in enumerate(names)])
    pipe.set_adapters(names, [w * 0.8 for w in weights])
    expected = diffusers_latents(pipe)

    composer = Composer.tiny(family)
    for i, n in enumerate(names):
        composer.load_lora(lora_files[family, i]["peft"], name=n)
    got = ours(composer, list(zip(names, weights, strict=True)), "merge")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("max_batch", [None, 2, 4])
def test_composite_equals_sequential_loop(lora_files, max_batch):
    names, weights = ["a", "b", "c"], [1.0, 0.6, 0.9]
    pipe = reference_pipeline("sd1", [(n, lora_files["sd1", i]["parts"]) for i, n in enumerate(names)])
    scaled = [w * 0.8 for w in weights]
    pipe.set_adapters(names, scaled)
    passes = [lambda n=n, w=w: pipe.unet.set_adapters([n], [w]) for n, w in zip(names, scaled, strict=True)]
    expected = reference_loop(pipe, PROMPT, lambda step: passes)

    composer = Composer.tiny("sd1")
    for i, n in enumerate(names):
        composer.load_lora(lora_files["sd1", i]["peft"], name=n)
    got = ours(
        composer, list(zip(names, weights, strict=True)), "composite", run=replace(AS_LATENTS, max_batch=max_batch)
    )
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_switch_schedule():
    switch = Switch(tau=2)
    switch.prepare(type("Context", (), {"loras": [0, 1, 2], "weights": torch.ones(3)})())
    assert [switch.active(i) for i in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    late = Switch(tau=2, reference_offset=True)
    late.context = switch.context
    assert [late.active(i) for i in range(8)] == [0, 0, 0, 1, 1, 2, 2, 0]
    assert torch.equal(switch.weights(3), torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="tau"):
        Switch(tau=0)


@pytest.mark.parametrize("reference_offset", [False, True])
def test_switch_equals_reference_callback(tmp_path, reference_offset):
    """The reference switches adapters in diffusers' step-end callback."""
    tau, names = 1, ["a", "b", "c"]
    pipe = tiny_pipeline("sd1")
    composer = Composer.tiny("sd1")
    states = [peft_state_dict(lora_parts(pipe, seed=7 + i, text=False)) for i in range(len(names))]
    for n, state in zip(names, states, strict=True):
        pipe.unet.load_lora_adapter(dict(state), prefix="unet", adapter_name=n)
        composer.load_lora(write(tmp_path / f"{n}.safetensors", state), name=n)
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)

    def callback(pipeline, step, timestep, kwargs):
        switch_now = step > 0 and step % tau == 0 if reference_offset else (step + 1) % tau == 0
        if switch_now:
            current = pipeline.unet.active_adapters()[0]
            pipeline.unet.set_adapters([names[(names.index(current) + 1) % len(names)]])
        return {}

    pipe.unet.set_adapters(["a"])
    expected = diffusers_latents(pipe, cross_attention_kwargs={"scale": 0.8}, callback_on_step_end=callback)
    got = ours(composer, names, Switch(tau=tau, reference_offset=reference_offset))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
