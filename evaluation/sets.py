"""Composition sets: which LoRAs to compose, with which prompt, as a JSON manifest.

A manifest holds a LoRA library (name, file, category, trigger words, weight) and the
composition sets drawn from it (an id, LoRA names, a prompt, optional negative prompt
and seeds), plus defaults for all sets. ``evaluation/README.md`` documents the format
with the ComposLoRA testbed as the worked example. :func:`load_manifest` checks
everything a benchmark run would otherwise trip over hours in, and every
:class:`ManifestError` names the file and the entry at fault, e.g.
``sets.json: sets[17] ("anime-3-12"): unknown LoRA 'knight_2'``.

:func:`composlora_sets` enumerates sets of the ComposLoRA shape (Zhong et al. 2024):
one character plus LoRAs of distinct other categories.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from compose.checks import printable, safe_name
from compose.loading import CATEGORIES

SET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MAX_SET_ID = 128
"""A set id names its output folder (``OUT/items/<id>/``), so it is a plain file name:
letters, digits and ``. _ + -``, starting with a letter or digit (no ``/``, no ``..``,
no NUL), at most 128 characters (file names stop at 255 bytes)."""

COMPOSLORA_COUNTS = {2: 24, 3: 72, 4: 96, 5: 48}
"""Sets per LoRA count N in one ComposLoRA subset: every set its 11 LoRAs allow, 240 in all."""


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the entry and the reason."""

    def __init__(self, path: str | Path, location: str, reason: str) -> None:
        super().__init__(f"{path}: {location}: {reason}" if location else f"{path}: {reason}")
        self.path = str(path)
        self.location = location
        self.reason = reason


@dataclass
class LoRAEntry:
    """A LoRA of the library. ``file`` is as written in the manifest: absolute, or
    relative to the manifest's folder (:meth:`Manifest.lora_path` resolves it)."""

    name: str
    file: str
    category: str
    triggers: list[str]
    weight: float = 1.0


@dataclass
class CompositionSet:
    """LoRAs to compose into one image, by name, in composition order (Switch's order).

    ``generic_prompt`` is the set's *generic stand-in*, where a library has one: the
    prompt with every concept replaced by a generic element of its slot, which the base
    model alone can draw, so that a run can tell an undrawable layout from a lost concept.
    ``sides`` says, for LoRAs the prompt puts on a side of the picture (two characters
    side by side), which side (``"left"`` or ``"right"``): the benchmark then counts such
    a concept present only on its side.
    """

    id: str
    loras: list[str]
    prompt: str
    negative_prompt: str | None = None
    seeds: list[int] | None = None
    generic_prompt: str | None = None
    sides: dict[str, str] | None = None

    @property
    def n(self) -> int:
        """The number of LoRAs composed."""
        return len(self.loras)


