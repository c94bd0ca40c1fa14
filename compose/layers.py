"""The composable layer: one wrapper per targeted Linear/Conv2d holding every active LoRA.

For a base layer ``W`` and active LoRAs ``1..N`` with down factors ``A_i`` (rank ``r_i``
x in) and up factors ``B_i`` (out x ``r_i``, alpha/rank folded in), the wrapper computes

    y = W x + B_cat ( m ⊙ A_cat x ),   A_cat = [A_1; ...; A_N],  B_cat = [B_1 ... B_N]

where ``m`` has one weight per batch row and LoRA, expanded over each LoRA's rank rows.
Two GEMMs serve any number of LoRAs, and ``m`` expresses every composition method: a
sum (Merge), a one-hot that changes with the step (Switch), one LoRA per batch-row
group (Composite in one UNet call) or a one-hot per layer (K-LoRA).

How a call is computed depends on what is known of ``m`` without a host sync (its
values are free to read when they live on the CPU, as they do for CPU generations):

- **folded** (eager): when every row of the call has the same weights, the layer uses
  ``W' = W + Σ_i m_i B_i A_i`` computed once for those weights and kept until they
  change or the generation ends, so the call costs the base layer alone. ``W`` itself
  is never written: ``W'`` is a separate tensor, dropped by :meth:`LayerRegistry.release`,
  so restoring the base weights is exact. A layer folds a new set of weights where that
  is cheaper than the unfused form over the calls it is expected to hold (constant
  weights: the whole generation; scheduled weights: one step, so only layers whose
  input has many positions fold);
- **active only** (eager): otherwise each group of consecutive batch rows with the
  same non-zero LoRAs computes only those LoRAs' rank rows (Switch and K-LoRA steps,
  CMLoRA's and Composite's branches cost one LoRA each, at any N);
- **dense**: the stacked form above, when the weights live on an accelerator (reading
  them would cost a host sync per call, more than the few extra rank rows there) or
  gradients are needed (the demo world's LoRA training);
- **routed** (:class:`Routes`): each LoRA confined to part of the picture, ``m`` times a
  mask per LoRA and *position* (a latent pixel, or a text token in the cross-attention's
  key and value projections); the stacked form with ``m`` per row, position and rank row.
  Only a method that asks for routes pays for them;
- **static** (compiled, :meth:`LayerRegistry.make_static`): fixed-capacity buffers of
  ``capacity`` LoRA slots padded to ``max_rank`` rows each, weights always a padded
  ``(L, rows, capacity)`` tensor, so that loading, unloading and re-weighting LoRAs or
  changing N up to the capacity never changes what ``torch.compile`` traced. Calls whose
  rows share their weights run a *folded* graph (base layers on ``W'``, no LoRA op);
  the others the padded dense form (a compiled graph cannot slice by values).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BASE_LAYERS = (nn.Linear, nn.Conv2d)
MAX_SEGMENTS = 16
"""More row groups than this in one call run the dense form (a Python loop per group)."""
logger = logging.getLogger("compose")


@dataclass
class Factors:
    """One LoRA's factors for one module, alpha/rank already folded into ``down``.

    Linear: ``down`` (r, in), ``up`` (out, r). Conv2d: ``down`` (r, in, kh, kw) with
    the base layer's stride and padding, ``up`` (out, r, 1, 1).
    """

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LayerPlan:
    """What one layer computes in one call: ``segments`` ``(start, end, columns)``, the
    batch rows ``[start, end)`` and the LoRA columns of ``m`` that are non-zero there;
    ``values`` the weights of every column when all rows share them (else ``None``)."""

    segments: tuple[tuple[int, int, tuple[int, ...]], ...]
    values: tuple[float, ...] | None


@dataclass(frozen=True)
class Routes:
    """Where each LoRA acts, for methods that confine LoRAs to regions.

    ``spatial`` ``(B, N, H, W)``: LoRA ``j``'s weight multiplier at each latent pixel of
    image ``b`` (``H x W`` the latent's size; a layer working at a coarser resolution
    reads the area average). ``tokens`` ``(N, T)``: its multiplier at each text token,
    for the layers whose input is the prompt's encoding (the cross-attention's key and
    value projections), where a position is a token, not a pixel. Either may be ``None``
    (no confinement there). All ones is the unconfined layer, exactly."""

    spatial: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


TEXT_SIDE = ("attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj")
"""Module name endings whose input is the text encoding (positions are tokens)."""


def _plan(nonzero: list[list[bool]], uniform: bool, first: list[float]) -> LayerPlan:
    segments: list[tuple[int, int, tuple[int, ...]]] = []
    for row, flags in enumerate(nonzero):
        columns = tuple(j for j, flag in enumerate(flags) if flag)
        if segments and segments[-1][2] == columns:
            segments[-1] = (segments[-1][0], row + 1, columns)
        else:
            segments.append((row, row + 1, columns))
    return LayerPlan(tuple(segments), tuple(first) if uniform else None)


class WeightState:
    """The weights ``m`` that every composable layer of one model reads.

    ``weights`` is ``None`` (LoRAs off), a ``(rows, N)`` tensor shared by all layers, or
    a ``(L, rows, N)`` tensor with one slice per layer (``layer.index``). ``rows`` is the
    UNet batch size or 1 (broadcast over the batch).

    ``sliced`` and ``fold`` switch the eager path's active-only and folded forms off (for
    comparison); ``expected_calls`` is how many calls a generation's first weights are
    expected to hold (the loop sets the step count), which decides where folding pays.
    """

    def __init__(self) -> None:
        self._weights: torch.Tensor | None = None
        self._plans: list[LayerPlan] | LayerPlan | None = None
        self._analysed = False
        self.sliced = True
        self.fold = True
        self.expected_calls = 1
        self.layers: list[ComposableLayer] = []
        self.static: tuple[int, int] | None = None
        """``(capacity, max_rank)`` once :meth:`LayerRegistry.make_static` ran."""
        self.folded = False
        """Static mode: this call runs the folded graph (every row shares its weights)."""
        self.routes: Routes | None = None
        """This call's :class:`Routes` (rows of ``spatial`` already one per batch row), or ``None``."""
        self._route_cache: dict[tuple, torch.Tensor] = {}

    def route_masks(self, spatial: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``spatial`` ``(rows, N, H, W)`` averaged down to ``size`` and flattened:
        ``(rows, N, h * w)``, computed once per call and resolution."""
        key = (spatial.data_ptr(), tuple(spatial.shape), size)
        hit = self._route_cache.get(key)
        if hit is None:
            pooled = spatial if spatial.shape[-2:] == size else F.adaptive_avg_pool2d(spatial, size)
            hit = self._route_cache[key] = pooled.flatten(2)
        return hit

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._plans, self._analysed = None, False
        self._route_cache = {}
        if self.static is None or value is None:
            self._weights, self.folded = value, False
            return
        self._set_static(value)

    def for_layer(self, index: int) -> torch.Tensor | None:
        w = self.weights
        if w is None or w.dim() == 2:
            return w
        return w[index]

    def plan(self, index: int) -> LayerPlan | None:
        """Layer ``index``'s plan for this call, or ``None`` where only the dense form can
        run (weights on an accelerator, gradients on, too many row groups)."""
        if not self._analysed:
            self._plans = self._analyse(self._weights)
            self._analysed = True
        plans = self._plans
        return plans if plans is None or isinstance(plans, LayerPlan) else plans[index]

    def _analyse(self, w: torch.Tensor | None) -> list[LayerPlan] | LayerPlan | None:
        if w is None or w.device.type != "cpu" or not self.sliced or torch.is_grad_enabled():
            return None
        nonzero = (w != 0).tolist()
        uniform = (w == w[..., :1, :]).all(-1).all(-1).tolist()
        first = w[..., 0, :].tolist()
        if w.dim() == 2:
            plans: list[LayerPlan] | LayerPlan = _plan(nonzero, uniform, first)
            count = len(plans.segments)
        else:
            plans = [_plan(*args) for args in zip(nonzero, uniform, first, strict=True)]
            count = max((len(p.segments) for p in plans), default=0)
        return None if count > MAX_SEGMENTS else plans

    # -- static (compiled) mode ----------------------------------------------------------

    def _set_static(self, value: torch.Tensor) -> None:
        capacity, _ = self.static
        layers = len(self.layers)
        n = value.shape[-1]
        if n > capacity:
            raise ValueError(f"{n} LoRAs in one call, over the compiled capacity of {capacity}")
        rows = value.shape[-2]
        full = torch.zeros(layers, rows, capacity, dtype=value.dtype, device=value.device)
        full[..., :n] = value
        self._weights = full
        plans = self._analyse(value) if value.device.type == "cpu" and self.fold else None
        if plans is None:
            self.folded = False
        elif isinstance(plans, LayerPlan):
            self.folded = plans.values is not None
            if self.folded:
                for layer in self.layers:
                    layer.fold_static(plans)
        else:
            self.folded = all(p.values is not None for p in plans)
            if self.folded:
                for layer, p in zip(self.layers, plans, strict=True):
                    layer.fold_static(p)
        self._plans, self._analysed = None, True


class ComposableLayer(nn.Module):
    """Wraps a ``Linear`` or ``Conv2d``; see the module docstring for the computation."""

    def __init__(self, base: nn.Linear | nn.Conv2d, state: WeightState, index: int) -> None:
        super().__init__()
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"cannot compose LoRAs on {type(base).__name__}")
        self.base = base
        self.state = state
        self.index = index
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        self.owner: torch.Tensor | None = None
        self.spans: dict[int, tuple[int, int]] = {}
        """Column of ``m`` -> the rank rows ``[start, end)`` of that LoRA in the stack."""
        self.entries: list[tuple[int, Factors]] = []
        self.static: tuple[int, int] | None = None
        self.weight_eff: torch.Tensor | None = None
        """Static mode: the weight the folded graph uses (``W'``, or ``W`` detached)."""
        self.text_side = False
        """Whether this layer's input is the text encoding (set by :meth:`LayerRegistry.wrap`)."""
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._slices: dict[tuple[int, ...], tuple[tuple[int, ...], tuple | None]] = {}
        self._fold_key: tuple | None = None
        self._fold_weight: torch.Tensor | None = None
        self._run = 0
        self._expected = 1
        if self.static is not None:
            self.weight_eff = self.base.weight.detach()

    def set_factors(self, entries: list[tuple[int, Factors]]) -> None:
        """Stack the factors of the active LoRAs that target this layer.

        ``entries`` pairs each LoRA's column in ``m`` with its factors; an empty list
        makes the layer cost what the base layer costs.
        """
        self.entries = list(entries)
        self._reset_caches()
        if self.static is not None:
            self._fill_static()
            return
        if not entries:
            self.down = self.up = self.owner = None
            self.spans = {}
            return
        weight = self.base.weight
        self.down = torch.cat([f.down for _, f in entries]).to(weight)
        self.up = torch.cat([f.up for _, f in entries], dim=1).to(weight)
        self.owner = torch.cat([torch.full((f.rank,), column, dtype=torch.long) for column, f in entries]).to(
            weight.device
        )
        self.spans, start = {}, 0
        for column, f in entries:
            self.spans[column] = (start, start + f.rank)
            start += f.rank

    def release(self) -> None:
        """Drop the folded weights and cached slices (the base weights were never written)."""
        self._reset_caches()

    # -- forward -----------------------------------------------------------------------

    def _base_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Conv2d):
            return self.base._conv_forward(x, weight, self.base.bias)
        return F.linear(x, weight, self.base.bias)

    def _lora(self, x: torch.Tensor, m: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``B (m ⊙ A x)`` for ``m`` ``(rows, r)``, one weight per row and rank row."""
        m = m.to(x.dtype)
        if isinstance(self.base, nn.Conv2d):
            h = F.conv2d(x, down, None, self.base.stride, self.base.padding, self.base.dilation)
            return F.conv2d(h * m[:, :, None, None], up)
        h = F.linear(x, down)
        return F.linear(h * m.view(m.shape[0], *([1] * (h.dim() - 2)), m.shape[1]), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static is not None:
            return self._static_forward(x)
        w = self.state.for_layer(self.index)
        if self.down is None or w is None:
            return self.base(x)
        if self.state.routes is not None:
            return self.base(x) + self._routed(x, w)
        plan = self.state.plan(self.index)
        if plan is None:
            return self.base(x) + self._lora(x, w[:, self.owner], self.down, self.up)
        if plan.values is not None and self.state.fold:
            columns, _ = self._select(plan.segments[0][2])
            if not columns:
                return self.base(x)
            folded = self._folded(x, w, columns, tuple(plan.values[c] for c in columns))
            if folded is not None:
                return self._base_with(x, folded)
        y = self.base(x)
        whole = len(plan.segments) == 1
        for start, end, wanted in plan.segments:
            columns, selected = self._select(wanted)
            if not columns:
                continue
            down, up, owner = selected
            if whole:
                y = y + self._lora(x, w[:, owner], down, up)
            else:
                y[start:end] += self._lora(x[start:end], w[start:end, owner], down, up)
        return y

    def _routed(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``B (m ⊙ A x)`` with ``m`` per row, position and rank row: the row's weights
        times each LoRA's route mask at this layer's positions (see :class:`Routes`)."""
        routes = self.state.routes
        m = w[:, self.owner].to(x.dtype)  # (rows, r)
        conv = isinstance(self.base, nn.Conv2d)
        if self.text_side:
            if routes.tokens is None:
                return self._lora(x, w[:, self.owner], self.down, self.up)
            tokens = routes.tokens
            if tokens.shape[1] < x.shape[1]:  # chunks padded to the negative prompt's length
                tokens = F.pad(tokens, (0, x.shape[1] - tokens.shape[1]), value=1.0)
            position = tokens[self.owner].T.to(x)[None]  # (1, T, r)
        elif routes.spatial is None:
            return self._lora(x, w[:, self.owner], self.down, self.up)
        else:
            height, width = routes.spatial.shape[-2:]
            if conv:
                size = (x.shape[-2] // self.base.stride[0], x.shape[-1] // self.base.stride[1])
            else:
                scale = math.sqrt(height * width / x.shape[1])
                size = (round(height / scale), round(width / scale))
                if size[0] * size[1] != x.shape[1]:
                    raise ValueError(f"{x.shape[1]} positions do not tile a {height}x{width} latent")
            masks = self.state.route_masks(routes.spatial, size)  # (rows, N, P)
            position = masks[:, self.owner].transpose(1, 2).to(x)  # (rows, P, r)
        scale = m[:, None, :] * position  # (rows, P, r)
        if conv:
            h = F.conv2d(x, self.down, None, self.base.stride, self.base.padding, self.base.dilation)
            h = h * scale.transpose(1, 2).reshape(*scale.shape[:1], -1, *h.shape[-2:])
            return F.conv2d(h, self.up)
        return F.linear(F.linear(x, self.down) * scale, self.up)

    def _select(self, wanted: tuple[int, ...]) -> tuple[tuple[int, ...], tuple | None]:
        """The columns of ``wanted`` this layer holds and their ``(down, up, owner)``."""
        hit = self._slices.get(wanted)
        if hit is not None:
            return hit
        columns = tuple(c for c in wanted if c in self.spans)
        if not columns:
            selected = None
        elif len(columns) == len(self.spans):
            selected = (self.down, self.up, self.owner)
        else:
            index = torch.cat([torch.arange(*self.spans[c]) for c in columns]).to(self.owner.device)
            selected = (self.down[index], self.up[:, index].contiguous(), self.owner[index])
        self._slices[wanted] = (columns, selected)
        return columns, selected

    def _fold_pays(self, x: torch.Tensor, rank: int, calls: float) -> bool:
        """Whether folding ``rank`` rows costs less than ``calls`` unfused calls like this one."""
        weight = self.base.weight
        out, inner = weight.shape[0], weight[0].numel()
        if isinstance(self.base, nn.Conv2d):
            sh, sw = self.base.stride
            positions = x.shape[0] * max(1, x.shape[-2] // sh) * max(1, x.shape[-1] // sw)
        else:
            positions = x.numel() // inner
        return calls * positions * rank * (inner + out) >= out * inner * (rank + 1)

    def _folded(self, x, w, columns: tuple[int, ...], values: tuple[float, ...]) -> torch.Tensor | None:
        """``W'`` for these weights, or ``None`` while the unfused form is cheaper: over the
        calls the previous weights held (the generation's first weights: ``expected_calls``),
        or the calls these have held so far, whichever is more."""
        if self.base.weight.device != x.device or hasattr(self.base, "_hf_hook"):
            return None
        key = (columns, values)
        if key != self._fold_key:
            expected = self._run if self._fold_key is not None else max(1, self.state.expected_calls)
            self._fold_key, self._fold_weight, self._run, self._expected = key, None, 0, expected
        self._run += 1
        if self._fold_weight is None:
            _, (down, _, _) = self._select(columns)
            if self._fold_pays(x, down.shape[0], max(self._expected, self._run)):
                self._fold_weight = self._fold(w, columns)
        return self._fold_weight

    def _fold(self, w: torch.Tensor, columns: tuple[int, ...]) -> torch.Tensor:
        """``W + Σ_i m_i B_i A_i`` over ``columns``, ``m`` the first row of ``w`` (all rows
        agree), computed in float32 and cast to the base weight's dtype."""
        _, (down, up, owner) = self._select(columns)
        weight = self.base.weight
        m = w[0, owner].float()
        delta = (up.flatten(1).float() * m) @ down.flatten(1).float()
        return (weight.float() + delta.view_as(weight)).to(weight.dtype)

    # -- static (compiled) mode ----------------------------------------------------------

    def make_static(self, capacity: int, max_rank: int) -> None:
        """Fixed buffers of ``capacity`` slots of ``max_rank`` rows; slot ``j`` is column ``j``."""
        weight = self.base.weight
        rows = capacity * max_rank
        self.static = (capacity, max_rank)
        self.down = weight.new_zeros(rows, *weight.shape[1:])
        self.up = weight.new_zeros(weight.shape[0], rows, *([1, 1] if weight.dim() == 4 else []))
        self.owner = None
        self._fill_static()
        self._reset_caches()

    def _fill_static(self) -> None:
        capacity, max_rank = self.static
        self.down.zero_()
        self.up.zero_()
        self.spans = {}
        for column, f in self.entries:
            if column >= capacity or f.rank > max_rank:
                raise ValueError(f"LoRA column {column} of rank {f.rank} is over the static capacity")
            start = column * max_rank
            self.down[start : start + f.rank].copy_(f.down)
            self.up[:, start : start + f.rank].copy_(f.up)
            self.spans[column] = (start, start + f.rank)

    def fold_static(self, plan: LayerPlan) -> None:
        """Static mode: set :attr:`weight_eff` for the folded graph from this call's weights."""
        columns = tuple(c for c in plan.segments[0][2] if c in self.spans)
        key = (columns, tuple(plan.values[c] for c in columns))
        if key == self._fold_key:
            return
        self._fold_key = key
        weight = self.base.weight
        if not columns:
            self.weight_eff = weight.detach()
            return
        delta = torch.zeros(weight.shape[0], weight[0].numel(), dtype=torch.float32, device=weight.device)
        for c, value in zip(columns, key[1], strict=True):
            start, end = self.spans[c]
            delta += value * (self.up[:, start:end].flatten(1).float() @ self.down[start:end].flatten(1).float())
        self.weight_eff = (weight.float() + delta.view_as(weight)).to(weight.dtype)

    def _static_forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.routes is not None:
            raise ValueError("a method that routes LoRAs to regions does not run on a compiled UNet; drop --compile")
        if state.folded:
            return self._base_with(x, self.weight_eff)
        w = state.weights
        if w is None:
            return self.base(x)
        m = w[self.index].repeat_interleave(self.static[1], dim=1)
        return self.base(x) + self._lora(x, m, self.down, self.up)

    def extra_repr(self) -> str:
        rank = 0 if self.down is None else self.down.shape[0]
        return f"index={self.index}, stacked_rank={rank}"


def get_submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule called ``name``, looking through composable wrappers; ``None`` if absent."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module.base if isinstance(module, ComposableLayer) else module


class LayerRegistry:
    """The composable layers of one model (a UNet or a text encoder) and their weights.

    Modules are wrapped the first time a loaded LoRA targets them and restored when no
    loaded LoRA does any more (in static mode they stay wrapped, so that the compiled
    graph keeps its modules); the base weights are never copied, written or reloaded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = WeightState()
        self.layers: dict[str, ComposableLayer] = {}

    def _sync(self) -> None:
        self.state.layers = list(self.layers.values())

    def wrap(self, name: str) -> ComposableLayer:
        if name in self.layers:
            return self.layers[name]
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = ComposableLayer(getattr(parent, child), self.state, len(self.layers))
        layer.text_side = name.endswith(TEXT_SIDE)
        if self.state.static is not None:
            layer.make_static(*self.state.static)
        setattr(parent, child, layer)
        self.layers[name] = layer
        self._sync()
        return layer

    def unwrap_unused(self, targeted: set[str]) -> None:
        """Restore every base module that no loaded LoRA targets, and renumber the rest."""
        if self.state.static is not None:
            return
        for name in [n for n in self.layers if n not in targeted]:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, self.layers.pop(name).base)
        for index, layer in enumerate(self.layers.values()):
            layer.index = index
        self._sync()

    def activate(self, factors_per_lora: list[dict[str, Factors]]) -> None:
        """Stack, in every layer, the factors of these LoRAs (column j = LoRA j)."""
        static = self.state.static
        if static is not None:
            rank = max((f.rank for table in factors_per_lora for f in table.values()), default=1)
            if len(factors_per_lora) > static[0] or rank > static[1]:
                grown = (max(static[0], len(factors_per_lora)), max(static[1], rank))
                logger.info("compiled LoRA capacity grows from %s to %s (one recompilation)", static, grown)
                self.make_static(*grown)
        for name, layer in self.layers.items():
            layer.set_factors([(j, table[name]) for j, table in enumerate(factors_per_lora) if name in table])

    def release(self) -> None:
        """End of a generation: every layer drops its folded weights; the base weights are
        the original tensors, untouched."""
        self.state.weights = None
        for layer in self.layers.values():
            layer.release()

    def make_static(self, capacity: int, max_rank: int) -> None:
        """Switch to fixed-capacity buffers (see the module docstring) for ``torch.compile``."""
        self.state.static = (capacity, max_rank)
        for layer in self.layers.values():
            layer.make_static(capacity, max_rank)
        self._sync()

    def __len__(self) -> int:
        return len(self.layers)


def fit_factors(base: nn.Module, f: Factors) -> Factors | None:
    """The factors shaped for ``base`` (1x1 convolutions and linears interchange) and in its
    floating dtype, so that a half-precision model keeps no float32 copy of them; ``None``
    when they do not fit."""
    down, up = f.down, f.up
    if isinstance(base, nn.Linear):
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)
        ok = down.dim() == 2 and down.shape[1] == base.in_features and up.shape[0] == base.out_features
    elif isinstance(base, nn.Conv2d):
        if down.dim() == 2 and down.shape[1] == base.weight[0].numel():  # a kernel stored flattened (LyCORIS)
            down, up = down.reshape(-1, *base.weight.shape[1:]), up[:, :, None, None]
        ok = (
            down.dim() == 4
            and base.groups == 1
            and down.shape[1:] == (base.in_channels, *base.kernel_size)
            and up.shape[0] == base.out_channels
        )
    else:
        return None
    if not ok:
        return None
    dtype = base.weight.dtype if base.weight.is_floating_point() else down.dtype
    return Factors(down.to(dtype), up.to(dtype))
