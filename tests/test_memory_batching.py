"""Memory-aware batching: the loop sizes its UNet calls from the device's free memory
(or ``COMPOSE_MEMORY_BUDGET``) before the first step, and a chunked step is the unchunked
step to float tolerance."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import AS_LATENTS, STEPS

from compose import Composer, RunOptions, SamplingConfig
from compose.memory import (
    MEMORY_BUDGET_ENV,
    MEMORY_SHARE,
    activation_bytes,
    free_memory,
    materialises_attention,
    memory_budget,
    memory_rows,
)

SMALL = 16
LATENT = (SMALL // 2, SMALL // 2)
TOKENS = 77
BATCHED = ["composite", "cmlora", "patch", "bands", "regional"]
"""The methods that run a branch per LoRA (and one for the base model) along the batch."""
PARAMS = {"cmlora": {"ordering": "category"}, "regional": {"regions": {"a": [0, 0, 0.5, 1], "b": [0.5, 0, 1, 1]}}}


@pytest.fixture(scope="module")
def trio(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, (name, category) in enumerate((("a", "character"), ("b", "style"), ("c", "background"))):
        composer.load_lora(lora_files["sd1", i]["peft"], name=name, category=category)
    return composer


@pytest.fixture
def calls(trio, monkeypatch) -> list[int]:
    """The batch rows of every UNet call (the real UNet runs)."""
    unet, seen = trio.pipeline.unet, []
    forward = unet.forward

    def counting(sample, *args, **kwargs):
        seen.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    return seen


def row_bytes(composer: Composer) -> int:
    unet = composer.pipeline.unet
    return activation_bytes(unet.config, LATENT, composer.dtype, TOKENS, materialises_attention(unet))


def generate(composer: Composer, method: str, loras=("a", "b", "c"), run=AS_LATENTS) -> torch.Tensor:
    return composer.generate("a creature", list(loras), method, method_params=PARAMS.get(method), seed=4,
                             sampling=SamplingConfig(steps=STEPS, width=SMALL, height=SMALL), run=run)  # fmt: skip


@pytest.mark.parametrize("method", BATCHED)
def test_a_small_budget_chunks_the_batch_and_keeps_the_image(trio, calls, monkeypatch, method):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    whole = generate(trio, method)
    widest = max(calls)
    assert widest >= 6, "the free memory holds every branch of a step in one call"
    calls.clear()
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(int(2.5 * row_bytes(trio))))
    chunked = generate(trio, method)
    assert max(calls) == 2, "a budget of 2.5 rows: one branch (its CFG pair) per call"
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)


def test_calls_grow_with_n_and_never_go_below_one_branch(trio, calls, monkeypatch):
    """Under one budget a step of Composite takes more calls as N grows; a budget smaller
    than a row still runs, one branch per call."""
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(int(4.5 * row_bytes(trio))))
    per_step = []
    for n in (1, 2, 3):
        calls.clear()
        generate(trio, "composite", "abc"[:n])
        per_step.append(len(calls) // STEPS)
    assert per_step == [1, 1, 2] and max(calls) == 4
    calls.clear()
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0")
    generate(trio, "composite")
    assert calls == [2] * 3 * STEPS


def test_an_explicit_max_batch_wins(trio, calls, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0")
    generate(trio, "composite", run=RunOptions(max_batch=6, output_type="latent"))
    assert calls == [6] * STEPS


def test_the_estimate_is_monotone_and_brackets_the_unet_s_own_tensors(trio):
    """Per row: more for a larger latent, half in 16 bits, more where attention matrices
    are materialised; at least the largest tensor one call of the tiny UNet makes, at most
    all of its modules' outputs together (nothing freed)."""
    config, f32 = trio.pipeline.unet.config, torch.float32
    sizes = [activation_bytes(config, (side, side), f32, TOKENS, False) for side in (4, 8, 16, 32, 64)]
    assert sizes == sorted(set(sizes))
    assert activation_bytes(config, (16, 24), f32) > activation_bytes(config, (16, 16), f32)
    assert activation_bytes(config, LATENT, torch.bfloat16) * 2 == activation_bytes(config, LATENT, f32)
    assert activation_bytes(config, LATENT, f32, TOKENS, True) > activation_bytes(config, LATENT, f32, TOKENS, False)

    unet, outputs = trio.pipeline.unet, []
    hooks = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in unet.modules() if m is not unet]
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, *LATENT), 10, encoder_hidden_states=torch.randn(1, TOKENS, 32))
    finally:
        for hook in hooks:
            hook.remove()
    tensors = [t.numel() * 4 for out in outputs for t in (out if isinstance(out, tuple) else (out,))
               if isinstance(t, torch.Tensor)]  # fmt: skip
    assert max(tensors) <= row_bytes(trio) <= sum(tensors)


def test_rows_follow_the_budget(trio, monkeypatch):
    unet, row = trio.pipeline.unet, row_bytes(trio)
    cpu = torch.device("cpu")
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(7 * row + 1))
    assert memory_rows(unet, LATENT, torch.float32, TOKENS, cpu) == 7
    assert memory_rows(unet, (64, 64), torch.float32, TOKENS, cpu) == 1, "a larger latent: fewer rows, never 0"
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "2e9")
    assert memory_budget(cpu) == 2_000_000_000
    for bad in ("lots", "-1", "inf"):
        monkeypatch.setenv(MEMORY_BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=f"{MEMORY_BUDGET_ENV} is a number of bytes"):
            memory_budget(cpu)


def test_the_budget_is_a_share_of_the_device_s_free_memory(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    cpu = torch.device("cpu")
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free_memory(cpu) <= physical
    assert 0 < memory_budget(cpu) <= MEMORY_SHARE * physical
    assert free_memory(torch.device("meta")) is None and memory_budget(torch.device("meta")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_budget_counts_the_allocator_s_cache(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    device = torch.device("cuda")
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del held  # freed to PyTorch's cache: usable by the next call, though the driver counts it as used
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    assert cached >= 256 * 2**20
    assert abs(free_memory(device) - (free + cached)) < 64 * 2**20
