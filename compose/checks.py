"""Checks at the boundary: what a request may ask for, and what its numbers may be.

Every number that reaches the engine from a user (the command line, the Python API, a
PNG's record, the studio) passes through here first, so that a NaN, an infinity, a
zero temperature or a seed too large for a generator is refused with a message that
names the value, instead of failing deep inside (or, worse, finishing with an image
whose record is invalid JSON). :class:`Limits` bounds what one request may cost
relative to the model it runs on (image size, steps, images per call, the tensors of a
LoRA file), because a 4096-pixel request on a 64-pixel model or a LoRA of 300,000
tensors would otherwise hold the model for many minutes; each bound is a setting that
users of real large models can raise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from numbers import Integral, Real

from .prompts import MAX_WEIGHT, LoRAUse, parse_schedule

CATEGORIES = ("character", "clothing", "style", "background", "object")
"""The LoRA categories the methods know (:mod:`compose.loading` checks a LoRA's against them)."""
SEED_LIMIT = 2**64
"""Seeds are integers in ``[0, 2**64)``: what ``torch.Generator.manual_seed`` accepts."""
MAX_GUIDANCE = 100.0
LONG_RUN = 20.0
"""A request costing this many native images or more gets a note before it runs."""
CHUNK_TOKENS = 75
"""Tokens per encoder window, as A1111 cuts a prompt (:data:`compose.emphasis.CHUNK_TOKENS`)."""
TOKEN_CHARACTERS = 32
"""The longest token of CLIP's vocabulary, in characters (32)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a model. ``None`` means "derived from the model":
    the side limit is ``side_factor`` times the model's native side, the step limit
    the scheduler's training timesteps (beyond them a sampler repeats timesteps and the
    latents blow up)."""

    side_factor: float = 8.0
    max_side: int | None = None
    max_steps: int | None = None
    max_images: int = 16
    max_lora_tensors: int = 20_000
    max_lora_mb: float = 2048.0
    max_prompt_chunks: int = 16
    """Most 75-token chunks in a prompt or negative prompt: each chunk lengthens every
    cross-attention of every step, so a megabyte of text (3,200 chunks) would hold the
    model for minutes; 16 chunks are 1,200 tokens, far beyond any artist's prompt."""

    def prompt_characters(self) -> int:
        """The most characters a prompt may have before it is tokenized at all: no CLIP
        token is longer than :data:`TOKEN_CHARACTERS` characters, so a longer text needs more
        chunks than :attr:`max_prompt_chunks` whatever it says (bar whitespace and markup)."""
        return self.max_prompt_chunks * CHUNK_TOKENS * TOKEN_CHARACTERS

    def side_limit(self, native: int) -> int:
        """The largest width or height, in pixels, for a model of native side ``native``."""
        return self.max_side if self.max_side is not None else int(native * self.side_factor)

    def steps_limit(self, train_steps: int) -> int:
        """The most denoising steps for a scheduler trained on ``train_steps`` timesteps."""
        return self.max_steps if self.max_steps is not None else train_steps


def number(name: str, value: object, low: float | None = None, high: float | None = None,
           inf_ok: bool = False) -> float:  # fmt: skip
    """``value`` as a float, refusing non-numbers, NaN, infinities (unless ``inf_ok``) and
    values outside ``[low, high]``; the message names ``name`` and the value given."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not inf_ok):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = (f"at least {low:g}" if high is None else f"at most {high:g}" if low is None
                 else f"between {low:g} and {high:g}")  # fmt: skip
        raise ValueError(f"{name} must be {bound}, got {value:g}")
    return value


def integer(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; floats and booleans are refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {value}")
    return value


def seed(value: object, name: str = "seed") -> int:
    """A seed in ``[0, 2**64)``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def weight(name: str, value: object) -> float:
    """A LoRA weight: finite, within ``±MAX_WEIGHT``."""
    return number(f"the weight of {name}", value, -MAX_WEIGHT, MAX_WEIGHT)


# -- method parameters ---------------------------------------------------------------

_AT_LEAST_ONE = ("tau", "interval", "c1", "c2", "patch", "levels")
_FRACTIONS = ("hold", "switch_at", "split_gap")


def method_parameters(method: str, cls: type, parameters: Mapping) -> None:
    """Refuse parameters a method does not have before it is built (a misspelt key would
    otherwise be a ``TypeError`` from its constructor)."""
    if not isinstance(parameters, Mapping):
        raise ValueError(f"method parameters must be a mapping of names to values, got {parameters!r}")
    known = [f.name for f in fields(cls)] if is_dataclass(cls) else []
    unknown = sorted(str(k) for k in parameters if k not in known)
    if unknown:
        raise ValueError(f"method {method!r} has no parameter {unknown[0]!r} (its parameters: "
                         f"{', '.join(known) or 'none'})")  # fmt: skip


def method_values(name: str, parameters: Mapping, latent_size: tuple[int, int]) -> None:
    """Each parameter's value: steps and counts at least 1, fractions in [0, 1], a
    temperature positive (infinity means equal weights), every other number finite;
    band levels no more than the latent can be halved."""
    for key, value in parameters.items():
        label = f"{name} {key}"
        if key in _AT_LEAST_ONE:
            integer(label, value, 1)
        elif key == "top_k":
            if value is not None:
                integer(label, value, 1)
        elif key == "temperature":
            if number(label, value, inf_ok=True) <= 0:
                raise ValueError(f"{label} must be above 0 (inf gives equal weights), got {value:g}")
        elif key in _FRACTIONS:
            number(label, value, 0.0, 1.0)
        elif key == "sharpness":
            number(label, value, 0.0)
        elif isinstance(value, Real) and not isinstance(value, bool):
            number(label, value)
    levels = parameters.get("levels") if name == "bands" else None
    if isinstance(levels, int) and 2**levels > min(latent_size):
        most = int(math.log2(min(latent_size))) if min(latent_size) >= 2 else 0
        raise ValueError(f"bands levels {levels} would halve a {latent_size[1]}x{latent_size[0]} latent below one "
                         f"pixel: at most {most} for this image size")  # fmt: skip


# -- cost ----------------------------------------------------------------------------


def relative_cost(width: int, height: int, native: int, steps: int, images: int = 1) -> float:
    """What a request costs in native images of 25 steps: its area over the native area,
    times steps / 25, times images. A UNet step costs about its pixel count, so this says
    how much longer a request runs than the model's ordinary image."""
    return width * height / native**2 * steps / 25 * images


def cost_note(width: int, height: int, native: int, steps: int, images: int = 1) -> str | None:
    """A one-line warning for a request of :data:`LONG_RUN` native images or more, else ``None``."""
    cost = relative_cost(width, height, native, steps, images)
    if cost < LONG_RUN:
        return None
    return (f"this request costs about {cost:.0f} times an ordinary image of this model ({images} x {width}x{height}, "
            f"{steps} steps, against {native}x{native} at 25 steps); it will take a while")  # fmt: skip


# -- text from users and files -------------------------------------------------------

_INVISIBLE = "\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff"
"""Format characters that reorder or hide text: bidi overrides, embeddings and isolates,
zero-width spaces and joiners, the soft hyphen, the byte-order mark."""
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_INVISIBLE}]")


