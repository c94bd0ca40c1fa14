"""The base model: reading a diffusers pipeline, checking it holds what composing needs,
and decoding final latents with its VAE as diffusers' pipelines do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .logs import quiet_dependencies

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The components every pipeline composed over has (SDXL's second encoder is optional)."""


class ModelLoadError(RuntimeError):
    """A base model that cannot be loaded; the message says why and what to do."""


def check_parts(pipeline, model_name: str) -> None:
    """Refuse a pipeline without one of :data:`PARTS` (an image-to-image or audio pipeline,
    say), naming what it lacks."""
    for part in PARTS:
        if getattr(pipeline, part, None) is None:
            raise ModelLoadError(
                f"{model_name}: a {type(pipeline).__name__} has no {part}; "
                "compose needs a Stable Diffusion 1.x/2.x or SDXL text-to-image pipeline"
            )


def read_pipeline(model: str | Path, dtype: torch.dtype):
    """The diffusers pipeline that ``model`` names (see :meth:`~compose.composer.Composer.from_pretrained`),
    every failure as a :class:`ModelLoadError` that says what to do."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(model)
    try:
        if path.is_file():
            if path.suffix in (".ckpt", ".pt", ".bin"):
                raise ModelLoadError(
                    f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors first"
                )
            with safe_open(path, framework="pt") as handle:
                xl = any(k.startswith("conditioner.embedders.1") for k in handle.keys())
            pipe_cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
            pipeline = pipe_cls.from_single_file(str(path), dtype=dtype)
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"{path}: folder has no model_index.json, so it is not a diffusers "
                    "pipeline folder (save one with pipeline.save_pretrained, or give a "
                    "single-file .safetensors checkpoint)"
                )
            pipeline = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
        elif path.is_absolute() or str(model).startswith((".", "~")) or str(model).count("/") != 1:
            raise ModelLoadError(f"{model}: no such file or folder")
        else:
            try:
                pipeline = DiffusionPipeline.from_pretrained(str(model), dtype=dtype)
            except OSError as error:
                raise ModelLoadError(
                    f"{model}: not a local file or folder, and not loadable from the Hugging Face "
                    f"Hub or its local cache ({str(error).splitlines()[0]}). Without internet, "
                    f"download it elsewhere with `hf download {model}` and pass the local folder."
                ) from error
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{model}: cannot be loaded as a pipeline: {error}") from error
    return pipeline


@contextmanager
def _decoding_dtype(vae: nn.Module) -> Iterator[None]:
    """Within the block, the VAE in the dtype it decodes in: float32 where it is float16 and
    its config sets ``force_upcast`` (SDXL's VAE overflows in float16), as diffusers'
    ``StableDiffusionXLPipeline`` decodes, then float16 again; else as it is."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        with quiet_dependencies():  # diffusers warns on every cast of a model
            vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            with quiet_dependencies():
                vae.to(torch.float16)


def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The images ``(B, 3, H, W)`` in [-1, 1] that ``vae`` decodes from final latents
    ``(B, C, h, w)``, in diffusers' order: the latents cast to the dtype the VAE decodes in
    (:func:`_decoding_dtype`), then un-normalised (``latents_mean``/``latents_std`` where
    the config has them, else ``1 / scaling_factor``), then decoded."""
    config = vae.config
    with _decoding_dtype(vae):
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents)
            std = torch.tensor(std).view(shape).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]
