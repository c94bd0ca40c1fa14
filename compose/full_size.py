"""Random-weight Stable Diffusion models of the real sizes, from their published configs.

SD1.5's UNet (860 M parameters), VAE (84 M) and CLIP ViT-L/14 text encoder (123 M);
SDXL's UNet (2.6 B), VAE and both text encoders (CLIP ViT-L and OpenCLIP ViT-bigG,
695 M). Nothing is downloaded: what composition costs (time, memory) and whether it is
exact depend on shapes and dtypes, not on trained values (the images are noise). Models
are built directly in the requested dtype on the requested device: SDXL's UNet is 10 GB
in float32 but 5 GB built in bfloat16, and on a GPU no weight crosses from the host.
``tiny`` and ``tiny-xl`` have the same topologies at toy width, for dry runs.

:func:`character_tokenizer` is CLIP's tokenizer without its merges (each character is a
token with CLIP's own id), for machines without open_clip, whose vocabulary file
:func:`compose.tokenizer.clip_tokenizer` reads.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .layers import Factors
from .tiny import ATTENTION_PROJECTIONS, random_factors

SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
)
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
    sample_size=128,
)
TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
    cross_attention_dim=32,
    attention_head_dim=2,
    sample_size=16,
)
TINY_XL = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64,
    sample_size=16,
)

_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
_TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                     projection_dim=1280, hidden_act="gelu")  # fmt: skip
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  projection_dim=32, hidden_act="gelu")  # fmt: skip
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@dataclass(frozen=True)
class ModelSpec:
    """A pipeline's shapes: the UNet's and VAE's diffusers configs, one CLIP text config per
    encoder (two for SDXL), and the VAE's latent scaling factor."""

    unet: dict
    vae: dict
    text: tuple[dict, ...]
    scaling_factor: float

    @property
    def xl(self) -> bool:
        return len(self.text) == 2


SPECS = {
    "tiny": ModelSpec(TINY, _TINY_VAE, (_TINY_TEXT,), 0.18215),
    "tiny-xl": ModelSpec(TINY_XL, _TINY_VAE, (_TINY_TEXT, _TINY_TEXT), 0.13025),
    "sd15": ModelSpec(SD15, _SD_VAE, (CLIP_L,), 0.18215),
    "sdxl": ModelSpec(SDXL, _SD_VAE, (CLIP_L, OPENCLIP_BIGG), 0.13025),
}


@contextmanager
def building(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Modules constructed inside are created in ``dtype`` on ``device`` (no float32 copy
    on the host first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(SPECS)}")
    return SPECS[name]


def unet(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         seed: int = 0) -> UNet2DConditionModel:  # fmt: skip
    """The random UNet of ``name`` (a key of :data:`SPECS`), in eval mode."""
    spec = _spec(name)
    torch.manual_seed(seed)
    with building(dtype, device):
        return UNet2DConditionModel(**spec.unet).eval()


def _text_config(shape: dict, tokenizer: CLIPTokenizer, layers: int | None) -> CLIPTextConfig:
    config = CLIPTextConfig(**shape, vocab_size=49408, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def pipeline(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             tokenizer: CLIPTokenizer | None = None, text_layers: int | None = None, seed: int = 0):  # fmt: skip
    """A random diffusers pipeline of ``name`` (SD1.x for ``tiny``/``sd15``, SDXL for
    ``tiny-xl``/``sdxl``). ``tokenizer``: default :func:`character_tokenizer`;
    ``text_layers`` shortens the text encoders (their cost is not what is measured)."""
    spec = _spec(name)
    tokenizer = tokenizer or character_tokenizer()
    torch.manual_seed(seed)
    with building(dtype, device):
        parts = dict(
            unet=UNet2DConditionModel(**spec.unet),
            vae=AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * len(spec.vae["block_out_channels"]),
                up_block_types=("UpDecoderBlock2D",) * len(spec.vae["block_out_channels"]),
                latent_channels=4,
                scaling_factor=spec.scaling_factor,
                force_upcast=False,
                **spec.vae,
            ),  # fmt: skip
            text_encoder=CLIPTextModel(_text_config(spec.text[0], tokenizer, text_layers)),
            tokenizer=tokenizer,
        )
        if spec.xl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(spec.text[1], tokenizer, text_layers))
    if spec.xl:
        scheduler = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading")
        return StableDiffusionXLPipeline(**parts, tokenizer_2=tokenizer, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False)  # fmt: skip
    scheduler = PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def character_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with no merges: every character of a word is one token, with the id
    CLIP gives it (ids 0..511 are CLIP's byte tokens, 49406/49407 its start/end), so text
    encoders keep CLIP's vocabulary size and special ids without open_clip's merges file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocabulary = {token: i for i, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocabulary |= {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocabulary), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")


def shared_copy(model):
    """A deep copy of ``model`` (a module or a pipeline) whose module objects are new but
    whose parameters and buffers are the original's: a second wrapper (diffusers' PEFT
    adapters, a compiled copy) at no memory cost. Safe because neither the composable
    layers nor PEFT's unmerged adapters ever write the base weights."""
    modules = [model] if isinstance(model, nn.Module) else list(getattr(model, "components", {}).values())
    tensors = [t for m in modules if isinstance(m, nn.Module) for t in (*m.parameters(), *m.buffers())]
    return copy.deepcopy(model, memo={id(t): t for t in tensors})


def random_loras(model: nn.Module, ranks: Sequence[int], seed: int = 0) -> list[dict[str, Factors]]:
    """One random LoRA per entry of ``ranks`` on every attention projection of ``model``
    (a UNet): the modules Civitai and diffusers LoRAs always target."""
    return [random_factors(model, ATTENTION_PROJECTIONS, rank, seed=seed + i) for i, rank in enumerate(ranks)]


def peft_state_dict(factors: dict[str, Factors], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys (``<prefix><module>.lora_A.weight`` / ``lora_B``) for one LoRA."""
    return {
        f"{prefix}{module}.lora_{ab}.weight": tensor.contiguous()
        for module, f in factors.items()
        for ab, tensor in (("A", f.down), ("B", f.up))
    }


def write_loras(loras: Sequence[dict[str, Factors]], folder: Path) -> list[Path]:
    """Each LoRA as a diffusers-format ``.safetensors`` file (``unet.`` keys) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, factors in enumerate(loras):
        path = folder / f"random{i}.safetensors"
        save_file(peft_state_dict(factors, "unet."), str(path))
        paths.append(path)
    return paths
