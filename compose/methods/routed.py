"""Routed composition: every LoRA at full weight, each only where its concept is drawn.

Concepts bleed into each other when every LoRA acts on every pixel, and averaging
(Composite) dilutes each to ``1/N``. Routed keeps Merge's single pass and confines each
LoRA to its own part of the picture, found automatically (after FreeFuse, 2025, which
routes LoRA outputs with masks read from cross-attention):

1. **Probe.** The first ``probe`` fraction of the steps (at least one) run on the base
   model alone (``probe_with="base"``, default: no LoRA draws its concept over the whole
   picture before its place is known) or as Merge (``"loras"``) while
   :class:`~compose.attention_maps.AttentionProbe` reads how much each latent pixel
   attends to each LoRA's words: with ``locate="clause"`` (default) the whole clause that
   holds its trigger words ("a klinko robot on the right", clauses ending at commas,
   semicolons, full stops and "and"), with ``"trigger"`` the trigger words alone, as
   FreeFuse reads them. The trigger words must appear in the prompt. LoRAs of one clause
   ("a zorbo creature wearing a flimbo hat") share its region.
2. **Regions.** Per image, the maps of the region and complement LoRAs' words are each
   scaled to [0, 1] over the image; a pixel belongs to the *region* words whose share
   there is the highest (a background's words compete) if that share is at least
   ``threshold``, and each region grows by ``grow`` latent pixels. A *complement* LoRA (backgrounds) acts
   where no region does; a *global* one (styles) everywhere. Characters, clothing and
   objects are regions by default; ``roles`` overrides by name.
3. **Route.** From then on, in every composable layer, LoRA ``j``'s contribution at each
   position is multiplied by its mask there (:class:`~compose.layers.Routes`); in the
   cross-attention's key and value projections, whose positions are text tokens, a LoRA
   is kept off the other LoRAs' trigger words.
4. **Per-region prompts** (``prompts``): a region LoRA given a text of its own has its
   region attend to that text instead of the prompt (:mod:`compose.region_prompts`); its
   trigger words are put in front where the text has none. ``prompts="clauses"``
   (default) gives each region LoRA its clause of the prompt, so that the robot's region
   never reads "creature"; LoRAs with the same text share one region; ``None`` keeps the
   whole prompt everywhere.

One LoRA, or every LoRA global, is Merge exactly. The masks of the last generation are
kept (:meth:`~compose.methods.base.CompositionMethod.lora_masks`, ``(B, N, H, W)`` at
latent resolution; ``Composer.generate(..., run=RunOptions(return_masks=True))`` returns
them as images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention_maps import AttentionProbe
from ..layers import Routes
from ..region_prompts import CLAUSES, RegionPrompts, check_prompts, own_texts
from .base import CompositionMethod, MethodContext, UNetRun

ROLES = ("region", "complement", "global")
LOCATE = ("clause", "trigger")
PROBE_WITH = ("base", "loras")
CATEGORY_ROLES = {"character": "region", "clothing": "region", "object": "region", "background": "complement",
                  "style": "global"}  # fmt: skip


@dataclass
class Routed(CompositionMethod):
    """See the module docstring. ``probe`` is a fraction of the steps, ``threshold`` a
    share of a map's peak, ``grow`` latent pixels, ``roles`` LoRA name -> role,
    ``prompts`` region LoRA name -> its region's own text, ``"clauses"`` or ``None``
    (per-region prompts), ``probe_with`` what the probe steps run, ``locate`` which words
    place a LoRA."""

    name = "routed"
    probe: float = 0.2
    threshold: float = 0.5
    grow: int = 1
    roles: dict[str, str] | None = None
    prompts: dict[str, str] | str | None = CLAUSES
    probe_with: str = "base"
    locate: str = "clause"

    def __post_init__(self) -> None:
        if not 0 < self.probe < 1:
            raise ValueError(f"routed probe is a fraction of the steps in (0, 1), got {self.probe}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"routed threshold is a share of a map's peak in [0, 1], got {self.threshold}")
        if self.grow < 0:
            raise ValueError(f"routed grow is a number of latent pixels, at least 0, got {self.grow}")
        if self.probe_with not in PROBE_WITH:
            raise ValueError(f"routed probe_with is {', '.join(PROBE_WITH)}, got {self.probe_with!r}")
        if self.locate not in LOCATE:
            raise ValueError(f"routed locate is {' or '.join(LOCATE)}, got {self.locate!r}")
        check_prompts(self.name, self.prompts)
        bad = {name: role for name, role in (self.roles or {}).items() if role not in ROLES}
        if bad:
            raise ValueError(f"routed roles are {', '.join(ROLES)}; got {bad}")

    @property
    def needs_tokens(self) -> bool:
        return True

    def prepare(self, context: MethodContext) -> None:
        super().prepare(context)
        names = [lora.name for lora in context.loras]
        unknown = set(self.roles or {}) - set(names)
        if unknown:
            raise ValueError(f"roles name LoRAs that are not in the composition: {', '.join(sorted(unknown))}")
        self.role = self._roles(context)
        self.row = context.weights[None]
        located = [j for j, role in enumerate(self.role) if role != "global"]
        self.regions = located if len(context.loras) > 1 and "region" in self.role else []
        self.probe_steps = max(1, round(self.probe * context.num_steps)) if self.regions else 0
        words = context.clauses if self.locate == "clause" else context.tokens
        groups = [tuple(words[j].nonzero().flatten().tolist()) for j in self.regions]
        distinct = list(dict.fromkeys(groups))
        self.group = [distinct.index(group) for group in groups]
        self.probe_reader = AttentionProbe(context.unet, [list(group) for group in distinct])
        self.probe_row = self.row if self.probe_with == "loras" else torch.zeros_like(self.row)
        self.routes: Routes | None = None
        self.masks: torch.Tensor | None = None
        prompted = list(context.region_states or {})
        outside = [name for name in prompted if self.role[names.index(name)] != "region"]
        if outside:
            raise ValueError(f"per-region prompts are for LoRAs with a region (characters, clothing, objects or "
                             f"role region); {', '.join(outside)} acts on the whole picture")  # fmt: skip
        self.prompted: list[list[int]] = []  # LoRAs reading one text share its region
        for name in prompted:
            state = context.region_states[name]
            same = [g for g in self.prompted if torch.equal(context.region_states[names[g[0]]], state)]
            if same:
                same[0].append(names.index(name))
            else:
                self.prompted.append([names.index(name)])
        on = [[role != "region" or j in group for j, role in enumerate(self.role)] for group in self.prompted]
        self.lora_on = torch.tensor(on).float().reshape(len(self.prompted), len(names))

    def region_texts(self, context: MethodContext) -> dict[str, str]:
        roles = zip(context.loras, self._roles(context), strict=True)
        regions = {lora.name for lora, role in roles if role == "region"}
        return own_texts(self.prompts, context.loras, context.clause_texts, regions)

    def _roles(self, context: MethodContext) -> list[str]:
        """Each LoRA's role: ``roles``, else its category's; global where its trigger words
        are not in the prompt (nothing to locate it by)."""
        roles = []
        for lora, tokens in zip(context.loras, context.tokens, strict=True):
            role = (self.roles or {}).get(lora.name) or CATEGORY_ROLES.get(lora.category or "", "global")
            roles.append(role if role == "global" or bool(tokens.any()) else "global")
        return roles

    def weights(self, step: int) -> torch.Tensor:
        return self.row

    def predict(self, step: int, run: UNetRun) -> torch.Tensor:
        if step < self.probe_steps:
            with self.probe_reader:
                eps = run(self.probe_row)
            self.probe_reader.step(tuple(eps.shape[-2:]))
            return eps
        if not self.prompted or self.routes is None:
            return run(self.row, routes=self.routes)
        context = self.context
        texts = [context.region_states[context.loras[group[0]].name] for group in self.prompted]
        masks = torch.stack([self.masks[:, group].amax(1) for group in self.prompted], 1)
        with RegionPrompts(context.unet, context.state, masks, texts, self.lora_on.to(masks)):
            return run(self.row, routes=self.routes)

    def combine(
        self, uncond: torch.Tensor | None, cond: torch.Tensor, guidance_scale: float, step: int
    ) -> torch.Tensor:
        if step == self.probe_steps - 1:
            self.masks = self.masks_from(self.probe_reader.maps()[-cond.shape[1] :])
            self.routes = Routes(self.masks, self._token_masks())
        return super().combine(uncond, cond, guidance_scale, step)

    def lora_masks(self) -> torch.Tensor | None:
        return self.masks

    def masks_from(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, N, H, W)`` masks from the attention ``maps`` ``(B, K, H, W)`` of the located
        LoRAs' words (:attr:`regions` are the region and complement LoRAs, :attr:`group`
        their word groups' channels): each map scaled to [0, 1] over its image, each pixel
        given to the highest if that is at least ``threshold``; a region LoRA gets its
        group's pixels (grown), a complement LoRA every pixel no region got."""
        batch, _, height, width = maps.shape
        flat = maps.flatten(2)
        low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        share = (maps - low) / (high - low).clamp_min(1e-12)
        best = share.max(1, keepdim=True)
        owned = (share == best.values) & (best.values >= self.threshold)
        regional = torch.zeros(maps.shape[1], dtype=torch.bool, device=maps.device)
        regional[[g for g, j in zip(self.group, self.regions, strict=True) if self.role[j] == "region"]] = True
        owned = owned & regional[None, :, None, None]
        if self.grow:
            size = 2 * self.grow + 1
            owned = F.max_pool2d(owned.float(), size, stride=1, padding=self.grow) > 0
        masks = torch.ones(batch, len(self.role), height, width).to(maps)
        anywhere = owned.any(1).to(maps)
        for g, j in zip(self.group, self.regions, strict=True):
            masks[:, j] = owned[:, g].to(maps) if self.role[j] == "region" else 1 - anywhere
        return masks

    def _token_masks(self) -> torch.Tensor:
        """``(N, T)``: 0 where a token is another LoRA's trigger word and not this one's."""
        tokens = self.context.tokens
        others = tokens.sum(0, keepdim=True) - tokens.int() > 0
        return (~(others & ~tokens)).float()
