"""How well a trained demo world draws, measured with the slot detectors.

:func:`evaluate` measures what the world promises (``compose demo-world evaluate``), each
rate with its Wilson 95% interval:

- ``base``: generic prompts over every slot count and two-figure scenes, no LoRA; the
  share of images with each slot right, and with every slot right;
- ``standins``: the generic stand-ins of the N = 5 benchmark sets (every concept
  replaced by a generic element of its slot) on the base: the share with all slots
  right, the proof that a five-concept picture is drawable at all;
- ``loras``: per concept, its trigger in a generic scene, with its LoRA: ``hit`` (the
  concept present), ``others`` (the prompt's other slots still right); and without it,
  ``without`` (the base shows the concept from the trigger words alone) and
  ``others_without`` (the other slots right on the base: how far the trigger words
  alone derail it, the bound on ``others``);
- ``ceiling``: the ceiling LoRA alone on the N = 5 sets' prompts: all concepts present;
- ``first_picture``: the README's first picture (:data:`EXAMPLE_SET` by
  :data:`EXAMPLE_METHOD`) on 16 seeds from :data:`EXAMPLE_SEED`: every slot right;
- ``seconds_per_image``: one image, batch 1, median of three, at the native size.

LoRAs are applied at the scale users get by default (:data:`compose.methods.references.DEFAULT_LORA_SCALE`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from PIL import Image

from ..calls import RunOptions, SamplingConfig
from ..composer import Composer
from ..evaluation.stats import wilson_interval
from ..methods.references import DEFAULT_LORA_SCALE
from ..overlay import mask_overlay
from ..sheets import contact_sheet
from .concepts import CONCEPTS
from .detectors import detect, side_of, slot_check
from .render import render
from .scenes import (
    Scene,
    composition_scene,
    composition_sets,
    sample_concept_scene,
    sample_generic_scene,
    two_character_scene,
)
from .world import CEILING, lora_path

Say = Callable[[str], None]


def _images(composer: Composer, prompts: list[str], seeds: list[int], loras, steps: int,
            lora_scale: float = DEFAULT_LORA_SCALE, chunk: int = 16) -> list[Image.Image]:  # fmt: skip
    out = []
    for start in range(0, len(prompts), chunk):
        out += composer.generate(prompts[start : start + chunk], loras, seed=seeds[start : start + chunk],
                                 lora_scale=lora_scale, sampling=SamplingConfig(steps=steps))  # fmt: skip
    return out


def rate(hits: Sequence[bool]) -> dict:
    """``{"rate", "low", "high", "n"}``: the share of ``hits`` and its Wilson 95% interval."""
    n, k = len(hits), int(sum(bool(h) for h in hits))
    low, high = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "low": low, "high": high, "n": n}


def slot_rates(images: list[Image.Image], scenes: list[Scene]) -> dict:
    """Per slot, and for all slots at once, the share of ``images`` right for their scene."""
    checks = [slot_check(image, scene) for image, scene in zip(images, scenes, strict=True)]
    slots = sorted({slot for check in checks for slot in check})
    out = {slot: rate([c[slot] for c in checks if slot in c]) for slot in slots}
    out["all"] = rate([all(c.values()) for c in checks])
    return out


def evaluate(composer: Composer, generic: int = 200, per_lora: int = 50, steps: int = 25,
             lora_scale: float = DEFAULT_LORA_SCALE, progress: Say | None = None) -> dict:  # fmt: skip
    """Every rate of the module docstring, on seeds ``0..n-1`` (scenes from the same seeds)."""
    say = progress or (lambda _: None)
    report: dict = {"steps": steps, "lora_scale": lora_scale}
    scenes = [sample_generic_scene(seed) for seed in range(generic)]
    report["base"] = slot_rates(_images(composer, [s.caption() for s in scenes], list(range(generic)), None, steps),
                                scenes)  # fmt: skip
    say(f"base: every slot right in {report['base']['all']['rate']:.0%} of {generic}")
    fives = [composition_scene(names, i) for i, names in enumerate(composition_sets(5))]
    standins = [scene.generic(i) for i, scene in enumerate(fives)]
    images = _images(composer, [s.caption() for s in standins], list(range(len(standins))), None, steps)
    report["standins"] = slot_rates(images, standins)
    say(f"N=5 stand-ins: every slot right in {report['standins']['all']['rate']:.0%}")
    report["loras"] = {name: lora_rates(composer, name, per_lora, steps, lora_scale) for name in CONCEPTS}
    for name, rates in report["loras"].items():
        say(f"{name}: hit {rates['hit']['rate']:.0%}, others {rates['others']['rate']:.0%}, "
            f"without {rates['without']['rate']:.0%}")  # fmt: skip
    if CEILING in composer.loras:
        images = _images(composer, [s.caption() for s in fives], list(range(len(fives))), [CEILING], steps, lora_scale)
        report["ceiling"] = rate([all(detect(i)[n] for n in s.concepts()) for i, s in zip(images, fives, strict=True)])
        say(f"ceiling LoRA, N=5: all present in {report['ceiling']['rate']:.0%}")
    report["first_picture"] = first_picture_rate(composer, 16, steps, lora_scale)
    say(f"first picture ({' + '.join(EXAMPLE_SET)}, {EXAMPLE_METHOD}): every slot right in "
        f"{report['first_picture']['rate']:.0%} of 16 seeds")  # fmt: skip
    report["seconds_per_image"] = seconds_per_image(composer, steps)
    return report


def lora_rates(composer: Composer, name: str, seeds: int, steps: int, lora_scale: float) -> dict:
    """The ``loras`` rates of the module docstring for the LoRA ``name``, on ``seeds``
    scenes of its concept (seeds ``0..seeds-1``)."""
    scenes = [sample_concept_scene(name, seed) for seed in range(seeds)]
    prompts = [s.caption() for s in scenes]
    with_lora = _images(composer, prompts, list(range(seeds)), [name], steps, lora_scale)
    without = _images(composer, prompts, list(range(seeds)), None, steps)
    slot = CONCEPTS[name].slot
    checks = [slot_check(image, scene) for image, scene in zip(with_lora, scenes, strict=True)]
    checks_without = [slot_check(image, scene) for image, scene in zip(without, scenes, strict=True)]

    def others(checked: list[dict[str, bool]]) -> dict:
        return rate([all(v for k, v in c.items() if k != slot) for c in checked])

    return {
        "hit": rate([c[slot] for c in checks]),
        "others": others(checks),
        "without": rate([detect(image)[name] for image in without]),
        "others_without": others(checks_without),
    }


def load_ceiling(composer: Composer, folder) -> None:
    """Load a world's ceiling LoRA (the yardstick) into ``composer`` as ``"ceiling"``."""
    composer.load_lora(lora_path(folder, CEILING), name=CEILING)


