"""The trained demo world: where it lives, how to load it, and how well it draws.

:func:`load_demo_world` gives a :class:`~compose.composer.Composer` over the shipped
pipeline with the eleven LoRAs loaded (named by concept). :func:`evaluate` measures what
its README promises, with the exact detectors:

- ``base``: generic prompts, no LoRA; the share of images whose shape, colour, position
  and background (each, and all four) match the prompt;
- ``loras``: per concept, single-concept prompts with its LoRA (``hit``) and without it
  (``without``): the share of images where the detector finds the concept; ``others`` is
  the share where a concept that was not asked for shows up; ``generic`` is the base's
  all-four rate on generic prompts with this LoRA loaded, its specificity;
- ``seconds_per_image``: one image, batch 1, median of three, at the native size.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..composer import DEMO_WORLD, Composer, ModelLoadError
from .concepts import CONCEPTS
from .detectors import detect, detect_generic
from .render import contact_sheet, render
from .scenes import composition_scene, sample_concept_scene, sample_generic_scene
from .train import CLIP_FOLDER, lora_path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo_world"
GENERIC_KEYS = ("shape", "colour", "position", "background")


def demo_world_folder() -> Path:
    """The shipped demo world: ``$COMPOSE_DEMO_WORLD`` or ``assets/demo_world`` of the checkout."""
    return Path(os.environ.get("COMPOSE_DEMO_WORLD", ASSETS))


def demo_world_clip(folder: str | Path | None = None) -> Path:
    """The folder of the demo world's offline CLIP (for ``CLIPScorer.from_folder``)."""
    return Path(folder or demo_world_folder()) / CLIP_FOLDER


def load_demo_world(folder: str | Path | None = None, device: str | None = None) -> Composer:
    """The demo world's pipeline with every concept's LoRA loaded under the concept's name;
    without ``folder``, the shipped one, recorded in PNGs as ``demo-world``."""
    where = Path(folder or demo_world_folder())
    if not (where / "model_index.json").is_file():
        raise ModelLoadError(
            f"the demo world is not at {where}: train it with `compose demo-world train`, "
            "set COMPOSE_DEMO_WORLD to its folder, or pass another model (tiny:sd1 needs nothing)"
        )
    composer = Composer.from_pretrained(where, device=device)
    if folder is None:
        composer.model_name = DEMO_WORLD
    for name in CONCEPTS:
        composer.load_lora(lora_path(where, name), name=name)
    return composer


def _images(composer: Composer, prompts: list[str], seeds: list[int], loras, steps: int, lora_scale: float = 1.0,
            chunk: int = 25) -> list:  # fmt: skip
    out = []
    for start in range(0, len(prompts), chunk):
        out += composer.generate(prompts[start : start + chunk], loras, seed=seeds[start : start + chunk], steps=steps,
                                 lora_scale=lora_scale)  # fmt: skip
    return out