def printable(text: object) -> str:
    """``text`` with control characters (terminal escape sequences, NUL, newlines) and
    bidi or invisible format characters written as ``\\xNN`` / ``\\u202e`` escapes: a LoRA's
    metadata or a PNG's record then cannot move the cursor, recolour the terminal, forge
    extra lines or show its text reversed (bidi spoofing) in what ``compose`` prints."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def safe_name(name: str) -> str:
    """A LoRA's name with every control, line, bidi or invisible character written as
    ``[U+XXXX]``. A name comes from a file name, which may hold anything but ``/``; it is
    then written into ``<lora:NAME:w>`` tags and ``Lora hashes`` of the PNG's ``parameters``
    text (where a newline starts a forged ``Negative prompt:`` line), shown in the studio
    and printed (where U+202E shows text reversed). Made safe once, where a LoRA gets its
    name, it is safe everywhere; the escape uses no backslash, ``:`` or ``>``, so the tag
    still reads back to the same name."""
    return _CONTROL.sub(lambda m: f"[U+{ord(m.group()):04X}]", name)


def prompt_length(limits: Limits, what: str, text: str) -> None:
    """Refuse a prompt too long to be tokenized at all (:meth:`Limits.prompt_characters`):
    checked in microseconds, before any tokenizer or model sees it."""
    most = limits.prompt_characters()
    if len(text) > most:
        raise ValueError(f"{what} is {len(text):,} characters long, over the limit of {most:,} ("
                         f"{limits.max_prompt_chunks} chunks of {CHUNK_TOKENS} tokens); shorten it, or raise the "
                         "limit with --max-prompt-chunks (Limits(max_prompt_chunks=...))")  # fmt: skip


def prompt_chunks(limits: Limits, what: str, count: int) -> None:
    """Refuse a prompt that encodes to more chunks than ``limits`` allow."""
    most = limits.max_prompt_chunks
    if count > most:
        raise ValueError(f"{what} needs {count} chunks of {CHUNK_TOKENS} tokens, over the limit of {most} "
                         f"({most * CHUNK_TOKENS:,} tokens); shorten it, or raise the limit with "
                         "--max-prompt-chunks (Limits(max_prompt_chunks=...))")  # fmt: skip


# -- a generation request ------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the limits of a request are relative to: the model's native side in pixels,
    its VAE factor, and its scheduler's training timesteps."""

    native: int
    scale_factor: int
    train_steps: int


