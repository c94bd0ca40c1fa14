"""CMLoRA: schedule, dominance weights, exactness without cache, the cache's saving, and
``reference=True`` against the released loop, written out here from a reading of Yqcca/CMLoRA."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import AS_LATENTS, SIZE, generator, reference_loop, reference_pipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from compose import CMLoRA, Composer, KLoRA, SamplingConfig
from compose.cli import _method_params, _parser
from compose.frequency import cutoff_for, profile_images, radial_profile
from compose.methods import MethodContext
from compose.methods.cmlora import dominance_weights, refresh_steps
from compose.methods.references import default_lora_scale, describe, settings
from compose.schedulers import make_scheduler

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
        # H = [character], L = [background]: H before round(0.55 x 10) = 6, then L
        (["character", "background"], 10, "off", [0] * 6 + [1] * 4),
        # H in the given order, advancing at each refresh step (0, 2, 3); L from step 4, at its first LoRA
        (["character", "style", "background"], 8, "nonuniform", [0, 0, 1, 0, 2, 2, 2, 2]),
        (["character", "style"], 6, "off", [0, 1, 0, 1, 0, 1]),
        (
            ["character", "style", "background"],
            20,
            "uniform",
            [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2],
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
    got = composer.generate(
        "a cat", names, method, seed=3, sampling=SamplingConfig(steps=steps, width=SIZE, height=SIZE), run=AS_LATENTS
    )

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
    kwargs = dict(seed=5, sampling=SamplingConfig(steps=steps, width=SIZE, height=SIZE), run=AS_LATENTS)
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


# -- the released code -----------------------------------------------------------------
#
# Written from a reading of Yqcca/CMLoRA@5e79e41, LoRA_Cache/pipelines/stable_diffusion/
# pipeline_offline.py:1072-1179 (the ``lora_composite`` branch of ``__call__``) with
# compose_offline.py's call (cache_layer_id 0, cache_block_id 1, uniform=True).

OTHERS = ("clothing", "style", "background", "object")


def released_refresh(steps: int, interval: int) -> list[int]:
    """``interval_seq``: 0 the non-uniform 2/3/2 ranges, 1 every step, else every ``interval``."""
    if interval == 0:
        first, second = int(0.375 * steps), int(0.875 * steps)
        return sorted([*range(0, first, 2), *range(first, second, 3), *range(second, steps, 2)])
    return list(range(steps)) if interval == 1 else list(range(0, steps, interval))


def released_plan(categories: list[str], steps: int, interval: int, last_early: int) -> list[tuple]:
    """Per step ``(dominant, recomputed, ages)``: the dominant LoRA (index in the
    combination), the LoRAs whose UNet pass ran in full (their cache entry was None or
    caching is off) and, for every LoRA, the step whose deep features it used. The
    released ``i <= 120`` is ``i <= last_early``."""
    real = [j for j, c in enumerate(categories) if c != "background"]
    back = [j for j, c in enumerate(categories) if c == "background"]
    adapters, seq, quick = real + back, released_refresh(steps, interval), interval > 1
    features: list[int | None] = [None] * len(adapters)
    indicator, plan = 0, []
    for i in range(steps):
        early = len(back) == 0 or i <= last_early
        if i in seq:
            if early:
                features[indicator % len(real)] = None
            else:
                features[1:][indicator % len(real)] = None  # into a copy, as released: no effect
            indicator += 1
        ran = []
        for itr, adapter in enumerate(adapters):
            if not (quick and features[itr] is not None):
                features[itr] = i
                ran.append(adapter)
        dominant = adapters[(indicator - 1) % len(real) + (0 if early else 1)]
        ages = {adapter: features[itr] for itr, adapter in enumerate(adapters)}
        plan.append((dominant, sorted(ran), [ages[j] for j in range(len(categories))]))
    return plan


def our_plan(method: CMLoRA) -> list[tuple]:
    """The same view of a prepared method: a branch's features are those of its last full pass."""
    last: dict[int, int] = {}
    plan = []
    for step, full in enumerate(method.full):
        last.update({j: step for j in full})
        plan.append((method.dominant[step], sorted(full), [last[j] for j in range(len(method.context.loras))]))
    return plan


