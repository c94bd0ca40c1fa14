"""A DeepCache-style feature cache for a diffusers ``UNet2DConditionModel``.

The UNet's *shallow branch* (``conv_in``, the first down block, the last up block,
``conv_out``) sees the full resolution; its *deep branch* (the other down blocks, the
mid block and the other up blocks) changes slowly from one denoising step to the next.
A full pass can :meth:`capture` the deep blocks' outputs; a later pass can
:meth:`reuse` them, so that only the shallow branch is computed. Outputs are kept per
*branch* (a group of batch rows, e.g. one LoRA of a composition), so a pass may reuse
the features of any subset of the branches that were captured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .compiled import eager


def _map(fn, value):
    if isinstance(value, tuple):
        return tuple(_map(fn, v) for v in value)
    return fn(value)


def _cat(values: list):
    if isinstance(values[0], tuple):
        return tuple(_cat([v[i] for v in values]) for i in range(len(values[0])))
    return torch.cat(values)


class DeepFeatureCache:
    """Captures and replays the deep blocks of ``unet``; see the module docstring."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.blocks: list[nn.Module] = [
            *unet.down_blocks[1:],
            unet.mid_block,
            *unet.up_blocks[:-1],
        ]
        self.branches: dict[int, list] = {}

    @contextmanager
    def _patched(self, make_forward) -> Iterator[None]:
        """Give every deep block a temporary ``forward``, restoring any instance-level
        ``forward`` that was there before (accelerate's offload hooks put one). A compiled
        UNet runs its eager module meanwhile (:func:`compose.compiled.eager`)."""
        previous = [block.__dict__.get("forward") for block in self.blocks]
        for k, block in enumerate(self.blocks):
            block.forward = make_forward(k, block.forward)
        try:
            with eager(self.unet):
                yield
        finally:
            for block, old in zip(self.blocks, previous, strict=True):
                if old is None:
                    del block.forward
                else:
                    block.forward = old

    @contextmanager
    def capture(self, branches: list[int]) -> Iterator[None]:
        """Record the deep outputs of the passes inside; their batch is ``branches``,
        in order, each branch an equal number of rows."""
        outputs: list[list] = [[] for _ in self.blocks]

        def make_forward(k, forward):
            def recording(*args, **kwargs):
                out = forward(*args, **kwargs)
                outputs[k].append(_map(torch.Tensor.detach, out))
                return out

            return recording

        with self._patched(make_forward):
            yield
        for k, chunks in enumerate(outputs):
            full = _cat(chunks)
            for i, branch in enumerate(branches):
                rows = _map(lambda t, i=i: t.chunk(len(branches))[i], full)
                self.branches.setdefault(branch, [None] * len(self.blocks))[k] = rows

    @contextmanager
    def reuse(self, branches: list[int]) -> Iterator[None]:
        """Inside, the deep blocks return the captured outputs of ``branches`` (in batch
        order) instead of computing; passes may split the batch into several calls."""
        missing = [b for b in branches if b not in self.branches]
        if missing:
            raise RuntimeError(f"no captured features for branches {missing}")
        stored = [_cat([self.branches[b][k] for b in branches]) for k in range(len(self.blocks))]
        offsets = [0] * len(self.blocks)

        def make_forward(k, forward):
            def replay(*args, **kwargs):
                rows = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]
                start = offsets[k]
                offsets[k] += rows
                return _map(lambda t: t[start : start + rows], stored[k])

            return replay

        with self._patched(make_forward):
            yield