def evaluate(
    composer: Composer,
    generic: int = 100,
    per_lora: int = 50,
    specificity: int = 10,
    steps: int = 25,
    lora_scale: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The hit rates of the module docstring on seeds ``0..n-1`` (scenes from the same seeds),
    each LoRA at weight 1 times ``lora_scale`` (1: the strength it was trained at)."""
    say = progress or (lambda _: None)
    scenes = [sample_generic_scene(seed) for seed in range(generic)]
    images = _images(composer, [s.caption() for s in scenes], list(range(generic)), None, steps)
    found = [detect_generic(image, scene) for image, scene in zip(images, scenes, strict=True)]
    report: dict = {"base": {k: float(np.mean([f[k] for f in found])) for k in GENERIC_KEYS}}
    report["base"]["all"] = float(np.mean([all(f.values()) for f in found]))
    report["base"]["images"] = generic
    say(f"base: {report['base']['all']:.0%} of {generic} generic images right in all four")
    report["loras"] = {}
    for name in CONCEPTS:
        scenes = [sample_concept_scene(name, seed) for seed in range(per_lora)]
        prompts, seeds = [s.caption() for s in scenes], list(range(per_lora))
        with_lora = [detect(image) for image in _images(composer, prompts, seeds, [name], steps, lora_scale)]
        without = [detect(image) for image in _images(composer, prompts, seeds, None, steps)]
        plain = [sample_generic_scene(seed) for seed in range(specificity)]
        plain_images = _images(composer, [s.caption() for s in plain], list(range(specificity)), [name], steps,
                               lora_scale)  # fmt: skip
        plain_right = [all(detect_generic(i, s).values()) for i, s in zip(plain_images, plain, strict=True)]
        report["loras"][name] = {
            "hit": float(np.mean([d[name] for d in with_lora])),
            "without": float(np.mean([d[name] for d in without])),
            "others": float(np.mean([any(v for k, v in d.items() if k != name) for d in with_lora])),
            "generic": float(np.mean(plain_right)),
        }
        say(f"{name}: {report['loras'][name]}")
    report["lora_scale"] = lora_scale
    report["seconds_per_image"] = seconds_per_image(composer, steps)
    return report


def seconds_per_image(composer: Composer, steps: int = 25, repeats: int = 3) -> float:
    """Median wall time of one image at the native size (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        composer.generate("a red circle on the left, white background", seed=i, steps=steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


EXAMPLE_SET = ("zorbo", "flimbo", "vosh", "brakka")
EXAMPLE_PROMPT = composition_scene(EXAMPLE_SET, 0).caption()


def example_grid(composer: Composer, methods: list[str], seed: int = 0, steps: int = 25):
    """Two rows of 64 px tiles, 2× enlarged: each concept with its LoRA alone (first row,
    eleven tiles), then :data:`EXAMPLE_SET` composed by each of ``methods`` (second row),
    after the render it was asked for."""
    singles = []
    for name in CONCEPTS:
        prompt = sample_concept_scene(name, seed).caption()
        singles += composer.generate(prompt, [name], seed=seed, steps=steps)
    scene = composition_scene(EXAMPLE_SET, seed)
    row = [render(scene)]
    for method in methods:
        row += composer.generate(scene.caption(), list(EXAMPLE_SET), method, seed=seed, steps=steps)
    blank = [row[0].point(lambda _: 255)] * (len(singles) - len(row))
    return contact_sheet(singles + row + blank, columns=len(singles), scale=2)


def side_presence(image, name: str, side: str) -> bool:
    """Whether character/clothing/object ``name`` shows in the ``side`` half of ``image``
    (the other half greyed out, which no hue detector fires on)."""
    pixels = np.asarray(image.convert("RGB")).copy()
    half = pixels.shape[1] // 2
    pixels[:, half:] = 128 if side == "left" else pixels[:, half:]
    pixels[:, :half] = 128 if side == "right" else pixels[:, :half]
    return detect(Image.fromarray(pixels))[name]


def two_characters(
    composer: Composer, methods: list[str], seeds: int = 4, steps: int = 25, background: str = "white"
) -> dict[str, dict[str, float]]:
    """The regional benchmark: every ordered pair of characters, one asked on the left and
    one on the right, for ``seeds`` seeds, by each method (``regional`` gets each LoRA its
    half). Per method: the share of images with each character on its own side
    (``left``, ``right``) and with both (``both``)."""
    characters = [c.name for c in CONCEPTS.values() if c.category == "character"]
    pairs = [(a, b) for a in characters for b in characters if a != b]
    out = {}
    for method in methods:
        hits = []
        for left, right in pairs:
            triggers = CONCEPTS[left].trigger, CONCEPTS[right].trigger
            prompt = f"a {triggers[0]} on the left, a {triggers[1]} on the right, {background} background"
            params = {"regions": {left: [0, 0, 0.5, 1], right: [0.5, 0, 1, 1]}} if method == "regional" else None
            images = composer.generate(prompt, [left, right], method, seed=list(range(seeds)), steps=steps,
                                       method_params=params)  # fmt: skip
            hits += [(side_presence(i, left, "left"), side_presence(i, right, "right")) for i in images]
        out[method] = {
            "left": float(np.mean([h[0] for h in hits])),
            "right": float(np.mean([h[1] for h in hits])),
            "both": float(np.mean([all(h) for h in hits])),
            "images": len(hits),
        }
    return out
