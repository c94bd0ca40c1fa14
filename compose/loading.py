"""Reading LoRA files of every common format into one normalised record.

Formats: kohya/Civitai (``lora_unet_...``, ``lora_te_...`` with ``alpha``),
diffusers/PEFT (``unet.`` / ``text_encoder.`` prefixes, ``lora_A``/``lora_B`` or the
older ``lora.down``/``lora_linear_layer`` names, DoRA's ``lora_magnitude_vector``), the
2023 attention-processor format (``...processor.to_k_lora.down.weight`` with no prefix),
and LyCORIS files with kohya names (LoCon, LoHa, LoKr, full diff, DoRA ``dora_scale``;
their factors are made exact :class:`~compose.layers.Factors` by :mod:`compose.lycoris`).
Key conversion is diffusers' own (``lora_state_dict``, ``convert_unet_state_dict_to_peft``,
``convert_state_dict_to_peft``), for LyCORIS modules too; what is written here is alpha
folding, validation, base-family detection and the record.

Every refusal is a :class:`LoRAError` whose message names the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from . import lycoris
from .checks import CATEGORIES, Limits, number, printable, safe_name
from .files import atomic_open
from .layers import Factors
from .lycoris import Layout, LayoutError, Magnitude
from .prompts import MAX_WEIGHT

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
CROSS_ATTENTION_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_UNFORESEEN = (ValueError, KeyError, IndexError, TypeError, RuntimeError, ZeroDivisionError, AttributeError)
"""What a malformed file can make diffusers' converters or the folding raise; :func:`load_lora`
turns each into a :class:`LoRAError` naming the file, so no message lacks it."""


class LoRAError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class LoRA:
    """A LoRA adapter, normalised: factors per component and module, alpha folded in.

    ``factors[component][module]`` holds the down/up factors for ``component`` in
    :data:`COMPONENTS` and a module path of that diffusers/transformers model.
    """

    name: str
    path: str
    sha256: str
    short_hash: str
    format: str
    family: str
    factors: dict[str, dict[str, Factors]]
    category: str | None = None
    triggers: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    unused_keys: list[str] = field(default_factory=list)
    alphas: dict[str, tuple[float | None, int | None]] = field(default_factory=dict)
    """The file's ``(alpha, rank)`` per module, named as the file names it (alpha ``None``:
    none stored, scale 1; rank ``None``: full matrices with no rank, a LyCORIS full diff or
    a LoKr of two full halves, scale 1); the factors have ``alpha / rank`` folded in, so
    only this says what the file stored."""
    preferred_weight: float | None = None
    """A1111's "preferred weight" from the sidecar: shown, never applied (weights stay explicit)."""
    notes: dict[str, str] = field(default_factory=dict)
    """What A1111's and Civitai's sidecars say about the LoRA (description, base model ...), for display."""
    derived: dict = field(default_factory=dict, repr=False)
    """Quantities methods derive from the factors once (K-LoRA's top-K sums ...), by key."""
    algorithms: dict[str, int] = field(default_factory=dict)
    """How many modules of each algorithm the file holds (LoRA, LoCon, LoHa, LoKr, diff), and
    ``DoRA``: how many of them carry a DoRA magnitude. Empty for a record built by hand (LoRA)."""
    layouts: dict[str, Layout] = field(default_factory=dict, repr=False)
    """LyCORIS modules by ``component.module``: algorithm, the file's name and tensor shapes."""
    magnitudes: dict[str, dict[str, Magnitude]] = field(default_factory=dict, repr=False)
    """DoRA magnitudes per component and module, as ``factors`` names them. Such a module's
    factors hold its update ``ΔW`` until :meth:`Composer.add_lora` replaces them with the
    effective delta on that model's base weights (:meth:`effective`) and empties this."""

    @property
    def rank(self) -> int:
        """The largest rank over the targeted modules, as the file declares it (a LoHa's
        ``dim``, not the ``dim²`` of its exact factors); the factors' rank for a file of
        full matrices only."""
        declared = [r for _, r in self.alphas.values() if r is not None]
        return max(declared or [f.rank for table in self.factors.values() for f in table.values()])

    @property
    def algorithm(self) -> str:
        """What kind of adapter the file is: ``LoRA``, ``LoCon`` (a LoRA that also adapts
        convolution kernels), ``LoHa``, ``LoKr``, ``diff``, several joined with ``+``, and
        ``+ DoRA`` where modules carry DoRA magnitudes."""
        kinds = [k for k in ("LoRA", "LoCon", "LoHa", "LoKr", "diff") if self.algorithms.get(k)] or ["LoRA"]
        if "LoCon" in kinds and "LoRA" in kinds:
            kinds.remove("LoRA")
        return " + ".join(kinds + (["DoRA"] if self.algorithms.get("DoRA") else []))

    def magnitude(self, component: str, module: str) -> Magnitude | None:
        """The DoRA magnitude of ``component.module`` (a text encoder's module with or
        without transformers' ``text_model.`` prefix), or ``None``."""
        table = self.magnitudes.get(component, {})
        return table.get(module, table.get(f"text_model.{module}"))

    def effective(self, component: str, module: str, base: nn.Module, factors: Factors) -> Factors:
        """The factors the composable layer over ``base`` uses: ``factors`` themselves, or for
        a DoRA module its effective delta on ``base``'s weights (:func:`compose.lycoris.dora_factors`),
        dense, computed in float32. Factors whose update is not ``base``'s shape are given back
        as they are (the composer refuses them); a magnitude that does not fit ``base`` is
        refused, naming the file and the module."""
        magnitude = self.magnitude(component, module)
        weight = base.weight
        if magnitude is None or (factors.up.shape[0], factors.down[0].numel()) != (weight.shape[0], weight[0].numel()):
            return factors
        reason = lycoris.check_magnitude(magnitude, tuple(weight.shape))
        if reason is not None:
            raise LoRAError(self.path, f"{component}.{module}: {reason}")
        return lycoris.dora_factors(weight, factors, magnitude)

    def misfit(self, component: str, module: str, base: nn.Module, family: str) -> str:
        """Why the factors of ``component.module`` do not fit ``base`` of a model of ``family``."""
        weight = f"{type(base).__name__} with weight {tuple(base.weight.shape)}"
        layout = self.layouts.get(f"{component}.{module}", self.layouts.get(f"{component}.text_model.{module}"))
        if layout is not None:
            return (f"does not fit this base model: its {layout.describe()} does not fit {component}.{module}, "
                    f"a {weight}; the file is damaged or was made for another model (the LoRA was made for "
                    f"{self.family}; the base model is {family})")  # fmt: skip
        f = self.factors[component].get(module) or self.factors[component][f"text_model.{module}"]
        return (f"does not fit this base model: the LoRA was made for {self.family}; the base model is {family} "
                f"(its {component}.{module} is {weight}, the LoRA's factors are {tuple(f.down.shape)} and "
                f"{tuple(f.up.shape)})")  # fmt: skip

    @property
    def targets(self) -> list[str]:
        """Targeted modules as ``component:module``."""
        return [f"{c}:{m}" for c, table in self.factors.items() for m in table]

    def summary(self) -> dict:
        """What ``compose inspect`` shows: everything but the tensors."""
        kinds = Counter(
            re.sub(r"^.*?\.?([a-z_0-9]+(\.\d+)?)$", r"\1", m) for table in self.factors.values() for m in table
        )
        return {
            "name": self.name,
            "file": self.path,
            "format": self.format,
            "algorithm": self.algorithm,
            "algorithms": dict(self.algorithms),
            "base_family": self.family,
            **self.scale_summary(),
            **self.factor_summary(),
            "category": self.category,
            "triggers": self.triggers,
            "preferred_weight": self.preferred_weight,
            "sha256": self.sha256,
            "a1111_hash": self.short_hash,
            "civitai_autov2": self.sha256[:10].upper(),
            "modules": {c: len(t) for c, t in self.factors.items()},
            "module_kinds": dict(sorted(kinds.items())),
            "unused_keys": self.unused_keys,
            "notes": self.notes,
            "metadata": {k: v if len(v) < 200 else v[:200] + "..." for k, v in self.metadata.items()},
        }

    def scale_summary(self) -> dict:
        """``rank``, ``alpha`` and ``scale`` (alpha / rank, the factor folded into the
        weights at load) as the file stores them: one number, or ``[min, max]`` where they
        vary by layer; ``alpha`` is ``None`` where the file stores none (scale 1), ``rank``
        where every module is a full matrix (a full diff, a LoKr of two full halves)."""
        pairs = list(self.alphas.values()) or [(None, f.rank) for t in self.factors.values() for f in t.values()]
        alphas = [a for a, _ in pairs if a is not None]
        ranks = [r for _, r in pairs if r is not None]
        scales = [a / r if a is not None and r is not None else 1.0 for a, r in pairs]
        return {"rank": _span(ranks) if ranks else None, "alpha": _span(alphas) if alphas else None,
                "scale": _span(scales)}  # fmt: skip

    def factor_summary(self) -> dict:
        """LoKr's ``factor``: the ``lokr_w1`` shapes (its Kronecker split), ``"AxB"`` each;
        empty for a file without LoKr modules."""
        shapes = sorted({layout.factor for layout in self.layouts.values() if layout.factor is not None})
        return {"factor": [f"{a}x{b}" for a, b in shapes]} if shapes else {}


