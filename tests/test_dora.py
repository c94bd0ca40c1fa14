"""DoRA files (diffusers/PEFT ``lora_magnitude_vector``): one equals PEFT's own output;
several are each normalised against the base weight and combined as any LoRA's deltas.

The definition tested (``compose.lycoris``): a DoRA module on base weight ``W`` is the
effective delta ``ΔW_d = m ⊙ (W + ΔW) / ‖W + ΔW‖ − W`` (norm per output channel, PEFT's
convention), applied at strength ``s`` as ``W + s·ΔW_d``, as A1111 and ComfyUI apply one.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE, STEPS, generator, reference_loop
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from loras import write
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_lycoris import lycoris_state, patched

from compose import Composer, LoRAError
from compose.schedulers import make_scheduler
from compose.tiny import tiny_pipeline

ATOL = 1e-4
"""Latents after 4 steps, float32, as the other exactness tests."""
PROMPT = "a cat wearing a hat"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def dora_pipeline(seed: int):
    """The tiny SD1 pipeline with a PEFT DoRA adapter on its UNet (attention, feed-forward,
    convolutions) and text encoder: random factors, magnitudes moved off ``‖W + ΔW‖`` (where
    PEFT starts them, which would make the DoRA a plain LoRA)."""
    pipe = tiny_pipeline("sd1")
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                     target_modules=UNET_TARGETS))  # fmt: skip
    text = LoraConfig(r=2, lora_alpha=2, use_dora=True, init_lora_weights=False, target_modules=TEXT_TARGETS)
    inject_adapter_in_model(text, pipe.text_encoder)  # transformers' add_adapter wants a newer peft
    pipe.text_encoder.peft_config = {"default": text}
    with torch.no_grad():
        for layer in dora_layers(pipe).values():
            layer.lora_B["default"].weight.mul_(3.0)
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(0.7 + 0.6 * torch.rand(magnitude.shape))
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dora_layers(pipe) -> dict[tuple[str, str], LoraLayer]:
    """PEFT's DoRA layers by ``(component, module name)``."""
    return {
        (component, name): layer
        for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def save_dora(pipe, folder) -> str:
    """The adapter as diffusers saves it: ``get_peft_model_state_dict`` per model, alphas in
    the ``lora_adapter_metadata``."""
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    return f"{folder}/pytorch_lora_weights.safetensors"


@torch.no_grad()
def effective_deltas(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """The definition, written out from PEFT's tensors: per module,
    ``m ⊙ (W + s·B A) / ‖W + s·B A‖ − W``, the norm over each output channel."""
    deltas = {}
    for key, layer in dora_layers(pipe).items():
        weight = layer.get_base_layer().weight
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        merged = weight + layer.scaling["default"] * (up.flatten(1) @ down.flatten(1)).view_as(weight)
        norm = merged.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))
        magnitude = layer.lora_magnitude_vector["default"].weight.view(-1, *[1] * (weight.dim() - 1))
        deltas[key] = magnitude * merged / norm - weight
    return deltas


def latents(composer: Composer, loras, method: str = "merge", lora_scale: float = 1.0) -> torch.Tensor:
    return composer.generate(PROMPT, loras=loras, method=method, seed=3, lora_scale=lora_scale, sampling=SAMPLING,
                             run=AS_LATENTS)  # fmt: skip


@pytest.fixture(scope="module")
def doras(tmp_path_factory) -> list[tuple[str, dict]]:
    """Two DoRA files and their effective deltas by the definition."""
    made = []
    for seed in (1, 2):
        pipe = dora_pipeline(seed)
        made.append((save_dora(pipe, tmp_path_factory.mktemp(f"dora{seed}")), effective_deltas(pipe)))
    return made


def test_one_dora_equals_peft(tmp_path):
    pipe = dora_pipeline(seed=1)
    expected = pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                    guidance_scale=7.5, generator=generator(3), output_type="latent").images  # fmt: skip
    path = save_dora(pipe, tmp_path)
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(path))
    composer = Composer.tiny("sd1")
    lora = composer.load_lora(path, name="d")
    assert lora.unused_keys == [] and lora.algorithm == "LoCon + DoRA" and lora.format == "diffusers"
    assert lora.algorithms["DoRA"] == len(dora_layers(pipe))
    base = latents(composer, [])
    assert (expected - base).abs().max() > 0.05, "the DoRA must change the result for the test to mean anything"
    torch.testing.assert_close(latents(composer, ["d"]), expected, atol=ATOL, rtol=0)


