"""Prompts to conditioning: the text encoders of a pipeline, reading A1111's prompt syntax.

Plain prompts are encoded by diffusers' own ``encode_prompt``, so that they condition
exactly as diffusers' pipelines do; a call where any text uses emphasis, ``BREAK`` or more
than 75 tokens is encoded chunk by chunk as A1111 does (:mod:`compose.emphasis`).
"""

from __future__ import annotations

import logging

import torch

from . import emphasis
from .loop import Conditioning

logger = logging.getLogger("compose")
Encoded = tuple[torch.Tensor, torch.Tensor | None]
"""A text encoding: the hidden states and, for SDXL, the pooled embedding."""


class PromptEncoder:
    """The text side of a pipeline (SD1.x/2.x: one encoder; SDXL: two), with whatever LoRA
    layers its encoders carry at the weights set on their registries."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None

    @property
    def device(self) -> torch.device:
        """Where the conditioning goes: the UNet's device."""
        return self.pipeline.unet.device

    def encode(self, prompts: list[str], negatives: list[str], cfg: bool, size: tuple[int, int]) -> Conditioning:
        """The prompts' conditioning (negatives first under CFG), their A1111 syntax read by
        :mod:`compose.emphasis`: emphasis, BREAK and prompts longer than 75 tokens. Where no
        text of the call uses any of it, diffusers' ``encode_prompt`` encodes it, so that plain
        prompts condition exactly as diffusers' pipelines do."""
        rows = [*negatives, *prompts] if cfg else list(prompts)
        plain = [emphasis.plain_text(self.pipeline.tokenizer, text) for text in rows]
        if None in plain:
            states, pooled = self.chunks(rows)
        else:
            negatives = plain[: len(prompts)] if cfg else negatives
            states, pooled = self.plain(plain[-len(prompts) :], negatives, cfg)
        if not self.is_sdxl:
            return Conditioning(states)
        projection = self.pipeline.text_encoder_2.config.projection_dim
        time_ids = self.pipeline._get_add_time_ids(size, (0, 0), size, states.dtype, projection)
        return Conditioning(states, {"text_embeds": pooled, "time_ids": time_ids.to(self.device).repeat(len(rows), 1)})

    def plain(self, prompts: list[str], negatives: list[str], cfg: bool) -> Encoded:
        """``(states, pooled)`` by diffusers' ``encode_prompt`` (``pooled`` ``None`` but for SDXL)."""
        pipe = self.pipeline
        if not self.is_sdxl:
            cond, uncond = pipe.encode_prompt(prompts, self.device, 1, cfg, negatives)
            return (torch.cat([uncond, cond]) if cfg else cond), None
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negatives,
        )  # fmt: skip
        if cfg:
            return torch.cat([uncond, cond]), torch.cat([pooled_uncond, pooled])
        return cond, pooled

    def chunks(self, rows: list[str]) -> Encoded:
        """``(states, pooled)`` as A1111 encodes ``rows``: each text encoder (SDXL: both, their
        penultimate layers side by side, as diffusers) encodes every 77-token chunk, each
        token's output weighted; the chunks are joined along the sequence. SDXL's pooled
        embedding is the first chunk's, as in A1111."""
        pipe = self.pipeline
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self.is_sdxl:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        states, pooled = [], None
        for tokenizer, encoder in pairs:
            batch = emphasis.batch_chunks(tokenizer, rows)
            parts = []
            for k in range(len(batch[0])):
                ids = torch.tensor([row[k].ids for row in batch], device=self.device)
                masked = getattr(encoder.config, "use_attention_mask", False)
                mask = emphasis.attention_mask(ids, tokenizer.eos_token_id) if masked else None
                out = encoder(ids, attention_mask=mask, output_hidden_states=self.is_sdxl)
                if pooled is None and k == 0 and out[0].ndim == 2:
                    pooled = out[0]
                hidden = out.hidden_states[-2] if self.is_sdxl else out[0]
                weights = torch.tensor([row[k].weights for row in batch], device=self.device)
                parts.append(emphasis.emphasised(hidden, weights))
            states.append(torch.cat(parts, dim=1).to(encoder.dtype))
        return torch.cat(states, dim=-1), pooled

    def syntax(self, prompts: list[str], negative: str, cfg: bool) -> dict:
        """How :meth:`encode` reads the texts: ``prompt_syntax`` "a1111" (:mod:`compose.emphasis`),
        ``prompt_chunks`` the 77-token windows of the conditioning, and ``pad_conds`` whether
        the prompt or the negative prompt was padded with empty chunks to match the other
        (A1111's "Pad conds")."""
        rows = [*prompts, negative] if cfg else prompts
        counts = [len(emphasis.chunks(self.pipeline.tokenizer, text)) for text in rows]
        pad = cfg and any(count != counts[-1] for count in counts[:-1])
        if len(set(counts[: len(prompts)])) > 1:
            logger.warning(
                "the prompts of this batch need %s chunks of 75 tokens; the shorter are padded with empty chunks, "
                "as A1111 pads a batch, so their images differ from those made alone",
                counts[: len(prompts)],
            )
        return {"prompt_syntax": "a1111", "prompt_chunks": max(counts), "pad_conds": pad}