def request(limits: Limits, model: ModelShape, *, width: object, height: object, steps: object, images: int,
            guidance_scale: object, lora_scale: object, max_batch: object) -> tuple[int, int]:  # fmt: skip
    """Check a generation request against ``limits`` before anything is allocated; returns
    ``(width, height)`` with the native size filled in. Messages name the setting, the
    value given and the limit, and say how to raise a limit (``Limits``, ``--max-*``)."""
    width, height = size_and_steps(limits, model, width=width, height=height, steps=steps)
    if images > limits.max_images:
        raise ValueError(f"{images} images in one call is over the limit of {limits.max_images} (generate them in "
                         "several calls, or raise Limits(max_images=...))")  # fmt: skip
    number("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE)
    number("lora_scale", lora_scale, -MAX_WEIGHT, MAX_WEIGHT)
    if max_batch is not None:
        integer("max_batch", max_batch, 1)
    return width, height


def size_and_steps(limits: Limits, model: ModelShape, *, width: object, height: object,
                   steps: object) -> tuple[int, int]:  # fmt: skip
    """The size and step checks of :func:`request` alone (so that a cost note is only
    shown for a request that will run); returns ``(width, height)``, native where ``None``."""
    width = model.native if width is None else integer("width", width)
    height = model.native if height is None else integer("height", height)
    factor = model.scale_factor
    if width % factor or height % factor or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of {factor} (this model's VAE scale factor: "
                         f"8 for Stable Diffusion, 4 for the demo world), got {width}x{height}")  # fmt: skip
    side = limits.side_limit(model.native)
    why = "--max-side" if limits.max_side is not None else f"{limits.side_factor:g} x its native {model.native} px"
    for name, value in (("width", width), ("height", height)):
        if value > side:
            raise ValueError(f"{name} {value} is over this model's limit of {side} px ({why}); a model made for "
                             "larger images allows more: raise it with --max-side (Limits(max_side=...))")  # fmt: skip
    steps = integer("steps", steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    most = limits.steps_limit(model.train_steps)
    if steps > most:
        raise ValueError(f"steps {steps} is over the limit of {most} (the scheduler was trained on "
                         f"{model.train_steps} timesteps; --max-steps, Limits(max_steps=...), raises it)")  # fmt: skip
    return width, height


def lora_weight(name: str, value: object) -> float | str:
    """A LoRA's weight: a finite number within ``±MAX_WEIGHT``, or a schedule string whose
    points are (:func:`compose.prompts.parse_schedule`)."""
    if isinstance(value, str):
        parse_schedule(value)
        return value
    return weight(repr(name), value)


def block_weights(name: str, spec: object, sdxl: bool) -> str | None:
    """A LoRA's block weights: ``None``, or a preset or vector whose values are finite."""
    if spec is None:
        return None
    from .block_weights import parse_block_weights

    if not isinstance(spec, str):
        raise ValueError(f"block weights of {name!r} must be a preset name or comma-separated numbers, got {spec!r}")
    for block, value in parse_block_weights(spec, sdxl).items():
        number(f"block weight {block} of {name!r}", value, -MAX_WEIGHT, MAX_WEIGHT)
    return spec


def lora_use(spec: object, sdxl: bool) -> LoRAUse:
    """One entry of ``generate(loras=...)``: a name, ``(name, weight)`` or ``(name, weight,
    blocks)``, checked; returns a :class:`compose.prompts.LoRAUse`."""
    parts = (spec,) if isinstance(spec, str) else tuple(spec) if isinstance(spec, (tuple, list)) else None
    if parts is None or not 1 <= len(parts) <= 3 or not isinstance(parts[0], str):
        raise ValueError(f"a LoRA is a name, (name, weight) or (name, weight, blocks), got {spec!r}")
    name = parts[0]
    value = lora_weight(name, parts[1] if len(parts) > 1 else 1.0)
    blocks = block_weights(name, parts[2] if len(parts) > 2 else None, sdxl)
    return LoRAUse(name, value if isinstance(value, str) else float(value), blocks)