@dataclass
class Manifest:
    """A LoRA library, composition sets over it, and the defaults the sets share.

    ``root`` is the folder relative ``file`` paths start from. A set's prompt is
    ``prompt_prefix`` and its own prompt joined by ``", "``; its negative prompt and
    seeds are its own where given, else the manifest's (no seeds anywhere: the run chooses).
    """

    root: Path
    loras: dict[str, LoRAEntry]
    sets: list[CompositionSet] = field(default_factory=list)
    base_model: str | None = None
    prompt_prefix: str = ""
    negative_prompt: str = ""
    seeds: list[int] | None = None
    one_per_category: bool = False

    def lora_path(self, name: str) -> Path:
        """The file of LoRA ``name``."""
        return self.root / Path(self.loras[name].file).expanduser()

    def triggers(self, composition: CompositionSet) -> list[str]:
        """The trigger words of the set's LoRAs, in set order (CLIPScore's text, see
        :func:`compose.evaluation.clipscore.composition_text`)."""
        return [word for name in composition.loras for word in self.loras[name].triggers]

    def prompt_for(self, composition: CompositionSet) -> str:
        """The full prompt of a set: the prefix, then the set's prompt."""
        return ", ".join(part for part in (self.prompt_prefix, composition.prompt) if part)

    def negative_prompt_for(self, composition: CompositionSet) -> str:
        """The set's negative prompt, else the manifest's."""
        return self.negative_prompt if composition.negative_prompt is None else composition.negative_prompt

    def seeds_for(self, composition: CompositionSet) -> list[int] | None:
        """The set's seeds, else the manifest's, else ``None``: the run chooses."""
        return self.seeds if composition.seeds is None else composition.seeds

    def to_json(self, folder: str | Path | None = None) -> dict:
        """The manifest as JSON data, with relative LoRA paths made relative to ``folder``
        (default: :attr:`root`), where the written file will be."""
        folder = Path(folder) if folder is not None else self.root
        loras = []
        for name, entry in self.loras.items():
            file = entry.file
            if not Path(file).expanduser().is_absolute():
                file = Path(os.path.relpath(self.lora_path(name), folder)).as_posix()
            loras.append(
                {
                    "name": name,
                    "file": file,
                    "category": entry.category,
                    "triggers": entry.triggers,
                    "weight": entry.weight,
                }
            )
        sets = []
        for s in self.sets:
            data = {"id": s.id, "loras": s.loras, "prompt": s.prompt}
            data.update(
                {
                    k: v
                    for k, v in (
                        ("negative_prompt", s.negative_prompt),
                        ("seeds", s.seeds),
                        ("generic_prompt", s.generic_prompt),
                        ("sides", s.sides),
                    )
                    if v is not None
                }
            )
            sets.append(data)
        top = {
            "base_model": self.base_model,
            "prompt_prefix": self.prompt_prefix,
            "negative_prompt": self.negative_prompt,
            "seeds": self.seeds,
            "one_per_category": self.one_per_category,
        }
        return {**{k: v for k, v in top.items() if v is not None}, "loras": loras, "sets": sets}

    def save(self, path: str | Path) -> Path:
        """Write the manifest as JSON to ``path``, readable by :func:`load_manifest`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(path.parent), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


class _Checker:
    """Type checks that raise :class:`ManifestError` naming the file and the location."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, location: str, reason: str) -> ManifestError:
        return ManifestError(self.path, location, reason)

    def fields(self, data: object, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
        if not isinstance(data, dict):
            raise self.fail(where, f"expected a JSON object, got {_json_type(data)}")
        for key in required:
            if key not in data:
                raise self.fail(where, f"missing required field '{key}'")
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            raise self.fail(where, f"unknown field '{unknown[0]}' (fields: {', '.join(required + optional)})")
        return data

    def string(self, data: dict, key: str, where: str, empty: bool = True) -> str:
        value = data[key]
        if not isinstance(value, str):
            raise self.fail(where, f"'{key}' must be a string, not {_json_type(value)}")
        if not empty and not value.strip():
            raise self.fail(where, f"'{key}' is empty")
        return value

    def optional_string(self, data: dict, key: str, where: str, default: str | None = None) -> str | None:
        return default if data.get(key) is None else self.string(data, key, where)

    def strings(self, data: dict, key: str, where: str) -> list[str]:
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(where, f"'{key}' must be a list of strings, not {_json_type(value)}")
        return value

    def seeds(self, data: dict, where: str) -> list[int] | None:
        value = data.get("seeds")
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in value)
        ):
            raise self.fail(where, f"'seeds' must be a non-empty list of integers in [0, 2**64), not {value!r}")
        return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _label(kind: str, index: int, data: object, key: str) -> str:
    """``sets[17] ("anime-3-12")``: the JSON location, with the entry's name where it has
    one (control characters escaped, cut at 60 characters: the name may be the fault)."""
    name = data.get(key) if isinstance(data, dict) else None
    if not isinstance(name, str):
        return f"{kind}[{index}]"
    shown = printable(name)
    return f'{kind}[{index}] ("{shown if len(shown) <= 60 else shown[:57] + "..."}")'


def check_set_id(set_id: str) -> str | None:
    """Why ``set_id`` cannot name an output folder, or ``None`` if it can (:data:`SET_ID`)."""
    if len(set_id) > MAX_SET_ID:
        return f"the id is {len(set_id)} characters long; at most {MAX_SET_ID} (it names the set's output folder)"
    if not SET_ID.fullmatch(set_id):
        return ("the id may hold only letters, digits and . _ + -, starting with a letter or digit (it names the "
                "set's output folder, so no /, .. or spaces)")  # fmt: skip
    return None


