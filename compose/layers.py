"""The composable layer: one wrapper per targeted Linear/Conv2d holding every active LoRA.

For a base layer ``W`` and active LoRAs ``1..N`` with down factors ``A_i`` (rank ``r_i``
x in) and up factors ``B_i`` (out x ``r_i``, alpha/rank folded in), the wrapper computes

    y = W x + B_cat ( m ⊙ A_cat x ),   A_cat = [A_1; ...; A_N],  B_cat = [B_1 ... B_N]

where ``m`` has one weight per batch row and LoRA, expanded over each LoRA's rank rows.
Two GEMMs serve any number of LoRAs, and ``m`` expresses every composition method: a
sum (Merge), a one-hot that changes with the step (Switch), one LoRA per batch-row
group (Composite in one UNet call) or a one-hot per layer (K-LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BASE_LAYERS = (nn.Linear, nn.Conv2d)


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


class WeightState:
    """The weights ``m`` that every composable layer of one model reads.

    ``weights`` is ``None`` (LoRAs off), a ``(rows, N)`` tensor shared by all layers, or
    a ``(L, rows, N)`` tensor with one slice per layer (``layer.index``). ``rows`` is the
    UNet batch size or 1 (broadcast over the batch).
    """

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    def for_layer(self, index: int) -> torch.Tensor | None:
        w = self.weights
        if w is None or w.dim() == 2:
            return w
        return w[index]


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

    def set_factors(self, entries: list[tuple[int, Factors]]) -> None:
        """Stack the factors of the active LoRAs that target this layer.

        ``entries`` pairs each LoRA's column in ``m`` with its factors; an empty list
        makes the layer cost what the base layer costs.
        """
        if not entries:
            self.down = self.up = self.owner = None
            return
        weight = self.base.weight
        self.down = torch.cat([f.down for _, f in entries]).to(weight)
        self.up = torch.cat([f.up for _, f in entries], dim=1).to(weight)
        self.owner = torch.cat([torch.full((f.rank,), column, dtype=torch.long) for column, f in entries]).to(
            weight.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.state.for_layer(self.index)
        if self.down is None or w is None:
            return y
        m = w[:, self.owner].to(x.dtype)
        if isinstance(self.base, nn.Conv2d):
            h = F.conv2d(x, self.down, None, self.base.stride, self.base.padding, self.base.dilation)
            h = h * m[:, :, None, None]
            return y + F.conv2d(h, self.up)
        h = F.linear(x, self.down)
        h = h * m.view(m.shape[0], *([1] * (h.dim() - 2)), m.shape[1])
        return y + F.linear(h, self.up)

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
    loaded LoRA does any more; the base weights are never copied or reloaded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = WeightState()
        self.layers: dict[str, ComposableLayer] = {}

    def wrap(self, name: str) -> ComposableLayer:
        if name in self.layers:
            return self.layers[name]
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = ComposableLayer(getattr(parent, child), self.state, len(self.layers))
        setattr(parent, child, layer)
        self.layers[name] = layer
        return layer

    def unwrap_unused(self, targeted: set[str]) -> None:
        """Restore every base module that no loaded LoRA targets, and renumber the rest."""
        for name in [n for n in self.layers if n not in targeted]:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, self.layers.pop(name).base)
        for index, layer in enumerate(self.layers.values()):
            layer.index = index

    def activate(self, factors_per_lora: list[dict[str, Factors]]) -> None:
        """Stack, in every layer, the factors of these LoRAs (column j = LoRA j)."""
        for name, layer in self.layers.items():
            layer.set_factors([(j, table[name]) for j, table in enumerate(factors_per_lora) if name in table])

    def __len__(self) -> int:
        return len(self.layers)