def _span(values: list[float]) -> float | list[float]:
    """One value where all agree, else ``[min, max]``."""
    low, high = min(values), max(values)
    return low if low == high else [low, high]


PREVIEW_SUFFIX = ".preview.png"


def preview_path(lora_file: str | Path) -> Path:
    """Where a LoRA file's picture lies, by the convention of A1111's and ComfyUI's LoRA
    browsers: ``name.preview.png`` beside ``name.safetensors``."""
    path = Path(lora_file)
    return path.with_name(path.stem + PREVIEW_SUFFIX)


def file_hashes(path: Path) -> tuple[str, str]:
    """``(sha256 of the file, A1111 short hash)``.

    A1111's ``Lora hashes`` (``NetworkOnDisk.shorthash``) are 12 hex digits of its
    "addnet" hash: for a safetensors LoRA, sha256 of the tensor data only, skipping the
    8-byte header length and the JSON header (kohya's ``sshs_model_hash``, Civitai's
    AutoV3), so editing metadata keeps it; for other files, of the whole file. (Civitai's
    AutoV2 is the whole file's sha256, 10 digits, upper case; :meth:`LoRA.summary`.)
    """
    full, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(8)
        full.update(head)
        skip = int.from_bytes(head, "little") if path.suffix == ".safetensors" else None
        if skip is not None and len(head) == 8:
            header = handle.read(skip)
            full.update(header)
        else:
            data.update(head)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            full.update(chunk)
            data.update(chunk)
    return full.hexdigest(), data.hexdigest()[:12]


