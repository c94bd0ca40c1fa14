"""The three real SD1.5 LoRA files of ../shared/fixtures on an SD1.5-shaped pipeline.

The UNet has the real SD1.5 shape with random weights (built in about 8 s); the VAE
and a one-layer 768-wide text encoder are small, which is all composition needs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from compose import Composer, LoRAError, RunOptions, SamplingConfig
from compose.loop import Conditioning, predict_noise
from compose.speed import SD15
from compose.tiny import _scheduler, _text_config, _vae
from compose.tokenizer import clip_tokenizer

NAMES = ("sd15_weapons_blossom", "sd15_rick_and_morty", "sd15_pokemon")


@pytest.fixture(scope="module")
def sd15(fixtures_dir) -> Composer:
    torch.manual_seed(0)
    config = _text_config(768)
    config.num_hidden_layers = 1
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(config),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**SD15),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    composer = Composer(pipe, model_name="sd15-shaped-random")
    for name in NAMES:
        composer.load_lora(fixtures_dir / f"{name}.safetensors")
    return composer


def test_fixtures_load_with_every_key_used(sd15):
    assert sd15.family == "SD1.x"
    for name in NAMES:
        lora = sd15.loras[name]
        assert (lora.format, lora.family, lora.rank) == ("attn-processor", "SD1.x", 4)
        assert len(lora.targets) == 128 and lora.unused_keys == []
    assert len(sd15.registries["unet"]) == 128


def test_fixture_layer_equals_diffusers_peft(sd15, fixtures_dir):
    """One UNet forward with our composable layers equals diffusers' PEFT adapter."""
    unet = sd15.pipeline.unet
    registry = sd15.registries["unet"]
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor(400)
    cond = Conditioning(torch.randn(2, 77, 768))
    registry.activate([sd15.loras["sd15_pokemon"].factors["unet"]])
    with torch.no_grad():
        ours = predict_noise(unet, registry.state, x, t, cond, torch.tensor([[0.7]]))
        registry.activate([])
        base = unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample

    reference = load_file(fixtures_dir / "sd15_pokemon.safetensors")
    saved = {name: layer.base for name, layer in registry.layers.items()}
    for name, base_layer in saved.items():
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, base_layer)
    try:
        unet.load_lora_adapter(reference, prefix=None, adapter_name="pokemon")
        unet.set_adapters(["pokemon"], [0.7])
        with torch.no_grad():
            expected = unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        unet.unload_lora()
    finally:
        for name, layer in registry.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, layer)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def test_fixtures_compose(sd15):
    names = list(NAMES)
    kwargs = dict(
        loras=names, seed=1, sampling=SamplingConfig(steps=2, width=64, height=64), run=RunOptions(output_type="latent")
    )
    composite = sd15.generate("a pikachu with a blossom axe", method="composite", **kwargs)
    merge = sd15.generate("a pikachu with a blossom axe", method="merge", **kwargs)
    assert torch.isfinite(composite).all() and composite.shape == (1, 4, 32, 32)
    assert (composite - merge).abs().max() > 1e-3


def test_fixture_on_another_family_is_refused(fixtures_dir):
    composer = Composer.tiny("sdxl")
    with pytest.raises(LoRAError, match="made for SD1.x") as info:
        composer.load_lora(fixtures_dir / "sd15_pokemon.safetensors")
    assert "sd15_pokemon.safetensors" in str(info.value)
