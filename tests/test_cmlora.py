"""CMLoRA: schedule, dominance weights, exactness without cache, and the cache's saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SIZE, reference_loop, reference_pipeline
from PIL import Image

from compose import CMLoRA, Composer
from compose.frequency import cutoff_for, profile_images, radial_profile
from compose.methods import MethodContext
from compose.methods.cmlora import dominance_weights, refresh_steps

CATEGORIES = ("character", "style", "background")


@pytest.fixture(scope="module")
def trio(lora_files) -> Composer:
    composer = Composer.tiny("sd1")
    for i, category in enumerate(CATEGORIES):
        composer.load_lora(lora_files["sd1", i]["peft"], name=category, category=category)
    return composer


def prepared(composer, method, names, steps, frequency=None) -> CMLoRA:
    loras = [composer.loras[n] for n in names]
    context = MethodContext(
        loras,
        torch.ones(len(loras)),
        steps,
        list(composer.registries["unet"].layers),
        composer.pipeline.unet,
        frequency or {},
    )
    method.prepare(context)
    return method


def test_refresh_schedules():
    assert refresh_steps("nonuniform", 8) == [0, 2, 3, 6, 7]
    assert refresh_steps("nonuniform", 20) == [0, 2, 4, 6, 7, 10, 13, 16, 17, 19]
    at200 = refresh_steps("nonuniform", 200)
    assert len(at200) == 38 + 34 + 13 and at200[37:40] == [74, 75, 78] and at200[-2:] == [197, 199]
    assert refresh_steps("uniform", 10, interval=3) == [0, 3, 6, 9]
    assert refresh_steps("off", 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="schedule must be one of"):
        CMLoRA(schedule="sometimes")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_dominance_weights_sum_to_one(n):
    dom, other = dominance_weights(n)
    assert dom + (n - 1) * other == pytest.approx(1.0)
    assert dom == pytest.approx((n - 0.5) / (2 * n - 1.5))


@pytest.mark.parametrize(
    ("names", "steps", "schedule", "expected"),
    [
        # H = [character], L = [background]: H for the first 60% of the steps, then L
        (["character", "background"], 10, "off", [0] * 6 + [1] * 4),
        # H ordered style, character; advancing at each refresh step (0, 2, 3); L from step 5
        (["character", "style", "background"], 8, "nonuniform", [1, 1, 0, 1, 1, 2, 2, 2]),
        (["character", "style"], 6, "off", [1, 0, 1, 0, 1, 0]),
        (
            ["character", "style", "background"],
            20,
            "uniform",
            [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2],
        ),
    ],
)
def test_dominant_schedule(trio, names, steps, schedule, expected):
    method = prepared(trio, CMLoRA(ordering="category", schedule=schedule, interval=2), names, steps)
    assert method.dominant == expected
    dom, other = dominance_weights(len(names))
    for step, j in enumerate(expected):
        assert method.mix[step, j].item() == pytest.approx(dom)
        assert method.mix[step].sum().item() == pytest.approx(1.0)


def test_frequency_ordering_splits_at_the_gap(trio):
    names = list(CATEGORIES)
    method = prepared(trio, CMLoRA(), names, 4, {"character": 0.50, "style": 0.55, "background": 0.30})
    assert (method.high, method.low) == ([1, 0], [2])
    close = prepared(trio, CMLoRA(), names, 4, {"character": 0.50, "style": 0.52, "background": 0.49})
    assert (close.high, close.low) == ([1, 0, 2], [])
    with pytest.raises(ValueError, match="needs the frequency scores"):
        prepared(trio, CMLoRA(), names, 4, {"character": 0.5})


def test_without_cache_equals_the_weighted_reference(lora_files):
    """Every branch in full at every step: the dominance-weighted sum of per-LoRA
    predictions, written out with diffusers adapters."""
    names, steps = list(CATEGORIES), 6
    composer = Composer.tiny("sd1")
    for i, category in enumerate(names):
        composer.load_lora(lora_files["sd1", i]["peft"], name=category, category=category)
    method = CMLoRA(ordering="category", cache=False)
    got = composer.generate("a cat", names, method, seed=3, steps=steps, width=SIZE, height=SIZE, output_type="latent")

    pipe = reference_pipeline("sd1", [(n, lora_files["sd1", i]["parts"]) for i, n in enumerate(names)])
    pipe.set_adapters(names, [0.8] * 3)
    passes = [lambda n=n: pipe.unet.set_adapters([n], [0.8]) for n in names]
    dom, other = dominance_weights(3)
    mix = [[dom if j == d else other for j in range(3)] for d in method.dominant]
    expected = reference_loop(pipe, "a cat", lambda i: passes, mix=lambda i: mix[i], steps=steps)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cache_skips_deep_work_as_scheduled(trio):
    names, steps = list(CATEGORIES), 8
    deep_rows = []
    deep_module = trio.pipeline.unet.mid_block.resnets[0]
    hook = deep_module.register_forward_hook(lambda m, args, out: deep_rows.append(out.shape[0]))
    kwargs = dict(seed=5, steps=steps, width=SIZE, height=SIZE, output_type="latent")
    try:
        exact = trio.generate("a cat", names, CMLoRA(ordering="category", cache=False), **kwargs)
        uncached_rows = sum(deep_rows)
        deep_rows.clear()
        method = CMLoRA(ordering="category")
        cached = trio.generate("a cat", names, method, **kwargs)
    finally:
        hook.remove()
    refresh = refresh_steps("nonuniform", steps)
    skipped = steps - len(refresh)
    assert method.passes == {"full": 3 * len(refresh) + skipped, "shallow": 2 * skipped}
    assert sum(deep_rows) == uncached_rows - 2 * 2 * skipped
    distance = ((cached - exact).norm() / exact.norm()).item()
    assert 0 < distance < 0.2, distance


def test_frequency_measure():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    assert cutoff_for(512) == 72 and cutoff_for(64) == 9
    assert radial_profile(noise).max() == pytest.approx(1.0)
    assert profile_images([noise], "n", [0]).score > profile_images([ramp], "r", [0]).score + 0.2


def test_frequency_profile_is_computed_once(trio, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSE_CACHE", str(tmp_path))
    calls = []
    hook = trio.pipeline.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = trio.frequency_profile("style", steps=3)
        n_first = len(calls)
        trio.loras["style"].derived.clear()
        again = trio.frequency_profile("style", steps=3)
    finally:
        hook.remove()
    assert n_first == 3 and len(calls) == 3, "the second call must come from the disk cache"
    assert again == first and 0 < first.score < 1 and first.cutoff == cutoff_for(SIZE)
    assert len(list(tmp_path.rglob("*.json"))) == 1