def _check_size(path: Path, limits: Limits) -> None:
    """Refuse what is not a regular file, is empty, or is larger than ``limits`` allow
    (a sparse file of many GB costs no disk, but loading it costs that much memory)."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise LoRAError(path, "is not a regular file (a device, FIFO or socket); give a LoRA file")
    if info.st_size == 0:
        raise LoRAError(path, "the file is empty (0 bytes)")
    if info.st_size > limits.max_lora_mb * 2**20:
        size = info.st_size / 2**20
        raise LoRAError(path, f"{size:.0f} MB is over the {limits.max_lora_mb:g} MB limit for a LoRA file; raise "
                        "it with --max-lora-mb (Limits(max_lora_mb=...)) if the file is genuine")  # fmt: skip


def _check_count(path: Path, count: int, limits: Limits) -> None:
    if count > limits.max_lora_tensors:
        raise LoRAError(path, f"holds {count} tensors, over the limit of {limits.max_lora_tensors} (an SDXL LoRA "
                        "has a few thousand); raise it with --max-lora-tensors (Limits(max_lora_tensors=...)) "
                        "if the file is genuine")  # fmt: skip


def read_tensors(
    path: Path, allow_pickle: bool = False, limits: Limits | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of a LoRA file, refusing what is unsafe or broken.

    Pickle files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can run code when unpickled;
    they load only with ``allow_pickle=True``, and then with ``weights_only=True``.
    ``limits`` bound the file's size and tensor count; both are checked from the file's
    size and header before any tensor is read.
    """
    limits = limits or Limits()
    if not path.exists():
        raise LoRAError(path, "no such file")
    if path.is_dir():
        raise LoRAError(path, "is a folder; give the .safetensors file inside it")
    _check_size(path, limits)
    try:
        return _read_checked(path, allow_pickle, limits)
    except MemoryError:
        raise LoRAError(path, "does not fit in memory") from None


def _read_checked(path: Path, allow_pickle: bool, limits: Limits) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoRAError(
                path,
                "is a pickle file, which can run code when loaded; convert it to .safetensors, "
                "or opt in with allow_pickle=True (--allow-pickle) to load it with "
                "torch.load(weights_only=True)",
            )
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise LoRAError(path, f"cannot be read as a weights-only pickle: {error}") from error
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise LoRAError(path, "does not hold a flat dictionary of tensors")
        _check_count(path, len(loaded), limits)
        return loaded, {}
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            _check_count(path, len(handle.keys()), limits)
        tensors = load_file(path)
    except LoRAError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        if _looks_pickled(path):
            raise LoRAError(path, "is a pickle file (PyTorch's torch.save format) named .safetensors, not a "
                            "safetensors file; compose never unpickles a file that claims to be safetensors (a "
                            "pickle can run code when loaded): convert it to safetensors") from None  # fmt: skip
        raise LoRAError(path, f"is not a valid safetensors file (truncated or corrupt: {error})") from error
    return tensors, metadata


