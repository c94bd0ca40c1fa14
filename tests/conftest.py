"""Shared fixtures: tiny pipelines, LoRA files in every format, diffusers references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from loras import kohya_state_dict, lora_parts, peft_state_dict, write  # noqa: E402

from compose import Composer  # noqa: E402
from compose.schedulers import make_scheduler  # noqa: E402
from compose.tiny import tiny_pipeline  # noqa: E402

FIXTURES = Path(
    os.environ.get("COMPOSE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "loras")
)
SIZE = 32
STEPS = 4

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real LoRA fixtures not found at {FIXTURES} (../shared/fixtures/loras)")
    return FIXTURES


@pytest.fixture(scope="session", params=["sd1", "sdxl"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory) -> dict:
    """Per family, three random LoRAs (UNet attention + text encoders), each saved as
    diffusers/PEFT and as kohya (alpha != rank) files; plus their factors."""
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for fam in ("sd1", "sdxl"):
        pipe = tiny_pipeline(fam)
        for i in range(3):
            parts = lora_parts(pipe, seed=10 * i + 1)
            files[fam, i] = {
                "parts": parts,
                "peft": write(root / f"{fam}_{i}_peft.safetensors", peft_state_dict(parts)),
                "kohya": write(root / f"{fam}_{i}_kohya.safetensors", kohya_state_dict(parts, alpha=2.0)),
            }
    return files


def reference_pipeline(fam: str, loras: list[tuple[str, dict]]):
    """A diffusers pipeline with PEFT adapters ``name`` from each LoRA's parts."""
    pipe = tiny_pipeline(fam)
    for name, parts in loras:
        pipe.load_lora_weights(peft_state_dict(parts), adapter_name=name)
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def composer_factory():
    def make(fam: str = "sd1") -> Composer:
        return Composer.tiny(fam)

    return make
