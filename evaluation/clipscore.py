"""CLIPScore of generated images against text, computed with open_clip.

The score of an image and a text is ``100 * max(cos(E_image, E_text), 0)``, the
definition of torchmetrics' ``CLIPScore`` (Hessel et al. 2021 with ``w = 100``), where
``E`` are a CLIP model's image and text embeddings. The composition papers report the
mean over their images, with ``openai/clip-vit-base-patch16`` (open_clip's
``ViT-B-16`` with the ``openai`` weights) and the composed LoRAs' trigger words as the
text (:func:`composition_text`).

A scorer comes from open_clip's pretrained weights (:meth:`CLIPScorer.from_open_clip`),
from a folder this module wrote (:meth:`CLIPScorer.from_folder`, :meth:`CLIPScorer.save`),
or from an open_clip model already in memory (the constructor).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.constants import HF_HUB_CACHE
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from safetensors.torch import save_file

WEIGHTS_NAME = HF_SAFE_WEIGHTS_NAME
CONFIG_NAME = HF_CONFIG_NAME


class CLIPWeightsNotFound(FileNotFoundError):
    """CLIP weights that are not on this machine; the message says how to get them."""


def composition_text(triggers: Sequence[str]) -> str:
    """The text a composition is scored against: its LoRAs' trigger words, joined by ``", "``."""
    return ", ".join(triggers)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cached_checkpoint(name: str, pretrained: str, cache_dir: str | None) -> str:
    """The local file of open_clip weights ``name``/``pretrained``, found without any network access.

    ``pretrained`` is an open_clip tag, whose weights open_clip keeps in the Hugging Face
    cache (or, for tags with only a URL, in ``~/.cache/clip``), or a checkpoint file.
    """
    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag:
        if Path(pretrained).expanduser().is_file():
            return str(Path(pretrained).expanduser())
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise CLIPWeightsNotFound(
            f"open_clip {name}: pretrained={pretrained!r} is neither a known tag (known: {known}) nor a file"
        )
    if "file" in tag:
        return tag["file"]
    looked = []
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else str(Path(filename).with_suffix(".safetensors"))
        for candidate in (safe, filename):
            found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        looked.append(f"{repo}/{{{safe},{filename}}} in the Hugging Face cache {cache_dir or HF_HUB_CACHE}")
    if tag.get("url"):
        path = Path(cache_dir or Path("~/.cache/clip").expanduser()) / os.path.basename(tag["url"])
        if path.is_file():
            return str(path)
        looked.append(str(path))
    cache_arg = f", cache_dir={cache_dir!r}" if cache_dir else ""
    raise CLIPWeightsNotFound(
        f"open_clip weights {name}/{pretrained} are not on this machine (looked for {' and '.join(looked)}). "
        'Download them once where there is internet, with open_clip itself: python -c "import open_clip; '
        f'open_clip.create_model_and_transforms({name!r}, pretrained={pretrained!r}{cache_arg})" '
        "(HF_HOME chooses the Hugging Face cache), or pass pretrained= the path of a checkpoint file"
    )


class CLIPScorer:
    """CLIPScore with one open_clip model, on one device, in batches.

    ``preprocess`` maps a PIL image to a ``(3, H, W)`` tensor and ``tokenizer`` a list of
    ``B`` texts to ``(B, context_length)`` token ids (open_clip's validation transform and
    tokenizer). ``model_cfg`` is open_clip's model config (``embed_dim``, ``vision_cfg``,
    ``text_cfg`` ...); :meth:`save` needs it. The model is moved to ``device`` (default:
    CUDA where available) and put in eval mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str | torch.device | None = None,
        batch_size: int = 32,
        model_cfg: dict | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model_cfg = model_cfg

    @classmethod
    def from_open_clip(
        cls,
        name: str = "ViT-B-16",
        pretrained: str = "openai",
        device: str | torch.device | None = None,
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ) -> CLIPScorer:
        """open_clip model ``name`` with weights ``pretrained`` (a tag or a checkpoint file);
        ``cache_dir`` is where open_clip downloaded the tag's weights, if not the default.

        The weights must already be on this machine: nothing is downloaded, and missing
        weights raise :class:`CLIPWeightsNotFound` at once, saying how to get them. The
        tag's preprocessing (mean, std, interpolation, resize mode) and activation (the
        OpenAI weights need QuickGELU) are applied as open_clip records them.
        """
        checkpoint = _cached_checkpoint(name, pretrained, str(cache_dir) if cache_dir is not None else None)
        tag = open_clip.get_pretrained_cfg(name, pretrained)
        device = torch.device(device) if device is not None else _default_device()
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=checkpoint,
            device=device,
            force_quick_gelu=tag.get("quick_gelu", False),
            image_mean=tag.get("mean"),
            image_std=tag.get("std"),
            image_interpolation=tag.get("interpolation"),
            image_resize_mode=tag.get("resize_mode"),
        )
        model_cfg = open_clip.get_model_config(name)
        if tag.get("quick_gelu"):
            model_cfg["quick_gelu"] = True
        return cls(model, preprocess, open_clip.get_tokenizer(name), device, batch_size, model_cfg)

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str | torch.device | None = None, batch_size: int = 32
    ) -> CLIPScorer:
        """The model in ``folder``: ``open_clip_config.json`` (``{"model_cfg": ...,
        "preprocess_cfg": ...}``, open_clip's format) and ``open_clip_model.safetensors``."""
        folder = Path(folder)
        for needed in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / needed).is_file():
                raise CLIPWeightsNotFound(
                    f"{folder}: no {needed}; a CLIP model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
                )
        source = f"local-dir:{folder}"
        device = torch.device(device) if device is not None else _default_device()
        model, _, preprocess = open_clip.create_model_and_transforms(source, device=device)
        model_cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))["model_cfg"]
        return cls(model, preprocess, open_clip.get_tokenizer(source), device, batch_size, model_cfg)

    def save(self, folder: str | Path) -> Path:
        """Write the model as :meth:`from_folder` reads it; returns ``folder``."""
        if self.model_cfg is None:
            raise ValueError("saving needs the open_clip model config: build the scorer with model_cfg=")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(self.model)}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_NAME)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder)
        return folder

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings of one or more images, ``(B, embed_dim)`` float32 on CPU."""
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [self.preprocess(image.convert("RGB")) for image in images[start : start + self.batch_size]]
            features = self.model.encode_image(torch.stack(batch).to(self.device, dtype))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings of one or more texts, ``(B, embed_dim)`` float32 on CPU
        (texts past the context length are truncated, as torchmetrics does)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
            features = self.model.encode_text(tokens.to(self.device))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    def cosine(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """``cos(E_image, E_text)`` of each ``(images[i], texts[i])`` pair: ``(B,)`` float32
        in ``[-1, 1]``. The score before its clamp at 0: it tells a near miss from an image
        CLIP places far from the text, which a CLIPScore of 0 does not."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; score takes one text per image")
        if not images:
            return torch.zeros(0)
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(dim=-1)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """CLIPScore of each ``(images[i], texts[i])`` pair: ``(B,)`` float32 in ``[0, 100]``.

        torchmetrics' ``CLIPScore`` over the same pairs is the mean of this.
        """
        return 100 * self.cosine(images, texts).clamp(min=0)