def _parse_lora(check: _Checker, data: object, where: str, root: Path) -> LoRAEntry:
    check.fields(data, where, ("name", "file", "category", "triggers"), ("weight",))
    name = check.string(data, "name", where, empty=False)
    if safe_name(name) != name:  # loaded under it, it would differ from the name the sets use
        raise check.fail(where, f"the name holds control, line or bidi characters; name it {safe_name(name)!r}")
    file = check.string(data, "file", where, empty=False)
    category = check.string(data, "category", where)
    if category not in CATEGORIES:
        raise check.fail(where, f"unknown category '{category}' (one of {', '.join(CATEGORIES)})")
    triggers = check.strings(data, "triggers", where)
    weight = 1.0 if data.get("weight") is None else data["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise check.fail(where, f"'weight' must be a finite number, not {weight!r}")
    path = root / Path(file).expanduser()
    if not path.is_file():
        raise check.fail(where, f"LoRA file not found: {path}")
    return LoRAEntry(name, file, category, list(triggers), float(weight))


def _parse_set(
    check: _Checker, data: object, where: str, loras: dict[str, LoRAEntry], one_per_category: bool
) -> CompositionSet:
    check.fields(data, where, ("id", "loras", "prompt"), ("negative_prompt", "seeds", "generic_prompt", "sides"))
    set_id = check.string(data, "id", where, empty=False)
    problem = check_set_id(set_id)
    if problem:
        raise check.fail(where, problem)
    names = check.strings(data, "loras", where)
    if not names:
        raise check.fail(where, "the list of LoRAs is empty")
    seen: dict[str, str] = {}
    for name in names:
        if name not in loras:
            raise check.fail(where, f"unknown LoRA '{name}'")
        if name in seen:
            raise check.fail(where, f"lists LoRA '{name}' twice")
        category = loras[name].category
        if one_per_category and category in seen.values():
            other = next(n for n, c in seen.items() if c == category)
            raise check.fail(
                where, f"two LoRAs of category '{category}' ('{other}', '{name}'), but one_per_category is true"
            )
        seen[name] = category
    return CompositionSet(
        id=set_id,
        loras=list(names),
        prompt=check.string(data, "prompt", where),
        negative_prompt=check.optional_string(data, "negative_prompt", where),
        seeds=check.seeds(data, where),
        generic_prompt=check.optional_string(data, "generic_prompt", where),
        sides=_sides(check, data, where, names),
    )


SIDES = ("left", "right")


def _sides(check: _Checker, data: dict, where: str, names: list[str]) -> dict[str, str] | None:
    value = data.get("sides")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise check.fail(where, f"'sides' must be an object of LoRA name to left or right, not {_json_type(value)}")
    for name, side in value.items():
        if name not in names:
            raise check.fail(where, f"'sides' names '{name}', which the set does not compose")
        if side not in SIDES:
            raise check.fail(where, f"'sides' puts '{name}' on {side!r}; a side is left or right")
    return dict(value)


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest (format: ``evaluation/README.md``).

    Raises :class:`ManifestError` for malformed JSON (with line and column), a missing
    or unknown field, a wrong type, an unknown category, a missing LoRA file, a
    duplicate LoRA name or set id, an unknown or repeated LoRA in a set, an empty set,
    and two LoRAs of one category in a set when ``one_per_category`` is true.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(path, "", f"cannot be read: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(path, f"line {error.lineno}, column {error.colno}", f"invalid JSON: {error.msg}") from error
    except RecursionError:
        raise ManifestError(path, "", "the JSON is nested too deeply to be a manifest") from None
    check = _Checker(path)
    check.fields(
        data,
        "top level",
        ("loras",),
        ("sets", "base_model", "prompt_prefix", "negative_prompt", "seeds", "one_per_category"),
    )
    one_per_category = False if data.get("one_per_category") is None else data["one_per_category"]
    if not isinstance(one_per_category, bool):
        raise check.fail("top level", f"'one_per_category' must be true or false, not {one_per_category!r}")
    for key in ("loras", "sets"):
        if not isinstance(data.get(key, []), list):
            raise check.fail("top level", f"'{key}' must be a list, not {_json_type(data[key])}")
    root = path.parent
    loras: dict[str, LoRAEntry] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(data["loras"]):
        where = _label("loras", i, item, "name")
        entry = _parse_lora(check, item, where, root)
        if entry.name in loras:
            raise check.fail(where, f"duplicate LoRA name (also loras[{first[entry.name]}])")
        loras[entry.name], first[entry.name] = entry, i
    sets: list[CompositionSet] = []
    first = {}
    for i, item in enumerate(data.get("sets", [])):
        where = _label("sets", i, item, "id")
        composition = _parse_set(check, item, where, loras, one_per_category)
        folded = composition.id.casefold()
        if folded in first:
            same = data["sets"][first[folded]]["id"] == composition.id
            raise check.fail(where, f"duplicate set id (also sets[{first[folded]}])" if same else
                             f"set id differs only in case from sets[{first[folded]}]; on a case-insensitive "
                             "file system both would write one folder")  # fmt: skip
        sets.append(composition)
        first[folded] = i
    return Manifest(
        root=root,
        loras=loras,
        sets=sets,
        base_model=check.optional_string(data, "base_model", "top level"),
        prompt_prefix=check.optional_string(data, "prompt_prefix", "top level", default=""),
        negative_prompt=check.optional_string(data, "negative_prompt", "top level", default=""),
        seeds=check.seeds(data, "top level"),
        one_per_category=one_per_category,
    )


def composlora_sets(
    library: Sequence[LoRAEntry], per_n: Mapping[int, int] = COMPOSLORA_COUNTS, seed: int = 0
) -> list[CompositionSet]:
    """Composition sets of the ComposLoRA shape over ``library``, ``per_n[N]`` of them for each N.

    A set is one character followed by N - 1 LoRAs of distinct other categories, in
    :data:`~compose.loading.CATEGORIES` order. All such sets are enumerated (category
    choices, then LoRAs, in library order); where ``per_n[N]`` is smaller than their
    number, that many are drawn with ``random.Random(seed)``, kept in enumeration order.
    A set's id is its LoRA names joined by ``+`` and its prompt its trigger words
    joined by ``", "`` (the manifest adds its ``prompt_prefix``). With ComposLoRA's 3
    characters and 4 other categories of 2 LoRAs, there are ``3 · C(4, N-1) · 2^(N-1)``
    sets: :data:`COMPOSLORA_COUNTS`.
    """
    by_category = {c: [e for e in library if e.category == c] for c in CATEGORIES}
    characters = by_category.pop("character")
    if not characters:
        raise ValueError("a ComposLoRA set starts with a character, and the library has no character LoRA")
    others = [c for c in CATEGORIES if by_category.get(c)]
    rng = random.Random(seed)
    sets: list[CompositionSet] = []
    for n, count in sorted(per_n.items()):
        if n < 1 or n - 1 > len(others):
            raise ValueError(f"N={n}: a set holds one character and up to {len(others)} LoRAs of other categories")
        every = [
            combo
            for kinds in itertools.combinations(others, n - 1)
            for combo in itertools.product(characters, *(by_category[k] for k in kinds))
        ]
        if count > len(every):
            raise ValueError(f"N={n}: {count} sets asked for, but the library allows {len(every)}")
        chosen = sorted(rng.sample(range(len(every)), count))
        for combo in (every[i] for i in chosen):
            sets.append(
                CompositionSet(
                    id="+".join(e.name for e in combo),
                    loras=[e.name for e in combo],
                    prompt=", ".join(word for e in combo for word in e.triggers),
                )
            )
    return sets


def two_character_manifest(folder: str | Path) -> Manifest:
    """The demo world's two-character benchmark: every ordered pair of its characters, one
    on the left and one on the right (``sides``), before a plain background and before
    each background concept (18 sets), as the regional methods are asked to draw them."""
    from compose.demo_world import BACKGROUNDS, CONCEPTS, concepts_of, two_character_scene

    manifest = demo_world_manifest(folder)
    characters = [c.name for c in concepts_of("character")]
    backgrounds = [BACKGROUNDS[0]] + [c.name for c in concepts_of("background")]
    sets = []
    for left in characters:
        for right in (c for c in characters if c != left):
            for background in backgrounds:
                scene = two_character_scene(left, right, background, 0)
                loras = [left, right] + ([background] if background in CONCEPTS else [])
                sets.append(CompositionSet("+".join([f"{left}-left", f"{right}-right", *loras[2:]]), loras,
                                           scene.caption(), sides={left: "left", right: "right"}))  # fmt: skip
    return Manifest(root=Path(folder), loras=manifest.loras, sets=sets, base_model="demo-world")


def demo_world_manifest(folder: str | Path) -> Manifest:
    """The demo world's benchmark: its eleven LoRAs (``folder/loras``) and all 240 sets of
    the ComposLoRA shape, 24/72/96/48 for N = 2..5. Set ``i``'s prompt is the caption of
    the scene :func:`~compose.demo_world.composition_scene` draws for it with seed ``i``
    (the set's triggers in the world's grammar, with plain context where no LoRA says:
    a position, a plain background), so every prompt is one the world can draw; its
    ``generic_prompt`` is the caption of that scene's generic stand-in
    (:meth:`~compose.demo_world.Scene.generic`, same seed)."""
    from compose.demo_world import CONCEPTS, composition_scene, composition_sets

    folder = Path(folder)
    loras = {
        name: LoRAEntry(name, f"loras/{name}.safetensors", concept.category, [concept.trigger])
        for name, concept in CONCEPTS.items()
    }
    names = [names for size in COMPOSLORA_COUNTS for names in composition_sets(size)]
    sets = []
    for i, chosen in enumerate(names):
        scene = composition_scene(chosen, i)
        sets.append(
            CompositionSet("+".join(chosen), list(chosen), scene.caption(), generic_prompt=scene.generic(i).caption())
        )
    return Manifest(root=folder, loras=loras, sets=sets, base_model="demo-world", one_per_category=True)
