"""Half precision checked on the CPU: every method in bfloat16 and float16 against float32,
LoRA factors in the model's dtype, the region and attention hooks under PyTorch's
scaled-dot-product attention, and SDXL's VAE decoded in float32 as diffusers decodes it.

The tolerances (docs/precision-and-memory.md) are in 0-255 pixel units of the decoded
image, over the tiny random pipelines, whose images are noise: a hard case for rounding.
"""

from __future__ import annotations

import copy
import functools
import gc
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import AS_LATENTS, SAMPLING, SIZE, STEPS, generator
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from compose import Composer, RunOptions, SamplingConfig
from compose.attention_maps import AttentionProbe
from compose.methods import METHODS
from compose.pipelines import decode_latents
from compose.schedulers import make_scheduler

PROMPT = "a zq hero, qj ink, in front of a kw wall"
LORAS = (("hero", "character", "zq hero"), ("ink", "style", "qj ink"), ("wall", "background", "kw wall"))
PARAMS = {
    "cmlora": {"ordering": "category"},
    "regional": {"regions": {"hero": [0, 0, 0.5, 1], "wall": [0.5, 0, 1, 1]}, "prompts": {"hero": "a zq hero"}},
}
"""Parameters that keep every method on its full path without a profiling pass: Regional
with a per-region prompt (its attention hook), Routed with its defaults (probe, routes,
per-clause prompts)."""
SMALL = 16
"""Pixels a side: an 8x8 latent keeps the 66 generations of the method table fast (float16
convolutions have no fast CPU kernel without AVX512-FP16 or AMX)."""
TOLERANCE = {torch.bfloat16: (16.0, 2.0), torch.float16: (2.0, 0.25)}
"""Largest ``(max, mean)`` absolute difference from float32, in 0-255 pixel units: about
3x the largest max and 2.2x the largest mean measured here (docs/precision-and-memory.md).
Routed's masks are thresholded, so a pixel that changes region would move the max most."""


def _float16_gap() -> str | None:
    """What this CPU cannot compute in float16 of what a UNet, a VAE and CLIP need, or ``None``."""
    x = torch.randn(1, 32, 8, 8, dtype=torch.float16)
    tokens = torch.randn(1, 2, 64, 8, dtype=torch.float16)
    checks = {
        "conv2d": lambda: F.conv2d(x, torch.randn(8, 32, 3, 3, dtype=torch.float16), padding=1),
        "group_norm": lambda: F.group_norm(x, 8),
        "layer_norm": lambda: F.layer_norm(x, (8,)),
        "linear": lambda: F.linear(x, torch.randn(4, 8, dtype=torch.float16)),
        "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(tokens, tokens, tokens),
        "softmax": lambda: x.softmax(-1),
        "gelu": lambda: F.gelu(x),
        "silu": lambda: F.silu(x),
        "interpolate": lambda: F.interpolate(x, scale_factor=2.0, mode="nearest"),
    }
    for name, check in checks.items():
        try:
            check()
        except RuntimeError as error:
            return f"this CPU's PyTorch has no float16 {name}: {str(error).splitlines()[0]}"
    return None


FLOAT16_GAP = _float16_gap()
DTYPES = [
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(
        torch.float16, id="float16", marks=pytest.mark.skipif(FLOAT16_GAP is not None, reason=str(FLOAT16_GAP))
    ),
]


@pytest.fixture(scope="module")
def composers(lora_files):
    """``composers(family, dtype)``: a tiny composer in ``dtype`` with three LoRAs, built once."""

    @functools.cache
    def get(family: str, dtype: torch.dtype) -> Composer:
        composer = Composer.tiny(family, dtype=dtype)
        for i, (name, category, trigger) in enumerate(LORAS):
            composer.load_lora(lora_files[family, i]["peft"], name=name, category=category, triggers=[trigger])
        return composer

    return get