def combination_context(trio: Composer, categories: list[str], steps: int) -> MethodContext:
    template = trio.loras["character"]
    loras = [replace(template, name=f"{c}{k}", category=c, derived={}) for k, c in enumerate(categories)]
    layers = list(trio.registries["unet"].layers)
    return MethodContext(loras, torch.ones(len(loras)), steps, layers, trio.pipeline.unet)


COMBINATIONS = [["character", *rest] for n in range(2, 6) for rest in itertools.combinations(OTHERS, n - 1)]
SCHEDULE_OF = {0: ("nonuniform", 2), 1: ("off", 2), 2: ("uniform", 2), 3: ("uniform", 3), 5: ("uniform", 5)}


@pytest.mark.parametrize("steps", [25, 50])
@pytest.mark.parametrize("interval", sorted(SCHEDULE_OF))
def test_reference_plan_equals_the_released_loop(trio, steps, interval):
    """``reference=True``: dominant LoRA, full passes and the age of every reused feature,
    step by step, for every ComposLoRA-style combination of N = 2..5 (the character
    first, as ``generate_combinations`` orders them) in each of the released schedules
    (``--interval 0, 1, 2, 3, 5``); the switch scaled to the steps as 0.55."""
    schedule, every = SCHEDULE_OF[interval]
    last_early = round(0.55 * steps) - 1
    for categories in COMBINATIONS:
        method = CMLoRA(reference=True, schedule=schedule, interval=every)
        method.prepare(combination_context(trio, categories, steps))
        assert our_plan(method) == released_plan(categories, steps, interval, last_early), categories
        assert (method.features is not None) == (interval > 1)


def test_reference_switch_is_the_released_step_120(trio):
    assert round(0.55 * 220) - 1 == 120
    categories = ["character", "style", "background"]
    method = CMLoRA(reference=True, schedule="uniform", interval=3)
    method.prepare(combination_context(trio, categories, 220))
    assert our_plan(method) == released_plan(categories, 220, 3, 120)
    assert [method.phase_two(i) for i in (120, 121)] == [False, True]


def test_dominant_recompute_without_the_released_slips(trio):
    """``recompute="dominant"`` outside reference mode: the released caching (the new
    dominant at a refresh step, every other pass cached) but with phase 2 refreshed and
    cycling through L."""
    categories = ["character", "style", "background"]
    method = CMLoRA(ordering="category", schedule="uniform", interval=2, recompute="dominant")
    method.prepare(combination_context(trio, categories, 12))
    assert method.dominant == [0, 0, 1, 1, 0, 0, 1, 2, 2, 2, 2, 2]
    assert method.full == [[0, 1, 2], [], [1], [], [0], [], [1], [], [2], [], [2], []]
    reference = CMLoRA(reference=True, schedule="uniform", interval=2)
    reference.prepare(combination_context(trio, categories, 12))
    assert reference.dominant == [0, 0, 1, 1, 0, 0, 1, 2, 1, 1, 2, 2]
    assert reference.full == [[0, 1, 2], [], [1], [], [0], [], [1], [], [], [], [], []]


def test_reference_fixes_its_settings():
    method = CMLoRA(reference=True)
    assert (method.ordering, method.recompute, method.switch_at, method.c1, method.c2) == (
        "category",
        "dominant",
        0.55,
        2,
        3,
    )
    assert CMLoRA(**method.parameters()) == method, "a recorded reference method rebuilds"
    with pytest.raises(ValueError, match="orders by category, as the released code does, so split_gap"):
        CMLoRA(reference=True, split_gap=0.3)
    for wrong in ({"ordering": "frequency"}, {"recompute": "all"}, {"switch_at": 0.6}, {"c2": 4}):
        with pytest.raises(ValueError, match="reference=True fixes"):
            CMLoRA(reference=True, **wrong)
    assert (CMLoRA().ordering, CMLoRA().recompute, CMLoRA().switch_at) == ("frequency", "all", 0.55)
    assert default_lora_scale("cmlora", {"reference": True}) == 1.0 and default_lora_scale(CMLoRA()) == 0.8


def capture_input(module: nn.Module, store: list):
    """A hook that keeps the ``hidden_states`` a module is called with."""
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: store.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True
    )


