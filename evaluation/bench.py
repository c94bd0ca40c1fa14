"""``compose bench --sets``: every (set, method, seed) of a composition-set manifest.

Each item writes its image (PNG with the full generation record) and a JSON record of
scores (CLIPScore; on the demo world also concept presence) and timings, atomically,
under ``OUT/items/<set>/``; a rerun skips every item whose record exists, so an
interrupted run loses nothing. Under ``accelerate launch``
or ``torchrun`` each process takes its share of the items (accelerate's
``split_between_processes``); processes started by hand on one folder split the items
by claiming each before it runs (:mod:`.claims`). All write into the same folder without
clashes, because every item has its own files, and the main process then builds the results: every
record as JSONL and CSV, a markdown table by method and N (mean and 95% interval),
win rates against Merge, plots, and a grid of the methods side by side per set.
"""

from __future__ import annotations

import errno
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checks
from ..calls import RunOptions, SamplingConfig
from ..checks import printable
from ..composer import Composer
from ..files import atomic_open
from ..metadata import save_png
from ..overlay import mask_overlay
from .claims import share
from .clipscore import CLIPScorer, composition_text
from .presence import concept_presence
from .report import write_report
from .sets import CompositionSet, Manifest, check_set_id, load_manifest


@dataclass(frozen=True)
class Item:
    """One unit of benchmark work."""

    set: CompositionSet
    method: str
    seed: int


def method_spec(spec: str) -> tuple[str, dict]:
    """A benchmark method and its parameters from ``NAME+OPTION+...``: each option either a
    boolean parameter turned on (``klora+reference``) or ``KEY=VALUE`` (``klora+scale=s*``,
    ``cmlora+recompute=dominant``; ``none``, ``true``, ``false`` and numbers read as such),
    so that variants of one method run side by side under their own names in the tables
    and grids. The method is built once here, so that a bad value fails before any work."""
    from dataclasses import fields

    from ..methods import METHODS, get_method

    name, *options = spec.split("+")
    if name not in METHODS:
        raise ValueError(f"unknown method {name or '(none)'}: choose from {', '.join(METHODS)}")
    types = {f.name: re.sub(r"\[.*?\]+", "", str(f.type)) for f in fields(METHODS[name])}
    known = {key: kind for key, kind in types.items() if {"bool", "int", "float", "str"} & set(kind.split(" | "))}
    switches = [k for k, t in known.items() if t == "bool"]
    params: dict = {}
    for option in options:
        key, has_value, text = option.partition("=")
        value = _option_value(text) if has_value else True
        if key not in known or (not has_value and key not in switches):
            offered = ", ".join([*switches, *(f"{k}=VALUE" for k in known if k not in switches)]) or "none"
            raise ValueError(f"method {spec!r}: {name} has no option {option!r} (its options: {offered})")
        if isinstance(value, str) and "str" not in known[key]:
            raise ValueError(f"method {spec!r}: {key} takes {known[key]}, not {text!r}")
        params[key] = value
    try:
        get_method(name, **params)
    except (TypeError, ValueError) as error:
        raise ValueError(f"method {spec!r}: {error}") from None
    return name, params


def _option_value(text: str):
    """``none``/``true``/``false``, an int, a float, or the text itself."""
    words = {"none": None, "true": True, "false": False}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def file_stem(method: str) -> str:
    """A method spec as part of a file name: characters outside letters, digits and
    ``+=._-`` (the ``*`` of ``scale=s*``) become ``~``."""
    return "".join(c if c.isalnum() or c in "+=._-" else "~" for c in method)


