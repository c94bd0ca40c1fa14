"""Settings from the ``parameters`` text AUTOMATIC1111 writes (its PNG Info), in compose's terms.

Artists share images made in A1111 (Civitai shows the same text): reading it lets them start
here from the prompt, steps, guidance, seed, size and sampler that made an image. The format
is the one :func:`compose.metadata.a1111_parameters` writes and A1111's
``infotext_utils.parse_generation_parameters`` reads: the prompt (any number of lines), then
``Negative prompt: ...`` (any number of lines), then one last line of ``Key: value`` pairs
separated by ``, ``, a value that holds ``,``, ``:`` or a newline JSON-quoted.

The text is untrusted (anyone can write a PNG text chunk, or paste one): every number is
checked here and refused with the field and the value at fault, before a model is asked
for anything.
"""

from __future__ import annotations

import ast
import json
import re

from . import checks
from .calls import SamplingConfig
from .metadata import MAX_RECORD_SIDE, MAX_RECORD_STEPS
from .prompts import extract_lora_tags
from .schedulers import SCHEDULERS

PAIR = re.compile(r'\s*(\w[\w /-]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
"""One ``Key: value`` of the settings line, as A1111 reads it: a key of word characters,
spaces, ``-`` and ``/``; a value JSON-quoted, or running to the next comma."""
MIN_PAIRS = 3
"""The last line is the settings line when it holds at least this many pairs, as A1111 decides;
with fewer it is part of the prompt (a prompt line may well hold a ``style: anime``)."""
NEGATIVE = "Negative prompt:"
SIZE = re.compile(r"([^x]+)x([^x]+)")
SIDE_MULTIPLE = 8
"""Width and height are multiples of 8 pixels: the latent is the image divided by the VAE's 8."""
MAX_DIGITS = 20
"""The digits of the largest seed, 2**64 - 1; a longer number is out of every range here."""

SCHEDULER_OF_SAMPLER = {sampler: name for name, (_, _, sampler) in SCHEDULERS.items()}
"""A1111 sampler name -> our scheduler, from :data:`compose.schedulers.SCHEDULERS`; the Karras
variants are named as A1111 named them before 1.9 (``DPM++ 2M Karras``)."""
SPACINGS = ("Automatic", "Uniform", "SGM Uniform", "DDIM")
"""The schedule types that choose only how the timesteps are spaced. compose takes the spacing
from the model's own scheduler config (:func:`compose.metadata.schedule_type` names it), so
with these a sampler reads as the sampler alone; Karras is a scheduler of its own."""
PARAMETER_START = re.compile(r"[A-Za-z_]\w*=")


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of an A1111 ``parameters`` text, as strings (quoted values unquoted, ``Size``
    kept as ``WxH``), plus ``prompt`` and ``negative_prompt`` (``""`` where the text has none;
    their lines joined by newlines, each line stripped as A1111 strips it).

    A text whose last line holds fewer than three ``Key: value`` pairs has no settings line
    (A1111's rule): all of it is prompt and negative prompt. A key given twice keeps its last value.
    """
    *lines, last = text.strip().split("\n")
    pairs = PAIR.findall(last.strip())
    if len(pairs) < MIN_PAIRS:
        lines, pairs = [*lines, last], []
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in (line.strip() for line in lines):
        if negative is None and line.startswith(NEGATIVE):
            negative = [line.removeprefix(NEGATIVE).strip()]
        elif negative is None:
            prompt.append(line)
        else:
            negative.append(line)
    fields = {key: _unquote(value.strip()) for key, value in pairs}
    return {**fields, "prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative or [])}


def settings_from_parameters(text: str) -> dict:
    """The :meth:`compose.Composer.generate` keyword arguments an A1111 ``parameters`` text
    asks for, plus ``loras``: the names of the prompt's ``<lora:...>`` tags, in tag order, so
    that a caller can check they are loaded. ``loras`` must be taken out before the call
    (``names = settings.pop("loras")``): the tags stay in ``prompt``, where the composer reads
    them, and ``generate(loras=names)`` would name each LoRA a second time.

    Only what the text says is returned: ``prompt`` always; ``negative_prompt`` where the text
    has one or has a settings line (A1111 leaves out an empty negative prompt); ``seed`` from
    ``Seed``; ``sampling`` where the text gives any of ``Steps`` (``steps``), ``CFG scale``
    (``guidance_scale``), ``Size: WxH`` (``width`` and ``height``, pixels) and ``Sampler`` with
    ``Schedule type`` (``scheduler``), the fields it does not give at their defaults;
    and ``method`` and ``method_params`` from compose's own ``Composition method`` and
    ``Composition parameters``. ``lora_scale`` is 1 where the prompt has tags: their weights
    are the ones A1111 applied (compose writes them already multiplied by its LoRA scale), so
    the composer's default scale of 0.8 must not shrink them again. Other fields are ignored.

    Raises ``ValueError`` naming the field and the value: a number that is not one or is out
    of range (steps 1 to 10000, a finite CFG scale 0 to 100, seed 0 to 2**64 - 1, width and
    height positive multiples of 8 up to 16384), a sampler or method compose does not have, a
    malformed ``<lora:...>`` tag.
    """
    fields = parse_parameters(text)
    prompt, negative = fields.pop("prompt"), fields.pop("negative_prompt")
    names = [use.name for use in extract_lora_tags(prompt)[1]]
    settings: dict = {"prompt": prompt}
    if negative or fields:
        settings["negative_prompt"] = negative
    sampling: dict = {}
    if "Steps" in fields:
        sampling["steps"] = checks.integer("Steps", _whole("Steps", fields["Steps"]), 1, MAX_RECORD_STEPS)
    if "CFG scale" in fields:
        sampling["guidance_scale"] = checks.number("CFG scale", _decimal("CFG scale", fields["CFG scale"]), 0.0,
                                                   checks.MAX_GUIDANCE)  # fmt: skip
    if "Seed" in fields:
        settings["seed"] = checks.seed(_whole("Seed", fields["Seed"]), "Seed")
    if "Size" in fields:
        sampling["width"], sampling["height"] = _size(fields["Size"])
    if "Sampler" in fields:
        sampling["scheduler"] = _scheduler(fields["Sampler"], fields.get("Schedule type"))
    if sampling:
        settings["sampling"] = SamplingConfig(**sampling)
    if "Composition method" in fields:
        settings["method"] = _method(fields["Composition method"])
        settings["method_params"] = _method_params(fields.get("Composition parameters", ""))
    if names:
        settings["lora_scale"] = 1.0
    settings["loras"] = names
    return settings


def _unquote(value: str) -> str:
    """A value A1111 JSON-quoted, unquoted; one that only looks quoted is kept as written."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _shown(value: str) -> str:
    """``value`` quoted for a message, cut short: a forged text may hold a megabyte in one field."""
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _whole(field: str, value: str) -> int:
    """``value`` as an int: ASCII digits with an optional minus sign, nothing else."""
    digits = value.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{field} must be a whole number, got {_shown(value)}")
    if len(digits.lstrip("0")) > MAX_DIGITS:
        raise ValueError(f"{field} {_shown(value)} is far out of range ({len(digits)} digits)")
    return int(value)


def _decimal(field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{field} must be a number, got {_shown(value)}") from None


def _size(value: str) -> tuple[int, int]:
    """``Size: WxH`` as ``(width, height)`` in pixels."""
    match = SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"Size must be WIDTHxHEIGHT in pixels, such as 512x768, got {_shown(value)}")
    width, height = (_whole("Size", side) for side in match.groups())
    for what, side in (("width", width), ("height", height)):
        if side <= 0 or side % SIDE_MULTIPLE or side > MAX_RECORD_SIDE:
            raise ValueError(f"Size {value}: the {what} must be a positive multiple of {SIDE_MULTIPLE} pixels, "
                             f"at most {MAX_RECORD_SIDE}, got {side}")  # fmt: skip
    return width, height


def _scheduler(sampler: str, schedule: str | None) -> str:
    """Our scheduler for A1111's ``Sampler`` and ``Schedule type`` (absent before A1111 1.9,
    whose sampler names ended in " Karras" instead; that suffix wins, as in A1111)."""
    base = sampler.removesuffix(" Karras")
    karras = base != sampler or schedule == "Karras"
    name = SCHEDULER_OF_SAMPLER.get(f"{base} Karras" if karras else base)
    if name is None or not (karras or schedule is None or schedule in SPACINGS):
        asked = repr(sampler) if schedule is None else f"{sampler!r} with schedule type {schedule!r}"
        ours = ", ".join(f"{a1111} ({ours})" for a1111, ours in SCHEDULER_OF_SAMPLER.items())
        raise ValueError(f"Sampler {asked} is not one compose has; it has {ours}. A Karras sampler may also be "
                         f"written as the sampler with Schedule type: Karras; the schedule types "
                         f"{', '.join(SPACINGS)} go with any sampler")  # fmt: skip
    return name


def _method(name: str) -> str:
    from .methods import METHODS

    if name not in METHODS:
        raise ValueError(f"Composition method {_shown(name)} is not one compose has (it has {', '.join(METHODS)})")
    return name


def _method_params(text: str) -> dict[str, object]:
    """``Composition parameters`` back into a dict. :func:`compose.metadata.a1111_parameters`
    writes ``name=value, ...`` with each value as Python prints it: a value Python reads as a
    literal (a number, ``None``, a boolean, a dict of regions or prompts) is that literal, any
    other (``nonuniform``, ``s*``) the string itself. Whether the method takes these names and
    values is checked by :meth:`compose.Composer.generate`, as for any caller."""
    parameters: dict[str, object] = {}
    for item in _items(text) if text else []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"Composition parameters: {_shown(item)} is not name=value")
        parameters[key] = _literal(value)
    return parameters


def _items(text: str) -> list[str]:
    """``text`` split at each ``, name=`` outside brackets and quotes (a dict value holds commas)."""
    items, start, depth, quote, escaped = [], 0, 0, "", False
    for i, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(", ", i) and PARAMETER_START.match(text, i + 2):
            items.append(text[start:i])
            start = i + 2
    return [*items, text[start:]]


def _literal(value: str) -> object:
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value