def _looks_pickled(path: Path) -> bool:
    """Whether a file that safetensors refused starts as a pickle does: PyTorch's zip
    archive (``PK``), or a raw pickle's PROTO opcode (``0x80`` and protocol 2 to 5). Read
    as safetensors, either is a "header too large", which tells the user nothing."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _factor_shape(path: Path, key: str, tensor: torch.Tensor) -> int:
    """The rank of a down factor, refusing shapes no LoRA has (0-D, 1-D, rank 0)."""
    if tensor.dim() not in (2, 4):
        raise LoRAError(path, f"tensor {key} has shape {tuple(tensor.shape)}; LoRA factors are 2-D (linear) "
                        "or 4-D (convolution)")  # fmt: skip
    if tensor.shape[0] == 0:
        raise LoRAError(path, f"tensor {key} has rank 0 (shape {tuple(tensor.shape)}); a LoRA factor needs rank 1 "
                        "or more")  # fmt: skip
    return tensor.shape[0]


def _scalar_alpha(path: Path, key: str, value: torch.Tensor) -> float:
    if value.numel() != 1:
        raise LoRAError(path, f"tensor {key} has shape {tuple(value.shape)}; an alpha is one number")
    return float(value)


def _fold_kohya_alphas(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, list[str], dict]:
    """Scale every kohya ``lora_down`` by ``alpha / rank`` and drop the alphas, returning
    each module's ``(alpha, rank)`` (by its kohya name) for what the file stored.

    ``B (alpha/r) A`` equals the adapter's effective update, so the converted state
    dict needs no alphas (alpha = rank convention) and none can be lost in renaming.
    """
    folded, unused, alphas = {}, [], {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            up_key = module + ".lora_up.weight"
            if up_key not in tensors:
                raise LoRAError(path, f"{key} has no matching {up_key}")
            rank = _factor_shape(path, key, tensor)
            alpha = tensors.get(module + ".alpha")
            alpha = _scalar_alpha(path, module + ".alpha", alpha) if alpha is not None else None
            folded[key] = tensor.float() * (alpha / rank if alpha is not None else 1.0)
            folded[up_key] = tensors[up_key].float()
            alphas[module] = (alpha, rank)
        elif not key.endswith((".lora_up.weight", ".alpha")):
            unused.append(key)
    return folded, unused, alphas


def _split_components(path: Path, tensors: dict, unet_config: dict | None) -> tuple[dict, str, list, dict]:
    """Group the keys by model component, in PEFT naming (``module.lora_A.weight``); a
    kohya file's alphas are folded here, and returned as :func:`_fold_kohya_alphas` gives them."""
    keys = list(tensors)
    unused: list[str] = []
    alphas: dict[str, tuple[float | None, int]] = {}
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        fmt = "kohya"
        tensors, unused, alphas = _fold_kohya_alphas(path, tensors)
        from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin  # only kohya needs it (slow import)

        try:
            tensors, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(tensors, unet_config=unet_config)
        except ValueError as error:
            raise LoRAError(path, f"kohya keys could not be converted: {error}") from error
    elif any(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys):
        fmt = "diffusers"
    else:
        fmt = "attn-processor" if any(".processor." in k for k in keys) else "peft"
        tensors = {f"unet.{k}": v for k, v in tensors.items()}
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component in COMPONENTS:
            parts.setdefault(component, {})[rest] = value
        else:
            unused.append(key)
    for component, part in parts.items():
        if component == "unet":
            parts[component] = convert_unet_state_dict_to_peft(part)
        elif not any(".lora_A." in k for k in part):
            try:
                parts[component] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            except ValueError:
                unused.extend(f"{component}.{k}" for k in part)
                parts[component] = {}
    return parts, fmt, unused, alphas


