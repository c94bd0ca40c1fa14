"""LyCORIS and DoRA adapters as exact :class:`~compose.layers.Factors`.

Every composition method is defined over ``Factors(down, up)``: the composable layer
computes ``W x + B_cat (m ⊙ A_cat x)`` and a method only chooses ``m``. So each LyCORIS
module is turned, once at load, into factors whose product is *exactly* its update
``ΔW`` (alpha scaling folded in), and no method needs a second code path:

- **LoCon** (``lora_down``/``lora_up``, Tucker ``lora_mid`` for convolutions): ``up``,
  ``mid ∘ down``, rank ``r``;
- **LoHa** (``hada_w1_a/b``, ``hada_w2_a/b``, Tucker ``hada_t1/t2``):
  ``ΔW = (A1 B1) ⊙ (A2 B2)`` equals ``up' down'`` with ``up'`` the row-wise
  Khatri-Rao (face-splitting) product of ``A1`` and ``A2`` and ``down'`` the column-wise
  one of ``B1`` and ``B2``: ``ΔW[o, i] = Σ_ab (A1[o,a] A2[o,b]) (B1[a,i] B2[b,i])``,
  rank ``r1·r2``;
- **LoKr** (``lokr_w1[_a/_b]``, ``lokr_w2[_a/_b]``, Tucker ``lokr_t2``):
  ``ΔW = W1 ⊗ W2``; with each half written as a product ``W_n = P_n Q_n`` (its stored
  low-rank pair, or an identity on either side), ``W1 ⊗ W2 = (P1 ⊗ P2)(Q1 ⊗ Q2)``, and
  the pair of the smallest rank is kept;
- **full diff** (``diff``): dense.

Where no low-rank form is smaller than the matrix itself, the **dense** form is used,
still exact: ``up = I``, ``down = ΔW`` (or ``down = I``, ``up = ΔW`` when the input side
is the smaller one). Convolution kernels always ride on ``down``, so a convolution's
update is ``(out, in·kh·kw)`` flattened: any ``up @ down`` factorisation of it is a valid
convolution LoRA (``down`` reshaped to ``(r, in, kh, kw)``, ``up`` a 1x1), which is also
why a LyCORIS file that stores a kernel flattened needs no shape from the model.

**DoRA** (PEFT's ``lora_magnitude_vector``, LyCORIS' ``dora_scale``) is not additive:
``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖``, the norm per output channel (PEFT; LyCORIS
``wd_on_out``) or per input channel (LyCORIS' default, A1111). It needs the base
weight, so :func:`dora_factors` resolves it when the model is known (the composer
adding the LoRA) into the *effective delta* ``ΔW_d = W' − W`` against the base weight,
dense; with strength ``s`` the layer is ``W + s·ΔW_d``, as A1111 and ComfyUI apply one
DoRA at any strength. Several DoRAs are each normalised against the base weight, so
every method combines deltas as it combines any LoRA's, and one DoRA at strength 1
equals PEFT.

OFT/BOFT (a rotation of ``W``), (IA)³ (a rescaling of channels), GLoRA and trained
normalisation layers are not updates added to a Linear or Conv2d weight; they, and
non-zero bias deltas (``diff_b``), are refused by name (:func:`refusal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layers import Factors

LOCON = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
KNOWN = (*LOCON, *LOHA, *LOKR, *FULL, "alpha", "dora_scale")
MARKERS = (*LOHA, *LOKR, "diff", "dora_scale", "lora_mid.weight")
"""Key endings that only LyCORIS writes: a file with any of them is read by :func:`build`."""
EPS = torch.finfo(torch.float32).eps
_REFUSED = (
    (("oft_blocks", "oft_diag"), "is a LyCORIS OFT/BOFT adapter: it multiplies each weight by a learned "
     "rotation instead of adding an update to it, which compose does not compose (it sums, switches and "
     "averages added updates)"),
    (("on_input",), "is a LyCORIS (IA)³ adapter: it rescales each layer's channels instead of adding an update to "
     "its weight, which compose does not compose (it sums, switches and averages added updates)"),
    (("a1.weight", "a2.weight", "b1.weight", "b2.weight"), "is a LyCORIS GLoRA adapter, whose update depends on the "
     "base weight; compose composes LoRA, LoCon, LoHa, LoKr, full-diff and DoRA files"),
    (("w_norm", "b_norm"), "trains normalisation layers (w_norm/b_norm keys), which compose cannot compose: its "
     "LoRA layers wrap Linear and Conv2d weights only; A1111 and ComfyUI apply them"),
)  # fmt: skip


class LayoutError(ValueError):
    """A LyCORIS module whose tensors do not make an update; the message names the module."""


@dataclass(frozen=True)
class Magnitude:
    """A DoRA module's magnitude: ``values`` ``(n,)`` float32, one per output channel
    (``axis`` 0: PEFT, LyCORIS ``wd_on_out``) or per input channel (``axis`` 1: LyCORIS'
    default and A1111's convention); ``source`` the file's key name for messages."""

    values: torch.Tensor
    axis: int
    source: str


@dataclass(frozen=True)
class Layout:
    """What one LyCORIS module of a file holds, for ``compose inspect`` and messages.

    ``algorithm``: LoRA, LoCon, LoHa, LoKr or diff; ``name`` the module's name in the file;
    ``shapes`` its tensors' shapes by key; ``update`` the shape of ``ΔW`` it makes (a
    convolution's kernel flattened into the input side where the file stores it so);
    ``rank`` the file's ``dim`` (``None``: full matrices, no rank); ``alpha`` as stored;
    ``factor`` LoKr's ``lokr_w1`` shape (its Kronecker split)."""

    algorithm: str
    name: str
    shapes: dict[str, tuple[int, ...]]
    update: tuple[int, ...]
    rank: int | None
    alpha: float | None
    factor: tuple[int, int] | None = None

    def describe(self) -> str:
        """``LoKr module NAME (lokr_w1 (4, 4), lokr_w2 (8, 8) -> update (32, 32))``."""
        tensors = ", ".join(f"{key} {shape}" for key, shape in self.shapes.items())
        return f"{self.algorithm} module {self.name} ({tensors} -> update {self.update})"


@dataclass
class Module:
    """One module of a LyCORIS file: exact ``factors`` (alpha folded in), its ``layout``,
    and its DoRA ``magnitude`` if it has one."""

    factors: Factors
    layout: Layout
    magnitude: Magnitude | None = None


def refusal(keys: list[str], nonzero_bias: list[str]) -> str | None:
    """Why a file cannot be composed (OFT, (IA)³, GLoRA, trained norms, bias deltas), or
    ``None``. ``nonzero_bias``: the bias keys (a full diff's ``.diff_b``, a module's
    ``.bias``) whose values are not all zero."""
    for endings, reason in _REFUSED:
        found = [k for k in keys if k.endswith(tuple("." + e for e in endings))]
        if found:
            return f"{reason} (e.g. {found[0]})"
    if nonzero_bias:
        count = f"{len(nonzero_bias)} module" + ("s" if len(nonzero_bias) > 1 else "")
        return (
            f"adds bias deltas ({count}, e.g. {nonzero_bias[0]}), which compose cannot "
            "apply: its LoRA layers add weight updates only (A1111 and ComfyUI add the biases too); save the "
            "full-diff file without diff_b (or with zero biases) to use its weights"
        )
    return None


def is_lycoris(keys: list[str]) -> bool:
    """Whether any key is one only LyCORIS writes (:data:`MARKERS`)."""
    return any(k.endswith(tuple("." + m for m in MARKERS)) for k in keys)


def group(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The tensors by module (kohya names: ``MODULE.KEY``, no dots in ``MODULE``) and the
    keys that are none of :data:`KNOWN`, or belong to a module with no weights."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unused = []
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix in KNOWN:
            modules.setdefault(name, {})[suffix] = tensor
        else:
            unused.append(key)
    for name in [n for n, parts in modules.items() if set(parts) <= {"alpha", "dora_scale", "diff_b"}]:
        unused.extend(f"{name}.{suffix}" for suffix in modules.pop(name))
    return modules, unused


def build(name: str, parts: dict[str, torch.Tensor]) -> Module:
    """One module's exact factors from its tensors (:data:`KNOWN` keys)."""
    parts = {key: tensor.float() for key, tensor in parts.items()}
    alpha = parts.get("alpha")
    if alpha is not None:
        if alpha.numel() != 1:
            raise LayoutError(f"{name}.alpha has shape {tuple(alpha.shape)}; an alpha is one number")
        alpha = float(alpha)
    algorithms = [
        kind for kind, keys in (("LoCon", LOCON), ("LoHa", LOHA), ("LoKr", LOKR), ("diff", FULL[:1]))
        if any(k in parts for k in keys)
    ]  # fmt: skip
    if len(algorithms) != 1:
        raise LayoutError(
            f"LyCORIS module {name} mixes the keys of {' and '.join(algorithms)}; a module has one algorithm"
        )
    make = {"LoCon": _locon, "LoHa": _loha, "LoKr": _lokr, "diff": _diff}[algorithms[0]]
    factors, layout = make(name, parts, alpha)
    magnitude = None
    if "dora_scale" in parts:
        magnitude = dora_scale(name, parts["dora_scale"], layout.update)
    return Module(factors, layout, magnitude)


# -- the algorithms ------------------------------------------------------------------------


def _need(name: str, parts: dict, keys: tuple[str, ...]) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise LayoutError(f"LyCORIS module {name} has no {', '.join(missing)} (it has {', '.join(sorted(parts))})")
    return [parts[k] for k in keys]


def _shapes(parts: dict, keys: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(parts[k].shape) for k in keys if k in parts}


def _check_product(name: str, left: tuple[str, torch.Tensor], right: tuple[str, torch.Tensor]) -> None:
    """Refuse two factors whose inner dimensions differ (``(a, r) @ (r', b)``, ``r != r'``)."""
    (left_key, a), (right_key, b) = left, right
    if a.dim() < 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
        raise LayoutError(f"LyCORIS module {name}: {left_key} {tuple(a.shape)} and {right_key} {tuple(b.shape)} do not "
                          "multiply (the inner sizes differ)")  # fmt: skip


def _tucker_down(core: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Σ_j core[i, j, h, w] right[j, c]``: a Tucker core joined to its input factor,
    ``(r, in, kh, kw)``."""
    return torch.einsum("ijhw,jc->ichw", core, right.flatten(1))


def _locon(name: str, parts: dict, alpha: float | None) -> tuple[Factors, Layout]:
    down, up = _need(name, parts, LOCON[:2])
    rank = down.shape[0]
    mid = parts.get("lora_mid.weight")
    if mid is not None:
        if mid.dim() != 4 or mid.shape[1] != rank or down.shape[2:] not in ((), (1, 1)):
            raise LayoutError(f"LyCORIS module {name}: lora_mid {tuple(mid.shape)} does not join lora_down "
                              f"{tuple(down.shape)} (a Tucker core is (r, r, kh, kw) after a 1x1 down)")  # fmt: skip
        down = _tucker_down(mid, down)
    _check_product(name, ("lora_up.weight", up.flatten(1)), ("lora_down.weight", down.flatten(1)))
    kernel = tuple(down.shape[2:])
    factors = _exact(up.flatten(1), down.flatten(1) * _scale(alpha, rank), kernel or None)
    algorithm = "LoCon" if math.prod(kernel) > 1 else "LoRA"
    update = (up.shape[0], *down.shape[1:])
    return factors, Layout(algorithm, name, _shapes(parts, LOCON), update, rank, alpha)


def _loha_half(name: str, parts: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half ``n`` of a LoHa, ``(A_n (out, r), B_n (r, in[, kh, kw]))`` with ``ΔW_n = A_n B_n``."""
    a, b = _need(name, parts, (f"hada_w{n}_a", f"hada_w{n}_b"))
    core = parts.get(f"hada_t{n}")
    if core is None:
        _check_product(name, (f"hada_w{n}_a", a), (f"hada_w{n}_b", b))
        return a, b
    if core.dim() < 3 or core.shape[:2] != (a.shape[0], b.shape[0]):
        raise LayoutError(f"LyCORIS module {name}: hada_t{n} {tuple(core.shape)} does not join hada_w{n}_a "
                          f"{tuple(a.shape)} and hada_w{n}_b {tuple(b.shape)}")  # fmt: skip
    return a.T, _tucker_down(core, b)


def _loha(name: str, parts: dict, alpha: float | None) -> tuple[Factors, Layout]:
    if ("hada_t1" in parts) != ("hada_t2" in parts):
        raise LayoutError(f"LyCORIS module {name} has one Tucker core of hada_t1/hada_t2 but not the other")
    (a1, b1), (a2, b2) = _loha_half(name, parts, 1), _loha_half(name, parts, 2)
    if a1.shape[0] != a2.shape[0] or b1.shape[1:] != b2.shape[1:]:
        first, second = (a1.shape[0], *b1.shape[1:]), (a2.shape[0], *b2.shape[1:])
        raise LayoutError(
            f"LyCORIS module {name}: its two halves make updates of different shapes, {first} and {second}"
        )
    rank = parts["hada_w1_b"].shape[0]
    up = (a1[:, :, None] * a2[:, None, :]).flatten(1)
    down = (b1.flatten(1)[:, None] * b2.flatten(1)[None]).flatten(0, 1)
    kernel = tuple(b1.shape[2:]) or None
    factors = _exact(up, down * _scale(alpha, rank), kernel)
    return factors, Layout("LoHa", name, _shapes(parts, LOHA), (a1.shape[0], *b1.shape[1:]), rank, alpha)


def _lokr_halves(name: str, parts: dict) -> tuple[list, list, tuple[int, ...] | None, int | None]:
    """The candidate ``(P, Q)`` products of each Kronecker half (``Q`` flattened), the
    kernel where the file shows it, and the rank that alpha divides (``None``: both halves
    full, scale 1)."""
    if "lokr_w1" in parts:
        first, rank = [(None, parts["lokr_w1"])], None
    else:
        a, b = _need(name, parts, ("lokr_w1_a", "lokr_w1_b"))
        _check_product(name, ("lokr_w1_a", a), ("lokr_w1_b", b))
        first, rank = [(a, b), (None, a @ b)], b.shape[0]
    kernel = None
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
        second, kernel = [(None, w2.flatten(1))], tuple(w2.shape[2:]) or None
    elif "lokr_t2" in parts:
        a, b, core = _need(name, parts, ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))
        if core.dim() < 3 or core.shape[:2] != (a.shape[0], b.shape[0]):
            raise LayoutError(f"LyCORIS module {name}: lokr_t2 {tuple(core.shape)} does not join lokr_w2_a "
                              f"{tuple(a.shape)} and lokr_w2_b {tuple(b.shape)}")  # fmt: skip
        q = _tucker_down(core, b)
        second, kernel, rank = [(a.T, q.flatten(1)), (None, a.T @ q.flatten(1))], tuple(q.shape[2:]), b.shape[0]
    else:
        a, b = _need(name, parts, ("lokr_w2_a", "lokr_w2_b"))
        _check_product(name, ("lokr_w2_a", a), ("lokr_w2_b", b.flatten(1)))
        second, kernel, rank = [(a, b.flatten(1)), (None, a @ b.flatten(1))], tuple(b.shape[2:]) or None, b.shape[0]
    return [c for w in first for c in _sides(w)], [c for w in second for c in _sides(w)], kernel, rank


def _sides(pair: tuple[torch.Tensor | None, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(P, Q)`` with ``P Q`` the half: a stored low-rank pair as it is; a full matrix ``M``
    as ``(I, M)`` and ``(M, I)``."""
    left, right = pair
    if left is not None:
        return [(left, right)]
    return [(torch.eye(right.shape[0]), right), (right, torch.eye(right.shape[1]))]


def _lokr(name: str, parts: dict, alpha: float | None) -> tuple[Factors, Layout]:
    first, second, kernel, rank = _lokr_halves(name, parts)
    (p1, q1), (p2, q2) = min(((a, b) for a in first for b in second), key=lambda pair: _rank(*pair))
    up, down = torch.kron(p1.contiguous(), p2.contiguous()), torch.kron(q1.contiguous(), q2.contiguous())
    in_channels = down.shape[1] // math.prod(kernel) if kernel else down.shape[1]
    update = (up.shape[0], in_channels, *kernel) if kernel else (up.shape[0], down.shape[1])
    factors = _exact(up, down * _scale(alpha, rank), kernel)
    w1 = parts.get("lokr_w1")
    factor = tuple(w1.shape) if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    return factors, Layout("LoKr", name, _shapes(parts, LOKR), update, rank, alpha, factor)


def _rank(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The rank of ``(P1 ⊗ P2)(Q1 ⊗ Q2)``: the product of the halves' inner sizes."""
    return first[1].shape[0] * second[1].shape[0]


def _diff(name: str, parts: dict, alpha: float | None) -> tuple[Factors, Layout]:
    delta = parts["diff"]
    if delta.dim() not in (2, 4):
        raise LayoutError(f"LyCORIS module {name}: diff has shape {tuple(delta.shape)}; a weight is 2-D or 4-D")
    return dense(delta), Layout("diff", name, _shapes(parts, FULL[:1]), tuple(delta.shape), None, alpha)


def _scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank as A1111 and ComfyUI read it: 1 without an alpha or a rank."""
    return 1.0 if alpha is None or rank is None else alpha / rank


# -- exact factors -------------------------------------------------------------------------


def _exact(up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, ...] | None) -> Factors:
    """Factors of ``ΔW = up @ down`` (``up`` (out, r), ``down`` (r, in·kh·kw)): these, or
    the dense form where its rank, ``min(out, in·kh·kw)``, is not larger than ``r``.
    ``kernel`` ``(kh, kw)`` where known shapes a convolution's factors; else they stay 2-D
    and the composer reshapes them for the layer they land on."""
    if up.shape[1] >= min(up.shape[0], down.shape[1]):
        return dense((up @ down), kernel)
    return _shaped(up, down, kernel)


def dense(delta: torch.Tensor, kernel: tuple[int, ...] | None = None) -> Factors:
    """``ΔW`` as exact dense factors: ``up = I`` and ``down = ΔW``, or, where the input
    side ``in·kh·kw`` is the smaller, ``down = I`` and ``up = ΔW``. ``delta`` is
    ``(out, in)``, ``(out, in, kh, kw)``, or flattened ``(out, in·kh·kw)`` with ``kernel``."""
    kernel = tuple(delta.shape[2:]) or kernel
    flat = delta.flatten(1)
    out, inner = flat.shape
    if out <= inner:
        return _shaped(torch.eye(out, dtype=flat.dtype), flat, kernel)
    return _shaped(flat, torch.eye(inner, dtype=flat.dtype), kernel)


def _shaped(up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, ...] | None) -> Factors:
    if not kernel:
        return Factors(down.contiguous(), up.contiguous())
    in_channels = down.shape[1] // math.prod(kernel)
    return Factors(down.reshape(down.shape[0], in_channels, *kernel).contiguous(), up[:, :, None, None].contiguous())


# -- DoRA ------------------------------------------------------------------------------------


def dora_scale(name: str, tensor: torch.Tensor, update: tuple[int, ...]) -> Magnitude:
    """A LyCORIS ``dora_scale``: ``(out, 1, ...)`` per output channel, ``(1, in, ...)`` per
    input channel (the axis read from its shape, as ComfyUI does); ``update`` the module's
    update shape."""
    shape, out = tuple(tensor.shape), update[0]
    inner = math.prod(update[1:])
    if tensor.numel() == out and (tensor.dim() == 1 or shape[0] == out):
        return Magnitude(tensor.flatten().float(), 0, f"{name}.dora_scale")
    if tensor.dim() >= 2 and shape[0] == 1 and tensor.numel() == shape[1] and inner % shape[1] == 0:
        return Magnitude(tensor.flatten().float(), 1, f"{name}.dora_scale")
    raise LayoutError(f"{name}.dora_scale has shape {shape}; for an update of shape {update} DoRA needs one "
                      f"magnitude per output channel ({out}, 1, ...) or per input channel (1, in, ...)")  # fmt: skip


def check_magnitude(magnitude: Magnitude, weight_shape: tuple[int, ...]) -> str | None:
    """Why ``magnitude`` cannot scale a weight of ``weight_shape``, or ``None``."""
    channels = weight_shape[magnitude.axis]
    if magnitude.values.numel() == channels:
        return None
    side = "output" if magnitude.axis == 0 else "input"
    return (f"DoRA magnitude {magnitude.source} has {magnitude.values.numel()} values, but the layer has "
            f"{channels} {side} channels (weight {weight_shape})")  # fmt: skip


def dora_factors(weight: torch.Tensor, factors: Factors, magnitude: Magnitude) -> Factors:
    """The effective delta ``ΔW_d = m ⊙ (W + ΔW) / ‖W + ΔW‖ − W`` of one DoRA module on
    the base ``weight``, as dense factors shaped like ``factors`` (``ΔW = up @ down``, shaped
    for this layer). The norm runs over every axis but ``magnitude.axis``; computed in
    float32 on the weight's device, returned on the factors' device."""
    base = weight.detach().float()
    delta = factors.up.flatten(1).to(base) @ factors.down.flatten(1).to(base)
    merged = base + delta.view_as(base)
    others = [d for d in range(merged.dim()) if d != magnitude.axis]
    norm = torch.linalg.vector_norm(merged, dim=others, keepdim=True).clamp_min(EPS)
    shape = [1] * merged.dim()
    shape[magnitude.axis] = -1
    effective = merged * (magnitude.values.to(base).view(shape) / norm) - base
    return dense(effective.to(factors.down.device))