def test_the_resolved_factors_are_the_effective_deltas(doras):
    composer = Composer.tiny("sd1")
    lora = composer.load_lora(doras[0][0], name="d")
    assert lora.magnitudes == {}, "resolved against this model's weights once, when added"
    for (component, name), delta in doras[0][1].items():
        f = lora.factors[component][name]
        got = (f.up.flatten(1) @ f.down.flatten(1)).view_as(delta)
        torch.testing.assert_close(got, delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.6, 1.3)])
def test_two_doras_under_merge_are_the_sum_of_their_deltas(doras, weights):
    composer = Composer.tiny("sd1")
    for index, (path, _) in enumerate(doras):
        composer.load_lora(path, name=f"d{index}")
    scale = 0.8
    expected = latents(patched("sd1", [(deltas, w * scale) for (_, deltas), w in zip(doras, weights, strict=True)]), [])
    got = latents(composer, [("d0", weights[0]), ("d1", weights[1])], "merge", lora_scale=scale)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_two_doras_under_composite_equal_the_branch_loop(doras):
    """Each branch's UNet carries one DoRA's effective delta; the text encoder both, merged
    (Composite encodes the prompt once, every LoRA's text part weighted)."""
    composer = Composer.tiny("sd1")
    for index, (path, _) in enumerate(doras):
        composer.load_lora(path, name=f"d{index}")
    weights, scale = (1.0, 0.7), 0.8
    got = latents(composer, [("d0", weights[0]), ("d1", weights[1])], "composite", lora_scale=scale)

    text = [({k: d for k, d in deltas.items() if k[0] == "text_encoder"}, w * scale)
            for (_, deltas), w in zip(doras, weights, strict=True)]  # fmt: skip
    pipe = patched("sd1", text).pipeline
    base = {name: pipe.unet.get_submodule(name).weight.detach().clone() for c, name in doras[0][1] if c == "unet"}

    def only(deltas: dict, weight: float):
        def setup():
            with torch.no_grad():
                for name, original in base.items():
                    pipe.unet.get_submodule(name).weight.copy_(original + weight * scale * deltas["unet", name])

        return setup

    passes = [only(deltas, w) for (_, deltas), w in zip(doras, weights, strict=True)]
    expected = reference_loop(pipe, PROMPT, lambda step: passes)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# -- bad magnitudes --------------------------------------------------------------------------


def test_a_magnitude_of_the_wrong_length_is_refused_and_nothing_loads(doras, tmp_path):
    state = load_file(doras[0][0])
    key = next(k for k in state if k.endswith("attn1.to_q.lora_magnitude_vector"))
    state[key] = state[key][:-1].contiguous()
    path = write(tmp_path / "short.safetensors", state)
    composer = Composer.tiny("sd1")
    composer.load_lora(doras[1][0], name="other")
    before = ({c: dict(r.layers) for c, r in composer.registries.items()}, dict(composer.loras))
    message = rf"DoRA magnitude {re.escape(key)} has 31 values .* the module's update has 32 output channels"
    with pytest.raises(LoRAError, match=message) as info:
        composer.load_lora(path, name="short")
    assert str(path) in str(info.value)
    assert ({c: dict(r.layers) for c, r in composer.registries.items()}, dict(composer.loras)) == before


def test_a_dora_scale_of_the_wrong_length_is_refused(tmp_path):
    state = lycoris_state(tiny_pipeline("sd1"), "dora-in")
    key = next(k for k in state if k.endswith("attn1_to_q.dora_scale"))
    state[key] = state[key][:, :-1].contiguous()  # (1, in): one input channel short
    with pytest.raises(LoRAError, match=rf"{re.escape(key)} has shape \(1, 31\); .* per input channel"):
        Composer.tiny("sd1").load_lora(write(tmp_path / "short.safetensors", state))