def _json_metadata(path: Path, metadata: dict[str, str], key: str) -> dict | None:
    """A metadata entry that holds a JSON object, or ``None`` where absent; anything
    else is refused, naming the entry (it decides the file's weights or triggers)."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise LoRAError(path, f"metadata {key} is not valid JSON") from None
    if not isinstance(value, dict):
        raise LoRAError(path, f"metadata {key} must be a JSON object, got {type(value).__name__}")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _adapter_alphas(path: Path, metadata: dict[str, str], component: str) -> tuple[float | None, dict]:
    """``lora_alpha`` and ``alpha_pattern`` that diffusers' ``save_lora_weights`` stores,
    checked: the alpha a number, the pattern an object of module patterns to numbers."""
    packed = _json_metadata(path, metadata, "lora_adapter_metadata")
    if packed is None:
        return None, {}
    alpha, pattern = packed.get(f"{component}.lora_alpha"), packed.get(f"{component}.alpha_pattern") or {}
    where = f"metadata lora_adapter_metadata: {component}"
    if alpha is not None and not _is_number(alpha):
        raise LoRAError(path, f"{where}.lora_alpha must be a number, got {printable(repr(alpha))}")
    if not isinstance(pattern, dict) or not all(_is_number(v) for v in pattern.values()):
        raise LoRAError(path, f"{where}.alpha_pattern must be an object of module patterns to numbers, "
                        f"got {printable(repr(pattern))[:120]}")  # fmt: skip
    for key in pattern:
        try:
            re.compile(key.lstrip("^"))
        except re.error as error:
            raise LoRAError(path, f"{where}.alpha_pattern: {printable(repr(key))} is not a valid pattern "
                            f"({error})") from None  # fmt: skip
    return alpha, pattern


def _alpha_for(module: str, default: float | None, pattern: dict) -> float | None:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key.lstrip('^')})$", module):
            return float(value)
    return default


def _collect_factors(path: Path, parts: dict, metadata: dict) -> tuple[dict, list[str], dict, dict]:
    """Pair ``lora_A``/``lora_B`` per module and fold any per-module alpha; also returns
    each module's ``(alpha, rank)`` as the file stores them, and PEFT's DoRA magnitudes."""
    factors: dict[str, dict[str, Factors]] = {}
    unused: list[str] = []
    alphas: dict[str, tuple[float | None, int]] = {}
    magnitudes: dict[str, dict[str, Magnitude]] = {}
    for component, part in parts.items():
        default_alpha, pattern = _adapter_alphas(path, metadata, component)
        table: dict[str, Factors] = {}
        consumed = set()
        for key, down in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            up_key, alpha_key = module + ".lora_B.weight", module + ".alpha"
            if up_key not in part:
                raise LoRAError(path, f"{component}.{key} has no matching lora_B")
            up = part[up_key].float()
            rank = _factor_shape(path, f"{component}.{key}", down)
            if up.dim() != down.dim() or up.shape[1] != rank:
                raise LoRAError(
                    path, f"{component}.{module}: up {tuple(up.shape)} does not fit down {tuple(down.shape)}"
                )
            if up.dim() == 4 and up.shape[2:] != (1, 1):
                raise LoRAError(
                    path,
                    f"{component}.{module}: a convolution LoRA whose up factor is not 1x1 is not supported",
                )
            alpha = part.get(alpha_key)
            alpha = (
                _scalar_alpha(path, f"{component}.{alpha_key}", alpha)
                if alpha is not None
                else _alpha_for(module, default_alpha, pattern)
            )
            scale = alpha / rank if alpha is not None else 1.0
            table[module] = Factors(down.float() * scale, up)
            alphas[f"{component}.{module}"] = (alpha, rank)
            consumed.update((key, up_key, alpha_key))
            magnitude_key = next((k for k in _magnitude_keys(module) if k in part), None)
            if magnitude_key is not None:
                magnitudes.setdefault(component, {})[module] = _peft_magnitude(
                    path, f"{component}.{magnitude_key}", part[magnitude_key], up.shape[0]
                )
                consumed.add(magnitude_key)
        unused.extend(f"{component}.{k}" for k in part if k not in consumed)
        if table:
            factors[component] = table
    if not factors:
        raise LoRAError(path, "holds no LoRA weights in a known format (kohya, diffusers/PEFT, attention-processor, "
                        "LyCORIS)")  # fmt: skip
    return factors, unused, alphas, magnitudes


def _magnitude_keys(module: str) -> tuple[str, str]:
    """Where PEFT stores a DoRA module's magnitude (``get_peft_model_state_dict`` drops the
    ``.weight`` that older versions kept)."""
    return f"{module}.lora_magnitude_vector", f"{module}.lora_magnitude_vector.weight"


def _peft_magnitude(path: Path, key: str, tensor: torch.Tensor, out: int) -> Magnitude:
    """PEFT's DoRA magnitude: one value per output channel, ``(out,)`` for a linear layer,
    ``(1, out, 1, 1)`` for a convolution."""
    if tensor.numel() != out:
        raise LoRAError(path, f"DoRA magnitude {key} has {tensor.numel()} values (shape {tuple(tensor.shape)}), but "
                        f"the module's update has {out} output channels: one magnitude per output channel is "
                        "needed")  # fmt: skip
    return Magnitude(tensor.flatten().float(), 0, key)


def detect_family(factors: dict[str, dict[str, Factors]]) -> str:
    """SD1.x / SD2.x / SDXL from the shapes: the cross-attention width of ``attn2.to_k``
    (768 / 1024 / 2048), else a second text encoder (SDXL), else the text width."""
    for module, f in factors.get("unet", {}).items():
        if module.endswith("attn2.to_k") or module.endswith("attn2.to_v"):
            width = f.down.shape[1]
            return CROSS_ATTENTION_FAMILIES.get(width, f"unknown (cross-attention width {width})")
    if "text_encoder_2" in factors:
        return "SDXL"
    for module, f in factors.get("text_encoder", {}).items():
        if module.endswith("q_proj"):
            return {768: "SD1.x", 1024: "SD2.x"}.get(f.down.shape[1], "unknown")
    return "unknown"


def model_family(unet) -> str:
    """The family of a diffusers UNet, named like :func:`detect_family` names LoRAs."""
    width = unet.config.cross_attention_dim
    width = width[0] if isinstance(width, (list, tuple)) else width
    return CROSS_ATTENTION_FAMILIES.get(width, f"custom (cross-attention width {width})")


def _triggers_from_metadata(path: Path, metadata: dict[str, str], limit: int = 3) -> list[str]:
    """kohya's ``ss_tag_frequency``: the most frequent caption tags are the triggers; else
    the model spec's ``modelspec.trigger_phrase``. Malformed tag counts are refused; giving
    the triggers (``triggers=``, a sidecar) skips them."""
    try:
        datasets = _json_metadata(path, metadata, "ss_tag_frequency") or {}
    except LoRAError as error:
        raise LoRAError(path, f"{error.reason}; give the trigger words with triggers= or a sidecar JSON") from None
    counts: Counter = Counter()
    for tags in datasets.values():
        if isinstance(tags, dict):
            counts.update({tag.strip(): int(n) for tag, n in tags.items() if str(n).isdigit()})
    return [tag for tag, _ in counts.most_common(limit) if tag] or trigger_list(
        path, metadata.get("modelspec.trigger_phrase", ""), "modelspec.trigger_phrase"
    )


TRIGGER_FIELDS = ("triggers", "trigger_words", "trainedWords", "activation text")
"""Sidecar fields that give trigger words, in the order a sidecar's are trusted: ours,
other tools' spellings of the same, Civitai's ``trainedWords``, A1111's "activation text"."""
SIDECAR_SUFFIXES = (".json", ".civitai.info")
"""``<stem>.json`` (ours, shared with A1111's user metadata) then Civitai helper's
``<stem>.civitai.info``: both are read, the first that gives a field wins."""
_A1111_NOTES = {"description": "description", "notes": "notes", "sd version": "sd_version"}


