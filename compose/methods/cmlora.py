"""CMLoRA (Zou et al., ICLR 2025): cached, frequency-ordered multi-LoRA composition.

Like Composite, LoRA ``j`` alone predicts ``(uncond_j, cond_j)`` in its own branch, but
the predictions are *weighted*: the step's dominant LoRA gets ``c / (c + N - 1)`` and
every other ``1 / (c + N - 1)``, ``c = N - 0.5``, before guidance.

**Order.** LoRAs are split into a high-frequency group H and a low-frequency group L:
by the high-frequency score of their single-LoRA images (:mod:`compose.frequency`,
H ordered by score, L where the sorted scores show a gap of at least ``split_gap``
times the highest score), or by category (H = style, character, clothing, object;
L = background; each in the order the LoRAs are given, as the released code keeps the
order of its combination). The phase switch is at ``round(switch_at × steps)``: before
it the dominant LoRA cycles through H, from it through L (through H throughout when L
is empty), advancing at every refresh step and starting L at its first LoRA.

**Cache.** Refresh steps follow ``schedule``: ``"nonuniform"`` (every ``c1`` steps in
the first 37.5% of the steps, every ``c2`` until 87.5%, every ``c1`` after),
``"uniform"`` (every ``interval`` steps) or ``"off"`` (every step). Every branch runs the
full UNet at step 0 and captures its deep features; a branch that does not run in full
reuses its last captured ones (:class:`~compose.feature_cache.DeepFeatureCache`),
computing only the shallow branch. ``recompute`` says which branches recompute and
capture after that: ``"all"``: every branch at a refresh step, and in between the
dominant runs in full (without capturing); ``"dominant"`` (the released code's): at a
refresh step only the new dominant, and in between no branch, the dominant included.
``cache=False`` runs every branch in full.

``reference=True`` reproduces the released ``compose_offline.py`` /
``pipeline_offline.py`` of Yqcca/CMLoRA: category ordering, ``switch_at`` 0.55 (its step
``i <= 120`` of 220), ``c1, c2 = 2, 3``, ``recompute="dominant"``, the feature cache only
in the uniform schedule with ``interval >= 2`` (``quick_replicate``), and its phase-2
arithmetic: one dominance counter for both phases, in phase 2 cycling through
``(H + L)[1 : |H| + 1]`` (``H[1:]`` and the first background) with no branch ever
recomputed (its cache reset there writes into a copy of the list). Unless a
``lora_scale`` is given, the LoRAs run at weight 1 (:mod:`compose.methods.references`).
It refuses ``split_gap``, which only the frequency ordering reads.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..feature_cache import DeepFeatureCache
from ..loading import LoRA
from .base import CompositionMethod, MethodContext, UNetRun, fix_reference, guided_mix

SCHEDULES = ("nonuniform", "uniform", "off")
ORDERINGS = ("frequency", "category")
RECOMPUTE = ("all", "dominant")
SPLIT_GAP = 0.15
REFERENCE = {"ordering": "category", "recompute": "dominant", "switch_at": 0.55, "c1": 2, "c2": 3}


def refresh_steps(schedule: str, steps: int, interval: int = 2, c1: int = 2, c2: int = 3) -> list[int]:
    """The steps at which the dominant LoRA advances and branches recompute (step 0 always)."""
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
    """CMLoRA; see the module docstring. ``ordering`` ``None`` is ``"frequency"`` and
    ``recompute`` ``None`` is ``"all"`` (``"category"`` and ``"dominant"`` with ``reference``)."""

    name = "cmlora"
    ordering: str | None = None
    switch_at: float = 0.55
    schedule: str = "nonuniform"
    interval: int = 2
    c1: int = 2
    c2: int = 3
    cache: bool = True
    recompute: str | None = None
    split_gap: float = SPLIT_GAP
    reference: bool = False

    def __post_init__(self) -> None:
        if self.reference:
            fix_reference(self, REFERENCE)
        if self.reference and self.split_gap != SPLIT_GAP:
            raise ValueError(f"cmlora reference=True orders by category, as the released code does, so split_gap "
                             f"(where the frequency ordering splits) would do nothing; got {self.split_gap!r}: "
                             "leave it out, or leave reference out to order by frequency")  # fmt: skip
        self.ordering = self.ordering or "frequency"
        self.recompute = self.recompute or "all"
        if self.ordering not in ORDERINGS:
            raise ValueError(f"CMLoRA ordering must be one of {ORDERINGS}, got {self.ordering!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"CMLoRA schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"CMLoRA recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
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
        self.switch = round(self.switch_at * steps)
        self.dominant = self.released_dominance(steps) if self.reference else self.dominance(steps)
        w_dom, w_other = dominance_weights(n)
        self.mix = torch.full((steps, n), w_other)
        self.mix[torch.arange(steps), torch.tensor(self.dominant)] = w_dom
        self.mix = self.mix.to(context.weights)
        self.branch_weights = torch.diag(context.weights)
        cached = self.cache and context.unet is not None
        if self.reference:
            cached = cached and self.schedule == "uniform" and self.interval > 1
        self.features = DeepFeatureCache(context.unet) if cached else None
        self.full = [self.recomputed(step, n) if cached else list(range(n)) for step in range(steps)]
        self.passes = {"full": 0, "shallow": 0}

    def phase_two(self, step: int) -> bool:
        """Whether ``step`` is past the switch to L (never when L or H is empty)."""
        return bool(self.low and self.high) and step >= self.switch

    def dominance(self, steps: int) -> list[int]:
        """The dominant LoRA of every step: H, then L, each cycled by its own counter."""
        dominant: list[int] = []
        advanced = {False: -1, True: -1}
        for step in range(steps):
            late = self.phase_two(step) or not self.high
            group = self.low if late else self.high
            if step in self.refresh or advanced[late] < 0:
                advanced[late] += 1
            dominant.append(group[advanced[late] % len(group)])
        return dominant

    def released_dominance(self, steps: int) -> list[int]:
        """The released code's dominant LoRA: a counter of refresh steps, indexing H before
        the switch and ``(H + L)[1 : |H| + 1]`` after it (L alone when H is empty, where the
        released code divides by zero)."""
        adapters, h = self.high + self.low, len(self.high)
        dominant: list[int] = []
        count = 0
        for step in range(steps):
            count += step in self.refresh
            if not h:
                dominant.append(self.low[(count - 1) % len(self.low)])
            else:
                dominant.append(adapters[(count - 1) % h + self.phase_two(step)])
        return dominant

    def recomputed(self, step: int, n: int) -> list[int]:
        """The branches that run the full UNet at ``step`` when the feature cache is on."""
        if step == 0 or (self.recompute == "all" and step in self.refresh):
            return list(range(n))
        if self.recompute == "all":
            return [self.dominant[step]]
        if step in self.refresh and not (self.reference and self.phase_two(step)):
            return [self.dominant[step]]
        return []

    def weights(self, step: int) -> torch.Tensor:
        return self.branch_weights

    def predict(self, step: int, run: UNetRun) -> torch.Tensor:
        n = len(self.context.loras)
        full = self.full[step]
        reuse = [j for j in range(n) if j not in full]
        self.passes["full"] += len(full)
        self.passes["shallow"] += len(reuse)
        parts: dict[int, torch.Tensor] = {}
        if full:
            capture = self.features is not None and (self.recompute == "dominant" or step in self.refresh)
            with self.features.capture(full) if capture else nullcontext():
                parts.update(zip(full, run(self.branch_weights[full]).chunk(len(full)), strict=True))
        if reuse:
            with self.features.reuse(reuse):
                parts.update(zip(reuse, run(self.branch_weights[reuse]).chunk(len(reuse)), strict=True))
        return torch.cat([parts[j] for j in range(n)])

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        """The dominance-weighted sum of the branches' predictions, then guidance."""
        return guided_mix(self.mix[step].view(-1, *([1] * (cond.dim() - 1))), uncond, cond, guidance_scale)
