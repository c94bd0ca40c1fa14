"""``torch.compile`` for the UNet, with the composable layers in static mode.

:class:`CompiledUNet` stands where the loop calls the UNet. Its layers hold fixed-
capacity buffers (:meth:`compose.layers.LayerRegistry.make_static`), so what dynamo
traces does not change when LoRAs are loaded, unloaded or re-weighted, or when N or the
method changes within the capacity. Two graphs exist, each compiled on first use and
then cached: *folded* (every row of the call shares its weights: Merge, Switch, K-LoRA,
scheduled weights; the base layers run on ``W + Σ w_i B_i A_i``) and *stacked* (per-row
weights: Composite, CMLoRA, the adaptive mixes; the padded dense form, with the batch
dimension marked dynamic, since it is ``2N`` rows per image).

Passes that patch the UNet (CMLoRA's deep-feature cache, K-LoRA's trace of the layer
order) run the eager module: :func:`eager` marks them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .layers import WeightState

_EAGER: set[int] = set()


@contextmanager
def eager(unet: nn.Module) -> Iterator[None]:
    """Within the block, calls of ``unet`` through a :class:`CompiledUNet` run eagerly
    (for passes that replace block forwards or add hooks, which a compiled graph would
    recompile for)."""
    key = id(unet)
    nested = key in _EAGER
    _EAGER.add(key)
    try:
        yield
    finally:
        if not nested:
            _EAGER.discard(key)


class CompiledUNet:
    """Calls ``torch.compile(unet)``, or ``unet`` itself inside :func:`eager`."""

    def __init__(self, unet: nn.Module, state: WeightState, backend: str = "inductor", **options) -> None:
        self.unet = unet
        self.state = state
        self.compiled = torch.compile(unet, backend=backend, **options)

    def __call__(self, sample: torch.Tensor, timestep, **kwargs):
        if id(self.unet) in _EAGER:
            return self.unet(sample, timestep, **kwargs)
        if not self.state.folded:
            for tensor in (sample, kwargs.get("encoder_hidden_states"), self.state.weights):
                if tensor is not None:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0 if tensor is not self.state.weights else 1)
            for tensor in (kwargs.get("added_cond_kwargs") or {}).values():
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.compiled(sample, timestep, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.unet, name)