def _read_sidecar(candidate: Path) -> dict:
    """A sidecar's JSON object, refused (naming it) when it is not one."""
    try:
        data = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoRAError(candidate, f"sidecar is not valid JSON: {error}") from error
    except RecursionError:
        raise LoRAError(candidate, "sidecar is nested too deeply to be a LoRA's sidecar") from None
    if not isinstance(data, dict):
        raise LoRAError(candidate, f"the sidecar must be a JSON object, got {type(data).__name__}")
    return data


def _sidecars(path: Path) -> list[tuple[Path, dict]]:
    """Every sidecar beside the LoRA (:data:`SIDECAR_SUFFIXES`, in that order) and its object."""
    found = [path.with_suffix(suffix) for suffix in SIDECAR_SUFFIXES] if path.suffix else []
    return [(candidate, _read_sidecar(candidate)) for candidate in found if candidate.is_file()]


def trigger_list(source: str | Path, value: object, field: str = "triggers") -> list[str]:
    """Trigger words as a list: a list of strings as it is, a string as its comma-separated
    phrases (``"zorbo creature"`` is one trigger, not one per letter)."""
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return list(value)
    raise LoRAError(source, f"'{field}' must be a list of strings or a comma-separated string, "
                    f"got {printable(repr(value))[:120]}")  # fmt: skip


def _sidecar_triggers(sidecars: list[tuple[Path, dict]]) -> list[str] | None:
    """The first sidecar's first trigger field (:data:`TRIGGER_FIELDS`) that is set: our
    ``<stem>.json`` (our ``triggers``, else A1111's "activation text") before Civitai's."""
    for source, data in sidecars:
        for key in TRIGGER_FIELDS:
            if data.get(key):
                return trigger_list(source, data[key], key)
    return None


def _sidecar_category(sidecars: list[tuple[Path, dict]]) -> str | None:
    """Our ``category`` (no other tool writes it), checked to be a string."""
    for source, data in sidecars:
        category = data.get("category")
        if category is not None:
            if not isinstance(category, str):
                raise LoRAError(source, f"'category' must be a string, got {printable(repr(category))[:60]}")
            return category
    return None


def _preferred_weight(sidecars: list[tuple[Path, dict]]) -> float | None:
    """A1111's "preferred weight" (0 is A1111's "not set"), checked like any LoRA weight."""
    for source, data in sidecars:
        value = data.get("preferred weight")
        if value not in (None, 0, ""):
            try:
                return number("A1111's 'preferred weight'", value, -MAX_WEIGHT, MAX_WEIGHT)
            except ValueError as error:
                raise LoRAError(source, str(error)) from None
    return None