def generate(composer: Composer, method: str) -> torch.Tensor:
    loras = [name for name, *_ in LORAS][: 2 if method == "klora" else 3]
    return composer.generate(PROMPT, loras, method, method_params=PARAMS.get(method), seed=1, lora_scale=1.0,
                             sampling=SamplingConfig(steps=STEPS, width=SMALL, height=SMALL),
                             run=AS_LATENTS)  # fmt: skip


def pixels(composer: Composer, latents: torch.Tensor) -> torch.Tensor:
    """The decoded images in float32 0-255 units, before rounding (the PNG's values)."""
    with torch.no_grad():
        image = decode_latents(composer.pipeline.vae, latents)
    return (image.float() / 2 + 0.5).clamp(0, 1) * 255


@pytest.fixture(scope="module")
def float32_latents(composers):
    """``float32_latents(family, method)``: the float32 generation, run once."""

    @functools.cache
    def get(family: str, method: str) -> torch.Tensor:
        return generate(composers(family, torch.float32), method)

    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_in_half_precision_is_float32_to_tolerance(composers, float32_latents, family, method, dtype):
    composer = composers(family, dtype)
    latents = generate(composer, method)
    assert latents.dtype == dtype and torch.isfinite(latents).all()
    image = pixels(composer, latents)
    assert torch.isfinite(image).all()
    difference = (image - pixels(composers(family, torch.float32), float32_latents(family, method))).abs()
    largest, mean = TOLERANCE[dtype]
    assert difference.max() <= largest and difference.mean() <= mean, (difference.max(), difference.mean())
    assert difference.max() > 0, "the half-precision path must differ for the comparison to mean anything"


def held_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through objects, containers and modules (not
    through functions, classes or Python modules, which reach the whole process)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        else:
            stack.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_factors_follow_the_model_dtype(lora_files, family, dtype):
    """Every tensor a composable layer holds (stacked factors, slices, folded weights) and
    every LoRA's factors are in the model's dtype, and the composer keeps no float32
    tensor but the scheduler's 1-D tables: no float32 copy of a factor stays alive."""
    composer = Composer.tiny(family, dtype=dtype)
    for i, (name, *_) in enumerate(LORAS):
        composer.load_lora(lora_files[family, i]["peft"], name=name)
    assert all(f.down.dtype == f.up.dtype == dtype for lora in composer.loras.values()
               for table in lora.factors.values() for f in table.values())  # fmt: skip
    shapes = {tuple(t.shape) for lora in composer.loras.values() for table in lora.factors.values()
              for f in table.values() for t in (f.down, f.up)}  # fmt: skip
    seen = {"layers": 0, "folded": 0}

    def check(step, steps, latents):
        for registry in composer.registries.values():
            for layer in registry.layers.values():
                held = [t for t in held_tensors(layer) if t.is_floating_point()]
                assert {t.dtype for t in held} == {dtype}, {t.dtype for t in held}
                seen["layers"] += layer.down is not None
                seen["folded"] += any(t.shape == layer.base.weight.shape and t is not layer.base.weight for t in held)
        single = [tuple(t.shape) for t in held_tensors(composer) if t.dtype == torch.float32]
        assert not [shape for shape in single if len(shape) > 1 or shape in shapes], f"float32 tensors: {single}"

    composer.generate(PROMPT, [name for name, *_ in LORAS], "merge",
                      sampling=SamplingConfig(steps=STEPS, width=SMALL, height=SMALL),
                      run=RunOptions(callback=check, output_type="latent"))  # fmt: skip
    assert seen["layers"] and seen["folded"], "Merge must stack and fold factors for the check to mean anything"
    check(STEPS, STEPS, None)


PROCESSORS = {"classic": AttnProcessor, "sdpa": AttnProcessor2_0}