def released_shallow_pass(unet, x, t, ehs, feature):
    """The released cached UNet pass with cache_layer_id 0, cache_block_id 1 on SD1.5's
    layout (unet_2d_condition.py:1218-1332): ``conv_in``, the first down block's
    (resnet, attention) pairs without its downsampler, then the last up block on the
    cached input of that block, and the output head."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
    h = unet.conv_in(x)
    residuals = (h,)
    first = unet.down_blocks[0]
    for resnet, attention in zip(first.resnets, first.attentions, strict=True):
        h = attention(resnet(h, emb), encoder_hidden_states=ehs, return_dict=False)[0]
        residuals += (h,)
    h = unet.up_blocks[-1](
        hidden_states=feature, res_hidden_states_tuple=residuals, temb=emb, encoder_hidden_states=ehs
    )
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def test_reference_generation_equals_the_released_cached_loop(lora_files):
    """``CMLoRA(reference=True, schedule="uniform", interval=2)`` at its default LoRA
    scale (1) equals the released loop written out with diffusers adapters: per step
    and LoRA a full pass (keeping the last up block's input) or the shallow pass on
    the kept feature, weighted ``N / (c + N - 1)`` (``c`` times for the dominant),
    averaged inside guidance."""
    names, steps, guidance = list(CATEGORIES), 12, 7.5
    composer = Composer.tiny("sd1")
    for i, category in enumerate(names):
        composer.load_lora(lora_files["sd1", i]["peft"], name=category, category=category)
    method = CMLoRA(reference=True, schedule="uniform", interval=2)
    got = composer.generate(
        "a cat", names, method, seed=3, sampling=SamplingConfig(steps=steps, width=SIZE, height=SIZE), run=AS_LATENTS
    )

    pipe = reference_pipeline("sd1", [(n, lora_files["sd1", i]["parts"]) for i, n in enumerate(names)])
    pipe.set_adapters(names, [1.0] * 3)
    cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, "")
    ehs = torch.cat([uncond, cond])
    sched = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    sched.set_timesteps(steps)
    latents = randn_tensor((1, 4, SIZE // 2, SIZE // 2), generator=generator(3)) * sched.init_noise_sigma
    plan = released_plan(names, steps, 2, round(0.55 * steps) - 1)
    n, coeff = len(names), len(names) - 0.5
    other = n / (coeff + n - 1)
    features: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            dominant, ran, _ = plan[i]
            preds = []
            for j, name in enumerate(names):
                pipe.unet.set_adapters([name], [1.0])
                if j in ran:
                    kept: list = []
                    hook = capture_input(pipe.unet.up_blocks[-1], kept)
                    eps = pipe.unet(x, t, encoder_hidden_states=ehs).sample
                    hook.remove()
                    features[j] = kept[0]
                else:
                    eps = released_shallow_pass(pipe.unet, x, t, ehs, features[j])
                preds.append(eps * (other * coeff if j == dominant else other))
            u, c = torch.stack(preds).chunk(2, dim=1)
            u, c = u.mean(0), c.mean(0)
            latents = sched.step(u + guidance * (c - u), t, latents).prev_sample
    assert any(len(ran) < n for _, ran, _ in plan), "the test must reuse cached features"
    torch.testing.assert_close(got, latents, atol=1e-4, rtol=0)


def test_cli_reference_and_settings_table():
    args = _parser().parse_args(["generate", "--method", "cmlora", "--reference", "--prompt", "x"])
    assert args.lora_scale is None
    assert CMLoRA(**_method_params(args)).ordering == "category"
    args = _parser().parse_args(["generate", "--method", "klora", "--reference", "--prompt", "x"])
    assert KLoRA(**_method_params(args)).progress == "calls"
    text = describe()
    assert "cmlora: --steps 220 --guidance 8.5 --lora-scale 1" in text
    assert "merge, switch, composite: --steps 200 --guidance 10 --lora-scale 0.8" in text
    assert settings("klora") == {
        "lora_scale": 1.0,
        "sampling": SamplingConfig(steps=50, guidance_scale=5.0, width=1024, height=1024, scheduler="euler"),
    }