def _sidecar_notes(sidecars: list[tuple[Path, dict]]) -> dict[str, str]:
    """What A1111's user metadata and Civitai's model info say about the LoRA, as text:
    A1111's description, notes and sd version; Civitai's model name, version and base model."""
    notes: dict[str, str] = {}
    for _, data in sidecars:
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        found = {ours: data.get(theirs) for theirs, ours in _A1111_NOTES.items()}
        found |= {"civitai_model": model.get("name"), "civitai_base_model": data.get("baseModel")}
        if model:
            found["civitai_version"] = data.get("name")
        for key, value in found.items():
            if isinstance(value, (str, int, float)) and str(value).strip() and key not in notes:
                notes[key] = str(value)
    return notes


def write_sidecar(path: str | Path, category: str | None, triggers: list[str]) -> Path:
    """Merge ``category`` and ``triggers`` into the LoRA's ``<stem>.json`` and return it.

    A1111 keeps its user metadata ("activation text", "preferred weight", "description"
    ...) in the same file, so every field already there is kept, and the file is replaced
    atomically (never half-written). A sidecar that cannot be read is refused, not overwritten.
    """
    target = Path(path).with_suffix(".json")
    data = _read_sidecar(target) if target.is_file() else {}
    data["triggers"] = list(triggers)
    if category is None:
        data.pop("category", None)
    else:
        data["category"] = category
    with atomic_open(target, "w") as handle:
        json.dump(data, handle, indent=4, ensure_ascii=False)  # A1111's own layout
    return target


