"""CMLoRA (Zou et al., ICLR 2025): cached, frequency-ordered multi-LoRA composition.

Like Composite, LoRA ``j`` alone predicts ``(uncond_j, cond_j)`` in its own branch, but
the predictions are *weighted*: the step's dominant LoRA gets ``c / (c + N - 1)`` and
every other ``1 / (c + N - 1)``, ``c = N - 0.5``, before guidance.

**Order.** LoRAs are split into a high-frequency group H and a low-frequency group L:
by the high-frequency score of their single-LoRA images (:mod:`compose.frequency`,
H ordered by score, L where the sorted scores show a gap of at least ``split_gap``
times the highest score), or by category (H = style, character, clothing, object;
L = background). Before ``switch_at`` of the steps the dominant LoRA cycles through H,
after it through L (through H throughout when L is empty), advancing at every refresh
step.

**Cache.** Refresh steps follow ``schedule``: ``"nonuniform"`` (every ``c1`` steps in
the first 37.5% of the steps, every ``c2`` until 87.5%, every ``c1`` after),
``"uniform"`` (every ``interval`` steps) or ``"off"`` (every step). At a refresh step
every branch runs the full UNet and its deep features are captured; in between, the
dominant branch runs in full and the others reuse their deep features
(:class:`~compose.feature_cache.DeepFeatureCache`), computing only the shallow branch.
``cache=False`` keeps the schedule but runs every branch in full.

Departures from the released code, which never uses its cache in non-uniform mode,
switches phase at a hard-coded step 120 (of 200), hard-codes the ComposLoRA category
ids, resets a copy of its cache list (a no-op) and measures frequency online on an
empty radius range (NaN): here the cache is used in every schedule, the phase switch
and the schedule are fractions of the step count, categories come from the LoRA
records, each refresh recaptures every branch, and the frequency analysis runs on
images at their own size with the radius scaled to it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..feature_cache import DeepFeatureCache
from ..loading import LoRA
from .base import CompositionMethod, MethodContext, UNetRun, guided_mix

HIGH_CATEGORIES = ("style", "character", "clothing", "object")
SCHEDULES = ("nonuniform", "uniform", "off")
ORDERINGS = ("frequency", "category")


def refresh_steps(schedule: str, steps: int, interval: int = 2, c1: int = 2, c2: int = 3) -> list[int]:
    """The steps at which every branch runs in full (step 0 always does)."""
    if schedule == "off":
        return list(range(steps))
    if schedule == "uniform":
        return list(range(0, steps, interval))
    if schedule != "nonuniform":
        raise ValueError(f"CMLoRA schedule must be one of {SCHEDULES}, got {schedule!r}")
    first, second = int(0.375 * steps), int(0.875 * steps)
    return sorted({0, *range(0, first, c1), *range(first, second, c2), *range(second, steps, c1)})


def dominance_weights(n: int) -> tuple[float, float]:
    """``(w_dominant, w_other)`` with ``c = N - 0.5``; they sum to 1 over N LoRAs."""
    c = n - 0.5
    return c / (c + n - 1), 1 / (c + n - 1)


@dataclass
class CMLoRA(CompositionMethod):
    """CMLoRA; see the module docstring."""

    name = "cmlora"
    ordering: str = "frequency"
    switch_at: float = 0.6
    schedule: str = "nonuniform"
    interval: int = 2
    c1: int = 2
    c2: int = 3
    cache: bool = True
    split_gap: float = 0.15

    def __post_init__(self) -> None:
        if self.ordering not in ORDERINGS:
            raise ValueError(f"CMLoRA ordering must be one of {ORDERINGS}, got {self.ordering!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"CMLoRA schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.switch_at <= 1.0:
            raise ValueError(f"CMLoRA switch_at is a fraction of the steps, got {self.switch_at}")
        if min(self.interval, self.c1, self.c2) < 1:
            raise ValueError("CMLoRA intervals must be at least 1")

    @property
    def needs_frequency(self) -> bool:
        return self.ordering == "frequency"

    def groups(self, loras: list[LoRA], frequency: dict[str, float]) -> tuple[list[int], list[int]]:
        """Indices of the high- and low-frequency groups, each in dominance order."""
        if self.ordering == "category":
            high = [j for j, lora in enumerate(loras) if lora.category != "background"]
            rank = {c: k for k, c in enumerate(HIGH_CATEGORIES)}
            high.sort(key=lambda j: rank.get(loras[j].category, len(rank)))
            return high, [j for j, lora in enumerate(loras) if lora.category == "background"]
        missing = [lora.name for lora in loras if lora.name not in frequency]
        if missing:
            raise ValueError(f"CMLoRA frequency ordering needs the frequency scores of {missing}")
        order = sorted(range(len(loras)), key=lambda j: -frequency[loras[j].name])
        scores = [frequency[loras[j].name] for j in order]
        gaps = [scores[k] - scores[k + 1] for k in range(len(scores) - 1)]
        if gaps and max(gaps) >= self.split_gap * abs(scores[0]):
            cut = gaps.index(max(gaps)) + 1
            return order[:cut], order[cut:]
        return order, []

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        n, steps = len(context.loras), context.num_steps
        self.high, self.low = self.groups(context.loras, context.frequency)
        self.refresh = set(refresh_steps(self.schedule, steps, self.interval, self.c1, self.c2))
        switch = round(self.switch_at * steps)
        self.dominant: list[int] = []
        advanced = {True: -1, False: -1}
        for step in range(steps):
            early = step < switch or not self.low
            group = self.high if (early and self.high) else self.low
            if step in self.refresh or advanced[early] < 0:
                advanced[early] += 1
            self.dominant.append(group[advanced[early] % len(group)])
        w_dom, w_other = dominance_weights(n)
        self.mix = torch.full((steps, n), w_other)
        self.mix[torch.arange(steps), torch.tensor(self.dominant)] = w_dom
        self.mix = self.mix.to(context.weights)
        self.branch_weights = torch.diag(context.weights)
        self.features = DeepFeatureCache(context.unet) if self.cache and context.unet is not None else None
        self.passes = {"full": 0, "shallow": 0}

    def weights(self, step: int) -> torch.Tensor:
        return self.branch_weights

    def predict(self, step: int, run: UNetRun) -> torch.Tensor:
        n = len(self.context.loras)
        if self.features is None or step in self.refresh:
            self.passes["full"] += n
            with self.features.capture(list(range(n))) if self.features is not None else nullcontext():
                return run(self.branch_weights)
        dom = self.dominant[step]
        others = [j for j in range(n) if j != dom]
        self.passes["full"] += 1
        self.passes["shallow"] += len(others)
        parts = {dom: run(self.branch_weights[dom : dom + 1])}
        if others:
            with self.features.reuse(others):
                for j, eps in zip(others, run(self.branch_weights[others]).chunk(len(others)), strict=True):
                    parts[j] = eps
        return torch.cat([parts[j] for j in range(n)])

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        """The dominance-weighted sum of the branches' predictions, then guidance."""
        return guided_mix(self.mix[step].view(-1, *([1] * (cond.dim() - 1))), uncond, cond, guidance_scale)