@pytest.mark.parametrize("method", ["regional", "routed"])
def test_region_and_attention_hooks_give_one_image_under_both_processors(composers, float32_latents, family, method):
    """diffusers' classic ``AttnProcessor`` and PyTorch's scaled-dot-product
    ``AttnProcessor2_0`` (diffusers' default, which made the float32 images): the same
    image from Regional's per-region attention and Routed's attention maps, routes and
    per-clause prompts."""
    composer = composers(family, torch.float32)
    unet = composer.pipeline.unet
    sdpa = float32_latents(family, method)
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    try:
        unet.set_attn_processor(AttnProcessor())
        classic = generate(composer, method)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(classic, sdpa, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_attention_maps_are_the_processor_s_probabilities(name):
    """The probe's map of a token group is the attention probability that diffusers'
    classic processor computes, summed over the group's tokens and averaged over the
    heads, whichever processor the layer runs; the layer's output is untouched."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn2 = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4, processor=PROCESSORS[name]())
    x, text, groups = torch.randn(2, 6 * 4, 16), torch.randn(2, 7, 12), [[1, 2], [5]]
    scores, seen = holder.attn2.get_attention_scores, []

    def spy(*args, **kwargs) -> torch.Tensor:
        seen.append(scores(*args, **kwargs))
        return seen[-1]

    with torch.no_grad():
        plain = holder.attn2(x, encoder_hidden_states=text)
        with AttentionProbe(holder, groups) as probe:
            probed = holder.attn2(x, encoder_hidden_states=text)
        probe.step((6, 4))
        holder.attn2.set_processor(AttnProcessor())
        holder.attn2.get_attention_scores = spy
        classic = holder.attn2(x, encoder_hidden_states=text)
    assert torch.equal(plain, probed)
    torch.testing.assert_close(plain, classic, atol=1e-6, rtol=0)
    probabilities = seen[0].view(2, 4, 24, 7).mean(1)  # (rows, positions, tokens), heads averaged
    expected = torch.stack([probabilities[..., group].sum(-1) for group in groups], 1).view(2, 2, 6, 4)
    torch.testing.assert_close(probe.maps(), expected, atol=1e-6, rtol=0)


@pytest.fixture
def overflowing_sdxl() -> Composer:
    """The tiny SDXL pipeline in float16 with a VAE decoder whose first activations
    exceed float16's range (65504), as SDXL's VAE does at full size."""
    composer = Composer.tiny("sdxl", dtype=torch.float16)
    conv_in = composer.pipeline.vae.decoder.conv_in
    with torch.no_grad():
        conv_in.weight *= 3e3
        conv_in.bias *= 3e3
    return composer


def test_sdxl_vae_decodes_in_float32_when_its_config_asks(overflowing_sdxl):
    vae = overflowing_sdxl.pipeline.vae
    latents = overflowing_sdxl.generate("a cat", sampling=SAMPLING, run=AS_LATENTS)
    assert vae.config.force_upcast and latents.dtype == torch.float16
    with torch.no_grad():
        upcast = decode_latents(vae, latents)
        assert vae.dtype == torch.float16, "the VAE returns to float16 after decoding"
        assert torch.equal(upcast, decode_latents(copy.deepcopy(vae).float(), latents))
        assert torch.isfinite(upcast).all()
        vae.register_to_config(force_upcast=False)
        plain = decode_latents(vae, latents)
    assert plain.dtype == torch.float16 and not torch.isfinite(plain).all(), "the overflow is real"


@pytest.mark.filterwarnings("ignore:.*upcast_vae:FutureWarning")
def test_sdxl_image_in_float16_equals_diffusers_pipeline(overflowing_sdxl):
    """diffusers' ``StableDiffusionXLPipeline`` decodes with the same upcast: the images agree."""
    image = overflowing_sdxl.generate("a cat", seed=3, sampling=SAMPLING)[0]
    pipe = overflowing_sdxl.pipeline
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a cat", negative_prompt="", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                    guidance_scale=7.5, generator=generator(3)).images[0]  # fmt: skip
    assert image.tobytes() == expected.tobytes()
    assert len(set(image.tobytes())) > 16, "a black (NaN) image would also be equal"


def test_fused_projections_are_refused_by_the_attention_maps():
    holder = nn.Module()
    holder.attn2 = Attention(query_dim=16, cross_attention_dim=16, heads=4, dim_head=4)
    holder.attn2.fuse_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"), AttentionProbe(holder, [[1]]):
        pass