def plan_items(manifest: Manifest, methods: list[str], seeds: int, per_n: int | None = None) -> list[Item]:
    """Every (set, method, seed), in a fixed order; seeds listed in the manifest (per set
    or for all) win over ``range(seeds)``. ``per_n`` keeps that many sets of each LoRA
    count N, evenly spaced through the manifest's order (a quicker, still balanced run)."""
    sets = manifest.sets
    if per_n is not None and (isinstance(per_n, bool) or not isinstance(per_n, int) or per_n < 1):
        raise ValueError(f"sets per N (--sets-per-n) must be an integer of at least 1, got {per_n!r}: it keeps that "
                         "many sets of each LoRA count N, so 0 would run nothing")  # fmt: skip
    if per_n is not None:
        by_n: dict[int, list] = {}
        for s in sets:
            by_n.setdefault(s.n, []).append(s)
        kept = {id(group[i * len(group) // per_n]) for group in by_n.values() for i in range(min(per_n, len(group)))}
        sets = [s for s in sets if id(s) in kept]
    for s in sets:  # load_manifest checks the ids; a Manifest built in Python is checked here
        problem = check_set_id(s.id)
        if problem:
            raise ValueError(f"set {printable(repr(s.id))[:80]}: {problem}")
    return [Item(s, method, seed) for s in sets for seed in (s.seeds or list(range(seeds))) for method in methods]


def refusals(manifest: Manifest, methods: list[str]) -> dict[tuple[str, str], str]:
    """``(set id, method) -> why`` for every set a method refuses to compose (K-LoRA's
    reference mode runs one content and one style LoRA, as its released code): the run
    skips those items and says so, rather than stopping at the first or filing another
    rule's images under the reference's name."""
    from ..methods import get_method

    found = {}
    for spec in methods:
        name, params = method_spec(spec)
        method = get_method(name, **params)
        for s in manifest.sets:
            why = method.cannot_compose([(lora, manifest.loras[lora].category) for lora in s.loras])
            if why:
                found[s.id, spec] = why
    return found


def record_path(out: Path, item: Item) -> Path:
    return out / "items" / item.set.id / f"{file_stem(item.method)}-{item.seed}.json"


def image_path(out: Path, item: Item) -> Path:
    return out / "items" / item.set.id / f"{file_stem(item.method)}-{item.seed}.png"


def claim_path(out: Path, item: Item) -> Path:
    """The item's claim file (:mod:`compose.evaluation.claims`), beside its record while it runs."""
    return out / "items" / item.set.id / f"{file_stem(item.method)}-{item.seed}.claim"


def regions_path(out: Path, item: Item) -> Path:
    return out / "items" / item.set.id / f"{file_stem(item.method)}-{item.seed}-regions.png"


def check_writable(out: Path) -> None:
    """Fail early, with the folder's name, when results could not be written: the folder,
    or the nearest folder above it that exists, takes a file. Nothing is created, so a run
    refused later (an image size beyond the model) leaves no empty folder behind."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe"):
            pass
    except OSError as error:
        raise OSError(f"{out}: the output folder is not writable ({error.strerror or error})") from error


def check_settings(composer: Composer, settings: dict) -> None:
    """The image size and steps against the loaded model's limits, before any item runs or
    any file is written (a 4096-pixel run on a 64-pixel model is refused, not started)."""
    sampling = settings.get("sampling") or SamplingConfig()
    checks.size_and_steps(composer.limits, composer.shape, width=sampling.width, height=sampling.height,
                          steps=sampling.steps)  # fmt: skip


def load_records(out: Path) -> list[dict]:
    """Every finished item's record, in a stable order."""
    return [json.loads(p.read_text()) for p in sorted((out / "items").glob("*/*.json"))]


def _side_regions(item: Item) -> dict:
    """``regional``'s boxes for a set with ``sides``: each such LoRA its half of the picture."""
    halves = {"left": [0.0, 0.0, 0.5, 1.0], "right": [0.5, 0.0, 1.0, 1.0]}
    return {"regions": {name: halves[side] for name, side in item.set.sides.items()}}


def run_item(composer: Composer, scorer: CLIPScorer, manifest: Manifest, item: Item, settings: dict) -> dict:
    """Generate one image, score it, and return its record (with, for a method that confines
    LoRAs to regions, a picture of them: :func:`compose.overlay.mask_overlay`)."""
    entries = [manifest.loras[name] for name in item.set.loras]
    method, params = method_spec(item.method)
    if method == "regional" and item.set.sides:
        params.update(_side_regions(item))
    start = time.perf_counter()
    images, masks = composer.generate(
        manifest.prompt_for(item.set),
        loras=[(e.name, e.weight) for e in entries],
        method=method,
        method_params=params or None,
        negative_prompt=manifest.negative_prompt_for(item.set),
        seed=item.seed,
        run=RunOptions(return_masks=True),
        **settings,
    )
    image = images[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    text = composition_text(manifest.triggers(item.set))
    return {
        "set": item.set.id,
        "method": item.method,
        "seed": item.seed,
        "n": item.set.n,
        "loras": list(item.set.loras),
        "clipscore": round(float(scorer.score([image], [text])[0]), 4),
        **(concept_presence(image, item.set.loras, item.set.sides) or {}),
        "seconds": round(seconds, 4),
        "image": str(Path("items") / item.set.id / f"{file_stem(item.method)}-{item.seed}.png"),
        "_image": image,
        **({"regions": str(regions_path(Path(), item)), "_regions": mask_overlay(image, masks[0])} if masks[0] else {}),
    }


def _say_refused(refused: dict[tuple[str, str], str]) -> None:
    """One line per method that skips sets: how many, and why (its first reason)."""
    by_method: dict[str, list[str]] = {}
    for (_, spec), why in refused.items():
        by_method.setdefault(spec, []).append(why)
    for spec, reasons in by_method.items():
        print(printable(f"compose bench: {spec} skips {len(reasons)} set(s): {reasons[0]}"), file=sys.stderr)


def run_benchmark(
    sets_file: Path,
    methods: list[str],
    seeds: int,
    out: Path,
    composer_factory: Callable[[], Composer],
    scorer_factory: Callable[[], CLIPScorer],
    settings: dict,
    progress: bool = True,
    per_n: int | None = None,
) -> list[dict]:
    """Run (or resume) the benchmark; every process of a distributed launch calls this.
    ``settings``: the :meth:`Composer.generate` keywords every item shares (``sampling``,
    ``lora_scale``); ``per_n``: see :func:`plan_items`.

    Returns all records once every process has finished (the main process then also
    writes the report).
    """
    from accelerate import PartialState

    manifest = load_manifest(sets_file)
    for spec in methods:
        method_spec(spec)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        check_writable(out)
    state.wait_for_everyone()
    refused = refusals(manifest, methods)
    planned = plan_items(manifest, methods, seeds, per_n)
    items = [item for item in planned if (item.set.id, item.method) not in refused]
    if state.is_main_process:
        _say_refused({key: refused[key] for item in planned if (key := (item.set.id, item.method)) in refused})
    with state.split_between_processes(items) as mine:
        todo = [item for item in mine if not record_path(out, item).exists()]
    if todo:
        composer = composer_factory()
        check_settings(composer, settings)
        scorer = scorer_factory()
        for name in sorted({n for item in todo for n in item.set.loras}):
            entry = manifest.loras[name]
            if name in composer.loras:  # the model came with its own (the demo world): the manifest's file wins
                composer.unload_lora(name)
            composer.load_lora(manifest.lora_path(name), name=name, category=entry.category, triggers=entry.triggers)
        bar = tqdm(
            total=len(todo),
            desc=f"benchmark [{state.process_index + 1}/{state.num_processes}]",
            unit="image",
            disable=not progress,
            position=state.process_index,
        )

        def run_one(item: Item) -> None:
            record = run_item(composer, scorer, manifest, item, settings)
            save_png(record.pop("_image"), image_path(out, item))
            if "_regions" in record:
                save_png(record.pop("_regions"), regions_path(out, item))
            with atomic_open(record_path(out, item), "w") as handle:
                json.dump(record, handle, sort_keys=True)

        # processes started by hand on one folder split the items by claiming each (claims.py)
        ran = share(todo, lambda item: record_path(out, item).exists(), partial(claim_path, out), run_one, bar.update)
        bar.close()
        others = f"; other processes on {out} ran the rest" if ran < len(todo) else ""
        print(f"compose bench: this process ran {ran} of the {len(todo)} items left{others}", file=sys.stderr)
    state.wait_for_everyone()
    records = load_records(out)
    if state.is_main_process:
        write_report(out, records, methods)
    return records