def _check_values(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors only (an ``alpha`` may be an integer scalar), all finite.
    Float8 factors are upcast to float32 first (torch cannot test them for NaN, and the
    composable layer computes in the base model's dtype anyway)."""
    checked = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            if tensor.dim() == 0 and key.endswith("alpha"):
                checked[key] = tensor
                continue
            raise LoRAError(path, f"tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA factors "
                            "must be floating point (the file is damaged or not a LoRA)")  # fmt: skip
        if tensor.dtype not in _PLAIN_FLOATS:
            try:
                tensor = tensor.float()
            except (RuntimeError, TypeError):
                raise LoRAError(path, f"tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, which "
                                "cannot be converted to float32") from None  # fmt: skip
        if not torch.isfinite(tensor).all():
            raise LoRAError(path, f"tensor {key} contains NaN or Inf values")
        checked[key] = tensor
    return checked


def load_lora(
    path: str | Path,
    name: str | None = None,
    category: str | None = None,
    triggers: list[str] | None = None,
    allow_pickle: bool = False,
    unet_config: dict | None = None,
    limits: Limits | None = None,
) -> LoRA:
    """Read a LoRA file into a :class:`LoRA` record.

    ``category`` and ``triggers`` override what the sidecars (``<stem>.json``, then
    ``<stem>.civitai.info``) and then the file's metadata say. ``unet_config`` lets
    kohya SDXL files with SGM block names map correctly. ``limits`` bound the file's
    size and tensor count (:class:`compose.checks.Limits`). Every refusal is a
    :class:`LoRAError` naming the file. The name (``name``, else the file's stem) is made
    safe here, once: control, line and bidi characters become ``[U+XXXX]``
    (:func:`compose.checks.safe_name`), so no file name forges a line of a PNG's text.
    """
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle, limits)
    try:
        parsed = _parse(path, tensors, metadata, unet_config)
    except LoRAError:
        raise
    except _UNFORESEEN as error:
        raise LoRAError(path, f"cannot be read as a LoRA ({type(error).__name__}: {error})") from None
    sidecars = _sidecars(path)
    category = category or _sidecar_category(sidecars) or metadata.get("compose_category")
    if category is not None and category not in CATEGORIES:
        raise LoRAError(path, f"category {printable(repr(category))} is not one of {', '.join(CATEGORIES)}")
    if triggers is not None:
        triggers = trigger_list(path, triggers)
    else:
        triggers = _sidecar_triggers(sidecars) or _triggers_from_metadata(path, metadata)
    sha256, short_hash = file_hashes(path)
    lora = LoRA(
        name=safe_name(name or path.stem),
        path=str(path),
        sha256=sha256,
        short_hash=short_hash,
        format=parsed.format,
        family=detect_family(parsed.factors),
        factors=parsed.factors,
        category=category,
        triggers=list(triggers),
        metadata=metadata,
        unused_keys=sorted(parsed.unused),
        alphas=parsed.alphas,
        preferred_weight=_preferred_weight(sidecars),
        notes=_sidecar_notes(sidecars),
        algorithms=parsed.algorithms,
        layouts=parsed.layouts,
        magnitudes=parsed.magnitudes,
    )
    return lora


class _Parsed(NamedTuple):
    """What a file's tensors hold, as :class:`LoRA` records it."""

    format: str
    factors: dict[str, dict[str, Factors]]
    unused: list[str]
    alphas: dict[str, tuple[float | None, int | None]]
    algorithms: dict[str, int]
    layouts: dict[str, Layout]
    magnitudes: dict[str, dict[str, Magnitude]]


def _parse(path: Path, tensors: dict, metadata: dict, unet_config: dict | None) -> _Parsed:
    """A file's tensors read, in whichever format they are: OFT, (IA)³, GLoRA, trained
    norms and bias deltas refused by name first (:func:`compose.lycoris.refusal`)."""
    tensors = _check_values(path, tensors)
    keys = list(tensors)
    biases = [k for k in keys if k.endswith(".diff_b") or (k.startswith(KOHYA_PREFIXES) and k.endswith(".bias"))]
    reason = lycoris.refusal(keys, [k for k in biases if bool(tensors[k].any())])
    if reason is not None:
        raise LoRAError(path, reason)
    if lycoris.is_lycoris(keys):
        return _parse_lycoris(path, tensors, unet_config)
    parts, fmt, unused, kohya_alphas = _split_components(path, tensors, unet_config)
    factors, more_unused, alphas, magnitudes = _collect_factors(path, parts, metadata)
    kinds = Counter(
        "LoCon" if math.prod(f.down.shape[2:]) > 1 else "LoRA" for t in factors.values() for f in t.values()
    )
    kinds["DoRA"] = sum(len(t) for t in magnitudes.values())
    return _Parsed(fmt, factors, unused + more_unused, kohya_alphas or alphas, dict(+kinds), {}, magnitudes)


def _parse_lycoris(path: Path, tensors: dict[str, torch.Tensor], unet_config: dict | None) -> _Parsed:
    """A LyCORIS file (kohya names): each module's exact factors (:func:`compose.lycoris.build`),
    named by diffusers' kohya converter as a LoRA's would be."""
    if not all(k.startswith(KOHYA_PREFIXES) for k in tensors):
        raise LoRAError(path, "holds LyCORIS factors (hada_, lokr_, diff, dora_scale or lora_mid keys) under names "
                        "other than kohya's (lora_unet_..., lora_te_...); compose reads LyCORIS files saved with "
                        "kohya names, the ones A1111 and ComfyUI load")  # fmt: skip
    groups, unused = lycoris.group(tensors)
    modules = {}
    for name, parts in groups.items():
        try:
            modules[name] = lycoris.build(name, parts)
        except LayoutError as error:
            raise LoRAError(path, str(error)) from None
    names = _kohya_names(path, list(modules), unet_config)
    factors: dict[str, dict[str, Factors]] = {}
    layouts: dict[str, Layout] = {}
    magnitudes: dict[str, dict[str, Magnitude]] = {}
    for name, module in modules.items():
        if name not in names:
            unused.extend(f"{name}.{key}" for key in groups[name])
            continue
        component, target = names[name]
        factors.setdefault(component, {})[target] = module.factors
        layouts[f"{component}.{target}"] = module.layout
        if module.magnitude is not None:
            magnitudes.setdefault(component, {})[target] = module.magnitude
    if not factors:
        raise LoRAError(path, "none of its LyCORIS modules names a UNet or text-encoder module that diffusers' "
                        "kohya converter knows")  # fmt: skip
    kinds = Counter(layout.algorithm for layout in layouts.values())
    kinds["DoRA"] = sum(len(t) for t in magnitudes.values())
    alphas = {name: (module.layout.alpha, module.layout.rank) for name, module in modules.items()}
    return _Parsed("kohya", factors, unused, alphas, dict(+kinds), layouts, magnitudes)


def _kohya_names(path: Path, modules: list[str], unet_config: dict | None) -> dict[str, tuple[str, str]]:
    """kohya module name -> ``(component, diffusers module)``, by diffusers' own converter:
    each name goes through it as a LoRA whose 1x1 factors hold the name's index, read back
    after conversion. Names the converter drops are absent."""
    markers = {}
    for index, name in enumerate(modules):
        marker = torch.full((1, 1), float(index))
        markers[f"{name}.lora_down.weight"] = markers[f"{name}.lora_up.weight"] = marker
    parts, _, _, _ = _split_components(path, markers, unet_config)
    return {
        modules[int(marker.item())]: (component, key.removesuffix(".lora_A.weight"))
        for component, part in parts.items()
        for key, marker in part.items()
        if key.endswith(".lora_A.weight")
    }
