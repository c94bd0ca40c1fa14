"""The real SD1.5 (860 M parameters) and SDXL (2.6 B) UNets with random weights: every
method runs two steps with the real SD1.5 fixture LoRAs and with 3 and 5 generated LoRAs
of ranks 16 to 128, and the speed benchmark measures time per step and peak memory at
full size on the CPU.

The slow tier (``-m slow`` runs only it, ``-m "not slow"`` skips it; about 13 minutes on
one core, docs/speed.md): SD1.5 in float32, SDXL in bfloat16 (its UNet is 5 GB so, 10 GB
in float32); latents 8x8 (64 px images), text encoders of one layer (their cost is not
what is tested).
"""

from __future__ import annotations

import pytest
import torch

from compose import Composer, RunOptions, SamplingConfig
from compose.full_size import pipeline, random_loras, write_loras
from compose.methods import METHODS
from compose.speed import run_speed_benchmark
from compose.tokenizer import clip_tokenizer

pytestmark = pytest.mark.slow

SIZE = 64
STEPS = 2
DTYPES = {"sd15": torch.float32, "sdxl": torch.bfloat16}
RANKS = (16, 64, 128, 32, 16)
CATEGORIES = ("character", "style", "object", "background", "clothing")
FIXTURES = {"sd15_pokemon": "character", "sd15_rick_and_morty": "style", "sd15_weapons_blossom": "object"}
PROMPT = "a creature holding an axe in front of a wall, cartoon style"
PARAMS = {"cmlora": {"ordering": "category"}}
"""CMLoRA by category: ordering by frequency first generates every LoRA's image at the
model's native size (512 px for SD1.5), the cost of a whole generation per LoRA."""


def composer(model: str) -> Composer:
    pipe = pipeline(model, DTYPES[model], "cpu", tokenizer=clip_tokenizer(), text_layers=1)
    return Composer(pipe, model_name=f"random {model}")


def generate(composer: Composer, loras: list[str], method: str = "merge") -> torch.Tensor:
    return composer.generate(PROMPT, loras, method, seed=1, method_params=PARAMS.get(method),
                             sampling=SamplingConfig(steps=STEPS, width=SIZE, height=SIZE),
                             run=RunOptions(output_type="latent"))  # fmt: skip


def every_method(composer: Composer, names: list[str]) -> None:
    """Each method gives finite latents that the LoRAs changed."""
    base = generate(composer, [])
    for method in METHODS:
        latents = generate(composer, names, method)
        assert latents.shape == base.shape and torch.isfinite(latents).all(), method
        assert (latents - base).abs().max() > 1e-3, f"{method}: the LoRAs changed nothing"


def test_every_method_with_the_real_sd15_loras(fixtures_dir):
    sd15 = composer("sd15")
    for name, category in FIXTURES.items():
        sd15.load_lora(fixtures_dir / f"{name}.safetensors", category=category)
    every_method(sd15, list(FIXTURES))


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_every_method_with_three_and_five_generated_loras(model, tmp_path):
    full = composer(model)
    loras = random_loras(full.pipeline.unet, RANKS)
    for i, path in enumerate(write_loras(loras, tmp_path)):
        full.load_lora(path, name=f"lora{i}", category=CATEGORIES[i])
    for n in (3, 5):
        every_method(full, [f"lora{i}" for i in range(n)])


def check_benchmark(result: dict, ranks: list[int] | int) -> None:
    """Every row timed and relative to the floor, the eager ones with their peak memory
    (Composite's above Merge's: its three branches), and one step of Merge and Composite
    within bfloat16's rounding of diffusers' own."""
    rows = {(r["config"], r["n"]): r for r in result["rows"]}
    assert result["dtype"] == "bfloat16" and result["latent_size"] == 8 and result["rank"] == ranks
    assert all(r["median_ms"] > 0 and r["vs_floor"] > 0 for r in result["rows"])
    for config in ("merge (folding step)", "composite", "klora (folding step)", "cmlora refresh step", "routed step"):
        assert rows[(config, 3)]["peak_mib"] > 0, config
    assert rows[("composite", 3)]["peak_mib"] > rows[("merge", 3)]["peak_mib"]
    assert rows[("diffusers composite (sequential)", 3)]["vs_floor"] > 1
    assert max(a["relative"] for a in result["agreement"]) < 0.05


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_speed_benchmark_at_full_size(preset):
    result = run_speed_benchmark(preset, device="cpu", ns=(3,), warmup=0, repeats=1)
    check_benchmark(result, [16, 64, 128])


def test_speed_benchmark_with_the_real_sd15_loras(fixtures_dir):
    files = [fixtures_dir / f"{name}.safetensors" for name in FIXTURES]
    result = run_speed_benchmark("sd15", device="cpu", lora_files=files, warmup=0, repeats=1)
    assert result["loras"] == [f.name for f in files]
    check_benchmark(result, 4)