def seconds_per_image(composer: Composer, steps: int = 25, repeats: int = 3) -> float:
    """Median wall time of one image at the native size (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        composer.generate("a red circle on the left, white background", seed=i, sampling=SamplingConfig(steps=steps))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


EXAMPLE_SET = ("grumba", "glimmet")
EXAMPLE_LAYOUT, EXAMPLE_METHOD, EXAMPLE_SEED = 0, "merge", 0
"""The first picture a newcomer sees, the same in the README's quick start, its Python
example and the studio's preloaded prompt: a set of concepts, the layout of
:func:`composition_scene`, a method and a seed from which most seeds show every concept
(checked by the shipped world's tests). World 9 draws this pair right in 16 of 16 seeds
with Merge; the best set of three tried (grumba + glimmet + quarn, Merge) in 11 of 16,
and none with flimbo's hat or vosh's sky in any of 5 (assets/README.md), so the first
picture is the largest set the world draws reliably."""
EXAMPLE_PROMPT = composition_scene(EXAMPLE_SET, EXAMPLE_LAYOUT).caption()


def first_picture_rate(composer: Composer, seeds: int = 16, steps: int = 25,
                       lora_scale: float = DEFAULT_LORA_SCALE) -> dict:  # fmt: skip
    """The share of ``seeds`` seeds from :data:`EXAMPLE_SEED` on which the first picture
    shows every slot of its scene right, as the quick start draws it (each LoRA at weight 1)."""
    scene = composition_scene(EXAMPLE_SET, EXAMPLE_LAYOUT)
    images = composer.generate([scene.caption()] * seeds, list(EXAMPLE_SET), EXAMPLE_METHOD,
                               seed=list(range(EXAMPLE_SEED, EXAMPLE_SEED + seeds)), lora_scale=lora_scale,
                               sampling=SamplingConfig(steps=steps))  # fmt: skip
    return rate([all(slot_check(image, scene).values()) for image in images])


GRID_SETS = (("zorbo", "flimbo"), ("klinko", "vosh", "glimmet"), ("grumba", "wuzzle", "quarn", "dottix"),
             ("zorbo", "flimbo", "vosh", "brakka", "inkora"))  # fmt: skip


def example_grid(composer: Composer, methods: list[str], seed: int = 0, steps: int = 25) -> Image.Image:
    """64 px tiles, 2× enlarged: each concept with its LoRA alone (first row), then one
    composition of each size N = 2..5 (:data:`GRID_SETS`), a row each: the render it
    asks for, then what each of ``methods`` draws, then (with ``routed`` among them) the
    regions routed gave each LoRA (:func:`~compose.overlay.mask_overlay`)."""
    sampling, singles = SamplingConfig(steps=steps), []
    for name in CONCEPTS:
        singles += composer.generate(sample_concept_scene(name, seed).caption(), [name], seed=seed, sampling=sampling)
    tiles = singles + [singles[0].point(lambda _: 255)] * max(0, len(methods) + 1 - len(singles))
    columns = max(len(singles), len(methods) + 1 + ("routed" in methods))
    tiles += [tiles[0].point(lambda _: 255)] * (columns - len(tiles))
    for names in GRID_SETS:
        scene = composition_scene(names, seed)
        row, regions = [render(scene)], []
        for method in methods:
            images, masks = composer.generate(scene.caption(), list(names), method, seed=seed, sampling=sampling,
                                              run=RunOptions(return_masks=True))  # fmt: skip
            row += images
            if method == "routed":
                regions.append(mask_overlay(images[0], masks[0]))
        row += regions
        tiles += row + [row[0].point(lambda _: 255)] * (columns - len(row))
    return contact_sheet(tiles, columns=columns, scale=2)


def two_characters(composer: Composer, methods: list[str], seeds: int = 4, steps: int = 25,
                   background: str = "white") -> dict[str, dict]:  # fmt: skip
    """The regional benchmark: every ordered pair of characters, one asked on the left and
    one on the right, before ``background``, for ``seeds`` seeds, by each method
    (``regional`` gets each LoRA its half). Per method: the rates with each character on
    its own side (``left``, ``right``) and with both (``both``)."""
    characters = [c.name for c in CONCEPTS.values() if c.category == "character"]
    pairs = [(a, b) for a in characters for b in characters if a != b]
    out, sampling = {}, SamplingConfig(steps=steps)
    for method in methods:
        hits = []
        for left, right in pairs:
            prompt = two_character_scene(left, right, background, 0).caption()
            params = {"regions": {left: [0, 0, 0.5, 1], right: [0.5, 0, 1, 1]}} if method == "regional" else None
            images = composer.generate(prompt, [left, right], method, seed=list(range(seeds)), method_params=params,
                                       sampling=sampling)  # fmt: skip
            hits += [(side_of(i, left) == "left", side_of(i, right) == "right") for i in images]
        out[method] = {"left": rate([h[0] for h in hits]), "right": rate([h[1] for h in hits]),
                       "both": rate([all(h) for h in hits])}  # fmt: skip
    return out
