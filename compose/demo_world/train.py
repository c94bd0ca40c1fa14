"""Train the demo world's models from renders alone: ``compose demo-world train``.

Five stages, each a short function over the configs and presets in ``training.json``;
their outputs land in one folder (the CLI's ``outputs/demo-world`` unless told; the
shipped ``assets/demo_world`` only when named) and a finished stage is skipped on a
re-run, so an interrupted run resumes at the stage it was in. A stage that runs again
discards what was trained on its output (``UPSTREAM``):

1. ``vae``: an ``AutoencoderKL`` (64×64 RGB ↔ 16×16×12 latents) on every kind of scene,
   generic, single-concept and composed. Like Stable Diffusion's autoencoder, it has seen
   everything; what is new to the base model is the *meaning* of the trigger words. It
   is trained on the posterior's mode (a plain autoencoder with a faint KL pull): with
   samples, a model this small spends its short training fighting the noise and loses
   the colours. Twelve channels (4× compression) instead of SD's four (48×) for the same
   reason: it learns in minutes.
2. ``base``: ``UNet2DConditionModel`` and ``CLIPTextModel`` (the real CLIP BPE tokenizer)
   from scratch on generic scenes only, v-prediction on a zero-terminal-SNR schedule (so
   black and white backgrounds come out black and white), captions dropped 10% of the
   time for classifier-free guidance, EMA weights kept. Saved as a
   ``StableDiffusionPipeline`` folder with DPM-Solver++ as its scheduler, in fp16.
3. ``refine``: more steps for that base on fresh generic scenes, as warm restarts from its
   saved weights, one per *segment* (the preset's ``segments``; each draws its own
   scenes), so a shipped base can be trained further (it retrains the LoRAs). Some of
   its captions put a made-up word before a class word (``"a blorp hat"``), so that a
   trigger the base never saw leaves the element generic instead of derailing the
   picture.
4. ``loras``: one LoRA per concept, each trained alone through the engine's own
   composable layer on its concept's renders only (and, for specificity, generic scenes
   that it must leave as the base draws them), its factors averaged (EMA). Saved as
   diffusers-format safetensors with kohya-style metadata (``ss_tag_frequency`` gives
   the trigger, ``compose_category``).
5. ``clip``: an open_clip CLIP (custom config) trained contrastively on renders, clean
   and degraded, against their captions and their trigger lists, for CLIPScore offline.

Everything is seeded: a re-run on the same machine and thread count gives the same
weights. Times and losses go into ``training.json`` in the output folder.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import platform
import queue
import re
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save
from torch import nn

from ..bundles import write_lora_order
from ..evaluation.sets import demo_world_manifest, two_character_manifest
from ..files import atomic_open
from ..layers import Factors, LayerRegistry
from .concepts import BACKGROUNDS, CONCEPTS, concepts_of
from .render import render, render_layers
from .scenes import (
    Scene,
    composition_scene,
    composition_sets,
    made_up_words,
    sample_concept_scene,
    sample_generic_scene,
    two_character_scene,
)
from .world import CEILING, CLIP_FOLDER, REPORT, SETS, TWO_CHARACTERS, WORLD_VERSION, lora_path

STAGES = ("vae", "base", "refine", "loras", "clip")
UPSTREAM = {"vae": (), "base": ("vae",), "refine": ("base",), "loras": ("base", "refine"), "clip": ()}
PER_WORLD_VERSION = ("clip",)
"""Stages trained again when the world version changes (the renderer draws a concept
anew): the CLIP scores pictures against their captions, so one that never saw the new
look scores it wrong, and no other stage's rerun refreshes it. The models keep their
weights across versions (a refine segment or the LoRAs learn the new look)."""
CHECKPOINTS = "checkpoints"
CHECKPOINT_SECONDS = 180.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Progress = Callable[[str, int, int, float], None]


def training_config() -> dict:
    """``training.json``: the model configs (``models``) and the presets (``presets``)."""
    return json.loads(files(__package__).joinpath("training.json").read_text(encoding="utf-8"))


_SETS = {size: composition_sets(size) for size in range(2, 6)}


# -- data ------------------------------------------------------------------------------


def render_scenes(scenes: list[Scene], progress: Progress | None = None, label: str = "render") -> np.ndarray:
    """``(N, 64, 64, 3)`` uint8 renders of ``scenes``, in two processes (the order and the
    bytes do not depend on it); ``progress`` hears every 500 images."""
    from concurrent.futures import ProcessPoolExecutor

    chunks = [scenes[i : i + 500] for i in range(0, len(scenes), 500)]
    out = []
    with ProcessPoolExecutor(max_workers=2) as pool:
        for done, chunk in enumerate(pool.map(_render_chunk, chunks), 1):
            out.append(chunk)
            if progress is not None:
                progress(label, done, len(chunks), 0.0)
    return np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)


def _render_chunk(scenes: list[Scene]) -> np.ndarray:
    return np.stack([np.asarray(render(scene)) for scene in scenes])


def mixed_scenes(count: int, rng: np.random.Generator) -> list[Scene]:
    """Scenes of every kind: 40% generic, 30% one concept, 25% compositions of 2-5 and 5%
    two characters side by side."""
    scenes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.4:
            scenes.append(sample_generic_scene(rng))
        elif kind < 0.7:
            scenes.append(sample_concept_scene(str(rng.choice(list(CONCEPTS))), rng))
        elif kind < 0.95:
            scenes.append(random_composition(rng))
        else:
            left, right = rng.choice([c.name for c in concepts_of("character")], size=2, replace=False)
            scenes.append(two_character_scene(str(left), str(right), str(rng.choice(BACKGROUNDS)), rng))
    return scenes


def random_composition(rng: np.random.Generator) -> Scene:
    """A composition of 2 to 5 concepts (a random ComposLoRA-shaped set) in a random layout."""
    options = _SETS[int(rng.integers(2, 6))]
    return composition_scene(options[int(rng.integers(len(options)))], rng)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` → float ``(N, 3, H, W)`` in [-1, 1], the VAE's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def tag_text(scene: Scene) -> str:
    """The concepts' trigger words joined by ", " (what CLIPScore compares a composition
    with); a generic scene's own caption."""
    concepts = scene.concepts()
    return ", ".join(CONCEPTS[c].trigger for c in concepts) if concepts else scene.caption()


# -- shared training machinery ---------------------------------------------------------


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth: the multiplier of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


class _Resume:
    """A stage's checkpoint: enough to continue an interrupted stage exactly where it was.

    It holds the trained ``parameters``, the optimiser, any ``extra`` tensors (EMA weights),
    the state of each random generator the stage draws from after its data is made, and
    the ``history`` lists (losses); it is written atomically every ``CHECKPOINT_SECONDS``
    and removed when the stage ends. The data pools are not saved: they are rebuilt from
    the seed, deterministically, before the checkpoint is read. The stage's ``settings``
    are saved with it: a checkpoint written under other settings (a preset edited between
    two runs) would continue a different recipe, so it is set aside and the stage starts over.
    """

    def __init__(self, path: Path, rngs: list[np.random.Generator], settings: dict,
                 extra: list[torch.Tensor] = (), history: dict[str, list] | None = None) -> None:  # fmt: skip
        self.path, self.rngs, self.settings, self.extra = path, rngs, settings, list(extra)
        self.history = history if history is not None else {}

    def load(self, parameters: list[torch.Tensor], optimiser: torch.optim.Optimizer) -> int:
        """Restore a saved state if there is one; returns the step to continue from."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=False)
        if state.get("settings") != self.settings:
            stale = self.path.with_suffix(".stale.pt")
            self.path.replace(stale)
            warnings.warn(f"{self.path} was saved under other settings than {self.settings}; kept as {stale.name}, "
                          "and this stage starts over", stacklevel=2)  # fmt: skip
            return 0
        with torch.no_grad():
            for mine, saved in zip([*parameters, *self.extra], state["tensors"], strict=True):
                mine.copy_(saved)
        optimiser.load_state_dict(state["optimiser"])
        for rng, saved in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = saved
        torch.set_rng_state(state["torch_rng"])
        for key, values in state["history"].items():
            self.history.setdefault(key, []).extend(values)
        return state["step"]

    def save(self, step: int, parameters: list[torch.Tensor], optimiser: torch.optim.Optimizer) -> None:
        state = {
            "step": step,
            "tensors": [t.detach().cpu().clone() for t in [*parameters, *self.extra]],
            "optimiser": optimiser.state_dict(),
            "rngs": [rng.bit_generator.state for rng in self.rngs],
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "settings": self.settings,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.path, "wb") as handle:
            torch.save(state, handle)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def _optimise(
    parameters: list[torch.Tensor],
    steps: int,
    lr: float,
    loss_fn: Callable[[int], torch.Tensor],
    stage: str,
    progress: Progress | None,
    weight_decay: float = 0.01,
    after_step: Callable[[int], None] | None = None,
    resume: _Resume | None = None,
) -> list[float]:
    """AdamW over ``parameters`` for ``steps`` steps of ``loss_fn(step)``, gradient norm
    clipped to 1, warm-up then cosine learning rate; returns the loss of every step.
    With ``resume``, continues from its checkpoint and writes one every few minutes."""
    optimiser = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    warmup = max(1, min(100, steps // 10))
    losses = resume.history.setdefault("loss", []) if resume else []
    first = resume.load(parameters, optimiser) if resume else 0
    if progress is not None and first:
        progress(stage, first, steps, float(np.mean(losses[-50:])))
    saved_at = time.perf_counter()
    for step in range(first, steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, warmup)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: the loss became {loss.item()} at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        if progress is not None:
            progress(stage, step + 1, steps, float(np.mean(losses[-50:])))
        if resume and time.perf_counter() - saved_at > CHECKPOINT_SECONDS and step + 1 < steps:
            resume.save(step + 1, parameters, optimiser)
            saved_at = time.perf_counter()
    if resume:
        resume.done()
    return losses


def _ema_update(averages: list[torch.Tensor], parameters: list[torch.Tensor], step: int, ema: float) -> None:
    """Move each running average toward its parameter after ``step``: decay ``ema``, ramped
    up from 0.1 over the first steps so the average soon forgets its starting point."""
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, p in zip(averages, parameters, strict=True):
            a.lerp_(p, 1 - decay)


def _autocast():
    """Mixed precision where the hardware has it: fp16 on CUDA, bf16 on CPUs with bf16
    instructions. Elsewhere fp32: on an AVX2-only CPU, bf16 autocast is emulated and
    makes a training step 15-30× slower."""
    if torch.cuda.is_available():
        return torch.autocast("cuda")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=_cpu_has_bf16())


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _fast_layout(module: nn.Module) -> nn.Module:
    """Channels-last weights: oneDNN's convolutions (forward and backward) run 1.5-3×
    faster in that layout on CPU. Values are unchanged."""
    return module.to(memory_format=torch.channels_last)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(rng: np.random.Generator, size: int, batch: int) -> Iterator[np.ndarray]:
    while True:
        yield rng.integers(size, size=batch)


# -- stage 1: the autoencoder ------------------------------------------------------------


def train_vae(out: Path, preset: dict, models: dict, progress: Progress | None) -> dict:
    """Train the VAE and store it (with its latent scaling factor) in ``out/vae``."""
    from diffusers import AutoencoderKL

    settings, seed = preset["vae"], preset["seed"]
    rng = np.random.default_rng([seed, 1])
    torch.manual_seed(seed)
    images = render_scenes(mixed_scenes(settings["images"], rng))
    device = _device()
    vae = _fast_layout(AutoencoderKL(**models["vae"]).to(device))
    batches = _batches(rng, len(images), settings["batch"])

    def loss_fn(step: int) -> torch.Tensor:
        x = to_tensor(images[next(batches)]).to(device, memory_format=torch.channels_last)
        with _autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mode()).sample.float()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + settings["kl"] * kl

    resume = _Resume(_checkpoint(out, "vae"), [rng], settings)
    losses = _optimise(list(vae.parameters()), settings["steps"], settings["lr"], loss_fn, "vae", progress, 0.0,
                       resume=resume)  # fmt: skip
    vae.eval().to(memory_format=torch.contiguous_format)
    held_out = mixed_scenes(min(200, settings["images"]), np.random.default_rng([seed, 11]))
    with torch.no_grad():
        latents = torch.cat([_encode(vae, render_scenes(held_out[i : i + 50])) for i in range(0, len(held_out), 50)])
        scale = 1 / latents.std().item()
        recon = np.stack([np.asarray(i) for i in _decode_images(vae, latents)]).astype(np.float64)
    error = np.mean((recon - render_scenes(held_out).astype(np.float64)) ** 2)
    vae.register_to_config(scaling_factor=scale)
    vae.to(torch.float16).save_pretrained(out / "vae")
    return {"final_loss": float(np.mean(losses[-50:])), "scaling_factor": scale,
            "held_out_psnr_db": float(10 * np.log10(255**2 / error))}  # fmt: skip


def _encode(vae, images: np.ndarray) -> torch.Tensor:
    return vae.encode(to_tensor(images).to(vae.device, vae.dtype)).latent_dist.mode().float()


def _decode_images(vae, latents: torch.Tensor) -> list:
    x = vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)
    pixels = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def _checkpoint(out: Path, stage: str) -> Path:
    return out / CHECKPOINTS / f"{stage}.pt"


# -- stage 2: the base pipeline ----------------------------------------------------------


class _Latents:
    """A pool of images as scaled VAE latents (the posterior's mode: the autoencoder is
    trained on its mode, see :func:`train_vae`)."""

    def __init__(self, vae, images: np.ndarray, chunk: int = 256) -> None:
        with torch.no_grad():
            latents = [_encode(vae, images[start : start + chunk]) for start in range(0, len(images), chunk)]
        self.latents = torch.cat(latents) * vae.config.scaling_factor

    def draw(self, index: np.ndarray) -> torch.Tensor:
        return self.latents[torch.from_numpy(index)]


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


def _diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    context: torch.Tensor,
    high_noise: float = 0.0,
    keep: torch.Tensor | None = None,
    teacher: Callable[..., torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
    keep_below: float = 1.0,
) -> torch.Tensor:
    """Per-row v-prediction MSE, ``(B,)``, at timesteps drawn uniformly, except that a
    ``high_noise`` share of rows is drawn from the noisier half of the schedule, where
    the layout (which half the figure stands in) is decided.

    With ``keep`` (``(B, 1, h, w)`` in [0, 1]) and ``teacher`` (the frozen model's
    ``(noisy, t) -> prediction``, on the base's own encoding of the captions), the target
    is moved toward the teacher's own prediction by ``keep`` at each latent cell: where
    ``keep`` is 1, the model is taught to draw what the teacher draws there, not what the
    picture shows, at timesteps below ``keep_below`` of the schedule only (above it, the
    teacher, not knowing the concept, would draw its own background around the other
    slots). ``weight`` (``(B, 1, h, w)``) weighs each cell's error."""
    noise = torch.randn_like(latents)
    total = scheduler.config.num_train_timesteps
    t = torch.randint(0, total, (latents.shape[0],), device=latents.device)
    noisier = torch.rand(latents.shape[0], device=latents.device) < high_noise
    t = torch.where(noisier, total // 2 + t // 2, t)
    noisy = scheduler.add_noise(latents, noise, t).contiguous(memory_format=torch.channels_last)
    target = scheduler.get_velocity(latents, noise, t)
    if keep is not None and teacher is not None:
        keep = keep * (t < keep_below * total).to(keep.dtype)[:, None, None, None]
        with torch.no_grad(), _autocast():
            target = torch.lerp(target, teacher(noisy, t).float(), keep)
    with _autocast():
        prediction = unet(noisy, t, context).sample.float()
    error = (prediction - target).pow(2)
    if weight is not None:
        error = error * weight / weight.mean(dim=(1, 2, 3), keepdim=True)
    return error.mean(dim=(1, 2, 3))


class _PositionProbes(nn.Module):
    """Linear probes that read the (x, y) position of every pixel from the input of each
    cross-attention layer, an auxiliary loss of base training only (not saved).

    A UNet knows where a pixel is only through its convolutions' zero padding, and from
    pure noise that signal is faint: trained on the diffusion loss alone, the base model
    learned colours, shapes and backgrounds but placed the figure by the noise and
    ignored "left" and "right", and its text encoder then merged the two words. The
    probes make the attention queries carry the position, so "on the left" has
    something to attend to from the first steps.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.features: list[tuple[str, torch.Tensor]] = []
        self.probes = nn.ModuleDict()
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                key = name.replace(".", "_")
                self.probes[key] = nn.Linear(module.to_q.in_features, 2)
                module.register_forward_pre_hook(lambda _, args, key=key: self.features.append((key, args[0])))

    def loss(self) -> torch.Tensor:
        """Mean squared error of the probes on the features of the last forward pass
        (``(B, H·W, C)`` on square grids) against coordinates in [-1, 1]."""
        errors = []
        for key, hidden in self.features:
            side = math.isqrt(hidden.shape[1])
            grid = torch.linspace(-1, 1, side, device=hidden.device)
            y, x = torch.meshgrid(grid, grid, indexing="ij")
            target = torch.stack([x, y], dim=-1).reshape(1, side * side, 2)
            errors.append(F.mse_loss(self.probes[key](hidden.float()), target.expand(hidden.shape[0], -1, -1)))
        self.features.clear()
        return torch.stack(errors).mean()


def _load_vae(out: Path, device: torch.device):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).to(device).eval()


def train_base(out: Path, preset: dict, models: dict, progress: Progress | None) -> dict:
    """Train the UNet and text encoder from scratch on generic scenes and save the whole pipeline."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(preset["seed"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**models["text_encoder"]))
    unet = UNet2DConditionModel(**models["unet"])
    return _fit_base(out, unet, text_encoder, preset["base"], [preset["seed"], 2], "base", models, progress)


def refine_base(out: Path, preset: dict, models: dict, progress: Progress | None, segment: int = 1) -> dict:
    """Continue the saved base on fresh generic scenes: warm-restart ``segment`` (1, 2, …),
    a new warm-up and cosine from its EMA weights, with a new optimiser and EMA, on scenes
    of its own. It lets a base be trained further after it was shipped, without redoing
    the steps already spent."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(preset["seed"])
    unet = UNet2DConditionModel.from_pretrained(out / "unet", dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32)
    name = "refine" if segment == 1 else f"refine-{segment}"
    key = [preset["seed"], 5] if segment == 1 else [preset["seed"], 5, segment]
    return _fit_base(out, unet, text_encoder, preset["refine"], key, name, models, progress)


def _fit_base(out: Path, unet: nn.Module, text_encoder: nn.Module, settings: dict, key: list[int], stage: str,
              models: dict, progress: Progress | None) -> dict:  # fmt: skip
    """The base's training loop, shared by ``base`` and ``refine``: diffusion loss on a pool
    of ``settings["images"]`` generic renders (drawn from a generator seeded with ``key``),
    caption dropout, position probes, EMA; saves the EMA weights as the pipeline. A
    ``made_up`` share of each generic element's captions puts a made-up word before its
    class word (:func:`~compose.demo_world.scenes.made_up_words`), from a generator of
    its own. ``stage`` names the progress bar and the checkpoint."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ..tokenizer import clip_tokenizer

    rng = np.random.default_rng(key)
    device = _device()
    vae = _load_vae(out, device)
    scenes = [sample_generic_scene(rng) for _ in range(settings["images"])]
    pool = _Latents(vae, render_scenes(scenes, progress, f"{stage}: render"))
    tokenizer = clip_tokenizer()
    words, share = np.random.default_rng([*key, 7]), settings.get("made_up", 0.0)
    ids = _token_ids(tokenizer, [s.caption(made_up_words(s, words, share)) for s in scenes]).to(device)
    empty = _token_ids(tokenizer, [""]).to(device)
    text_encoder = text_encoder.to(device).train()
    unet = _fast_layout(unet.to(device).train())
    scheduler = DDPMScheduler(**models["scheduler"])
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (unet, text_encoder)]
    probes = _PositionProbes(unet).to(device)
    batches = _batches(rng, len(scenes), settings["batch"])
    probe_losses = []

    def loss_fn(step: int) -> torch.Tensor:
        index = next(batches)
        tokens = ids[torch.from_numpy(index).to(device)]
        dropped = torch.from_numpy(rng.random(len(index)) < settings["drop_caption"]).to(device)
        tokens = torch.where(dropped[:, None], empty, tokens)
        with _autocast():
            context = text_encoder(tokens)[0]
        latents = pool.draw(index).to(device)
        loss = _diffusion_loss(unet, scheduler, latents, context.float(), settings["high_noise"]).mean()
        probe_loss = probes.loss()
        probe_losses.append(probe_loss.item())
        return loss + settings["position_probe"] * probe_loss

    parameters = list(unet.parameters()) + list(text_encoder.parameters()) + list(probes.parameters())
    averages = [p for model in ema for p in model.parameters()]
    trained = [p for model in (unet, text_encoder) for p in model.parameters()]
    resume = _Resume(_checkpoint(out, stage), [rng], settings, averages, {"probe": probe_losses})
    losses = _optimise(parameters, settings["steps"], settings["lr"], loss_fn, stage, progress,
                       after_step=lambda step: _ema_update(averages, trained, step, settings["ema"]),
                       resume=resume)  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ema[1],
        tokenizer=tokenizer,
        unet=ema[0].to(memory_format=torch.contiguous_format),
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipeline, out)
    count = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_encoder.parameters())
    return {"final_loss": float(np.mean(losses[-50:])), "probe_loss": float(np.mean(probe_losses[-50:])),
            "unet_parameters": count[0], "text_parameters": count[1]}  # fmt: skip


def save_pipeline(pipeline, out: Path) -> None:
    """Save in fp16 (half the bytes) so that a bare ``StableDiffusionPipeline.from_pretrained
    (out)`` loads every part in fp32: diffusers upcasts its models by default, but
    transformers keeps the dtype its config names, and a fp16 text encoder feeding a fp32
    UNet fails on the first cross-attention. So the text encoder's config says fp32."""
    pipeline.to(torch.float16).save_pretrained(out)
    config_path = out / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    with atomic_open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)


# -- stage 3: the LoRAs ------------------------------------------------------------------


def train_loras(out: Path, preset: dict, models: dict, progress: Progress | None, jobs: int | None = None) -> dict:
    """Train one LoRA per concept on the saved base, each alone, the way users train
    theirs, and save each; and the *ceiling* LoRA beside them, trained on composed scenes
    of all eleven concepts (a yardstick of how much a benchmark set can be got right, not
    a method).

    A LoRA's steps give its concept ``concept_rows`` batch rows, or its category's entry of
    ``rows_by_category`` (a character's face and parts are more to learn than a
    background's pattern), and ``prior_rows`` of generic scenes that it must leave as the
    base draws them. Its factors' running average (EMA, ``ema``) is what is saved. Each
    LoRA has its own random generators and checkpoint, so a run stopped between two LoRAs
    or inside one continues where it was, with the same weights, and ``jobs`` processes
    (:func:`lora_jobs` by default) can train them side by side, each on its share of the
    CPU threads: a LoRA's batch of a few 16×16 latents keeps two threads only partly busy,
    so on a 2-core CPU two processes of one thread train 1.5× more steps per second than
    one of two."""
    settings = preset["loras"]
    names = [*CONCEPTS, CEILING]
    folder = _checkpoint(out, "loras").with_suffix("")
    losses = {
        name: loss
        for name in names
        if (loss := _finished_loss(folder / f"{name}.json", _settings_of(settings, name))) is not None
    }
    todo = sorted((name for name in names if name not in losses), key=lambda name: -_lora_rows(settings, name))
    done = dict.fromkeys(losses, settings["steps"])

    def report(name: str, step: int, loss: float) -> None:
        done[name] = step
        if progress is not None:
            progress("loras", sum(done.values()), len(names) * settings["steps"], loss)

    jobs = min(jobs or lora_jobs(), len(todo))
    if jobs > 1:
        losses.update(_train_in_processes(out, preset, models, todo, jobs, report))
    elif todo:
        trainer = _LoRATrainer(out, preset, models)
        losses.update({name: trainer.train(name, report) for name in todo})
    shutil.rmtree(folder, ignore_errors=True)
    return {"final_loss": float(np.mean(list(losses.values()))), "targets": len(_lora_targets(models)),
            "rank": models["lora"]["rank"], "concept_loss": {name: losses[name] for name in names}}  # fmt: skip


def lora_jobs() -> int:
    """How many LoRAs to train at once by default: one on a GPU (processes would only
    share it), else one per CPU thread, at most four."""
    return 1 if torch.cuda.is_available() else max(1, min(4, torch.get_num_threads()))


def _finished_loss(path: Path, settings: dict) -> float | None:
    """The loss a LoRA finished with, from its marker, if it was trained under ``settings``."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record["loss"] if record["settings"] == settings else None


def _settings_of(settings: dict, name: str) -> dict:
    """The LoRA stage's settings for LoRA ``name``: its category's entry of
    ``category_settings`` over the shared ones (a background's pattern fills most of its
    pictures, so its LoRA weighs the other slots' error more, and distils the base on
    them only below half the schedule, where the noisy picture already fixes the background)."""
    if name == CEILING:
        return settings
    return {**settings, **settings.get("category_settings", {}).get(CONCEPTS[name].category, {})}


def _lora_rows(settings: dict, name: str) -> int:
    if name == CEILING:
        return settings["ceiling_rows"]
    return settings.get("rows_by_category", {}).get(CONCEPTS[name].category, settings["concept_rows"])


def _lora_targets(models: dict) -> list[str]:
    """The UNet modules a LoRA adapts, by ``models["lora"]["targets"]`` (a regex on their names)."""
    from diffusers import UNet2DConditionModel

    pattern = re.compile(models["lora"]["targets"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**models["unet"])
    return [n for n, m in unet.named_modules() if pattern.search(n) and isinstance(m, (nn.Linear, nn.Conv2d))]


def _text_encoder_targets(text_encoder: nn.Module) -> list[str]:
    """The text encoder's modules a LoRA adapts where it has a text part: every attention
    projection and MLP layer, as kohya's trainer targets."""
    pattern = re.compile(r"self_attn\.(q|k|v|out)_proj$|mlp\.fc[12]$")
    return [n for n, m in text_encoder.named_modules() if pattern.search(n) and isinstance(m, nn.Linear)]


class _LoRATrainer:
    """What every LoRA of a world trains against, built once per process: the frozen base
    with its target layers wrapped by the composable layer, and the pool of generic scenes."""

    def __init__(self, out: Path, preset: dict, models: dict) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        self.out, self.settings, self.seed, self.models = out, preset["loras"], preset["seed"], models
        self.device = _device()
        self.pipeline = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32).to(self.device)
        self.unet = _fast_layout(self.pipeline.unet).requires_grad_(False)
        self.scheduler = DDPMScheduler.from_config(models["scheduler"])
        prior_rng = np.random.default_rng([self.seed, 3])
        scenes = [sample_generic_scene(prior_rng) for _ in range(self.settings["images_per_concept"] * 4)]
        self.prior = _LoRAData(self.pipeline, scenes, self.device)
        self.pipeline.text_encoder.requires_grad_(False)
        text_encoder = self.pipeline.text_encoder
        self.registries = {"unet": LayerRegistry(self.unet), "text_encoder": LayerRegistry(text_encoder)}
        self.targets = {"unet": _lora_targets(models), "text_encoder": _text_encoder_targets(text_encoder)}

    def _new_tables(self, settings: dict) -> dict[str, dict[str, Factors]]:
        """Fresh factors per component: the UNet's at ``rank`` on the modules ``targets``
        matches (the model config's by default), the text encoder's at
        ``text_encoder_rank`` if it is set."""
        ranks = {"unet": settings.get("rank", self.models["lora"]["rank"]),
                 "text_encoder": settings.get("text_encoder_rank", 0)}  # fmt: skip
        targets = dict(self.targets)
        if "targets" in settings:
            targets["unet"] = _lora_targets({**self.models, "lora": {"targets": settings["targets"]}})
        return {component: {t: _new_factors(self.registries[component].wrap(t).base, rank, self.device)
                             for t in targets[component]}
                for component, rank in ranks.items() if rank}  # fmt: skip

    def _teacher(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        """The frozen base's prediction: the UNet with its LoRA off, on the base encoding."""
        state = self.registries["unet"].state
        state.weights = None
        try:
            return self.unet(noisy, t, context).sample
        finally:
            state.weights = ones

    def train(self, name: str, report: Callable[[str, int, float], None]) -> float:
        """Train, save and mark finished the LoRA ``name``; returns its loss over the last
        50 steps. ``report(name, step, loss)`` follows its steps."""
        settings, index = _settings_of(self.settings, name), [*CONCEPTS, CEILING].index(name)
        rng = np.random.default_rng([self.seed, 3, index])
        torch.manual_seed(self.seed * 1000 + index)
        count = settings["images_per_concept"]
        scenes = [sample_concept_scene(name, rng) if name != CEILING else random_composition(rng) for _ in range(count)]
        for registry in self.registries.values():
            registry.state.weights = None  # the previous LoRA's, off while the captions are encoded
        slot_loss = name != CEILING and (settings.get("preserve", 0.0) or settings.get("other_weight", 1.0) != 1.0)
        concept = _LoRAData(self.pipeline, scenes, self.device, _other_slots(scenes, name) if slot_loss else None)
        tables = self._new_tables(settings)
        parameters = [t for table in tables.values() for f in table.values() for t in (f.down, f.up)]
        average = [p.detach().clone() for p in parameters]
        rows, prior_rows = _lora_rows(settings, name), settings["prior_rows"]
        ones = torch.ones(rows + prior_rows, 1, device=self.device)

        def loss_fn(step: int) -> torch.Tensor:
            batch = _Rows.join(concept.draw(rng, rows), self.prior.draw(rng, prior_rows, drop=0.1))
            for component, registry in self.registries.items():
                registry.activate([tables.get(component, {})])
                registry.state.weights = ones
            context = batch.context
            if "text_encoder" in tables:
                context = self.pipeline.text_encoder(batch.ids)[0]
            if batch.others is None:
                return _diffusion_loss(self.unet, self.scheduler, batch.latents, context, settings["high_noise"]).mean()
            teacher = partial(self._teacher, context=batch.context, ones=ones)
            keep = settings.get("preserve", 0.0) * batch.others
            weight = 1 + (settings.get("other_weight", 1.0) - 1) * batch.others
            return _diffusion_loss(self.unet, self.scheduler, batch.latents, context, settings["high_noise"], keep,
                                   teacher if keep.any() else None, weight,
                                   settings.get("preserve_below", 1.0)).mean()  # fmt: skip

        folder = _checkpoint(self.out, "loras").with_suffix("")
        resume = _Resume(folder / f"{name}.pt", [rng], settings, average)
        history = _optimise(parameters, settings["steps"], settings["lr"], loss_fn, "loras",
                            lambda stage, step, steps, loss: report(name, step, loss),
                            after_step=lambda step: _ema_update(average, parameters, step, settings["ema"]),
                            resume=resume)  # fmt: skip
        with torch.no_grad():
            for p, a in zip(parameters, average, strict=True):
                p.copy_(a)
        _save_lora(lora_path(self.out, name), name, tables, settings, count)
        loss = float(np.mean(history[-50:]))
        with atomic_open(folder / f"{name}.json", "w") as handle:
            json.dump({"settings": settings, "loss": loss}, handle)
        return loss


def _train_in_processes(out: Path, preset: dict, models: dict, names: list[str], jobs: int,
                        report: Callable[[str, int, float], None]) -> dict[str, float]:  # fmt: skip
    """Train ``names`` in ``jobs`` spawned processes, each taking the next LoRA (heaviest
    first) when it finishes one; their steps come back to ``report``. A stop here (an
    error, Ctrl-C) stops them, and each LoRA keeps its last checkpoint."""
    context = multiprocessing.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    for name in [*names, *[None] * jobs]:
        tasks.put(name)
    threads = max(1, torch.get_num_threads() // jobs)
    workers = [context.Process(target=_lora_worker, args=(out, preset, models, threads, tasks, events))
               for _ in range(jobs)]  # fmt: skip
    for worker in workers:
        worker.start()
    losses: dict[str, float] = {}
    try:
        while len(losses) < len(names):
            try:
                kind, name, value = events.get(timeout=1.0)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers):
                    raise RuntimeError("the LoRA training processes stopped before their LoRAs were done") from None
                continue
            if kind == "failed":
                raise RuntimeError(f"training the LoRA {name or '(setting up)'} failed in its process:\n{value}")
            if kind == "done":
                losses[name] = value
            else:
                report(name, *value)
    finally:
        for worker in workers:
            if worker.is_alive() and len(losses) < len(names):
                worker.terminate()
            worker.join()
    return losses


def _lora_worker(out: Path, preset: dict, models: dict, threads: int, tasks, events) -> None:
    """A training process: takes LoRA names from ``tasks`` until ``None``, and puts
    ``(kind, name, value)`` events: ``step`` (step, loss), ``done`` (loss), ``failed`` (traceback)."""
    torch.set_num_threads(threads)
    name = None
    try:
        trainer = _LoRATrainer(out, preset, models)
        while (name := tasks.get()) is not None:
            loss = trainer.train(name, lambda name, step, loss: events.put(("step", name, (step, loss))))
            events.put(("done", name, loss))
    except Exception:
        events.put(("failed", name, traceback.format_exc()))


@dataclass
class _Rows:
    """A batch of a LoRA's training rows: latents ``(B, C, h, w)``, caption token ids
    ``(B, T)``, the base text encoder's encodings ``(B, T, D)``, and the maps of the
    other slots' cells ``(B, 1, h, w)`` or ``None`` (:func:`_other_slots`)."""

    latents: torch.Tensor
    ids: torch.Tensor
    context: torch.Tensor
    others: torch.Tensor | None

    @staticmethod
    def join(*parts: _Rows) -> _Rows:
        """The rows of ``parts`` in order; rows without maps have no other slots."""
        maps = [p.others if p.others is not None else torch.zeros_like(p.latents[:, :1]) for p in parts]
        others = None if all(p.others is None for p in parts) else torch.cat(maps)
        return _Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("latents", "ids", "context")), others)


class _LoRAData:
    """A LoRA's training pool: its scenes as VAE latents, with their captions' token ids
    and base encodings and, optionally, the map of the other slots' cells per scene
    (``(N, 1, h, w)``)."""

    def __init__(self, pipeline, scenes: list[Scene], device: torch.device, others: torch.Tensor | None = None) -> None:
        self.latents = _Latents(pipeline.vae, render_scenes(scenes))
        ids = _token_ids(pipeline.tokenizer, [s.caption() for s in scenes] + [""]).to(device)
        with torch.no_grad():
            encoded = torch.cat([pipeline.text_encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
        self.ids, self.empty_ids = ids[:-1], ids[-1:]
        self.context, self.empty = encoded[:-1], encoded[-1:]
        self.others = None if others is None else others.to(device)

    def draw(self, rng: np.random.Generator, rows: int, drop: float = 0.0) -> _Rows:
        """``rows`` random rows, each caption replaced by the empty prompt with probability ``drop``."""
        index = torch.from_numpy(rng.integers(len(self.context), size=rows))
        context, ids = self.context[index], self.ids[index]
        if drop:
            dropped = torch.from_numpy(rng.random(rows) < drop).to(context.device)
            context = torch.where(dropped[:, None, None], self.empty, context)
            ids = torch.where(dropped[:, None], self.empty_ids, ids)
        others = None if self.others is None else self.others[index]
        return _Rows(self.latents.draw(index.numpy()).to(context.device), ids, context, others)


def _other_slots(scenes: list[Scene], concept: str, cell: int = 4) -> torch.Tensor:
    """``(N, 1, 16, 16)``: 1 on the latent cells of the other slots of each scene, 0 on
    ``concept``'s own slot, for the slot terms of the LoRA loss.

    A LoRA trained on whole pictures learns the whole picture: the characters' LoRAs
    turned the hats they wear into stripes. Taught the frozen base's own prediction on
    the other slots' cells (``preserve``: a distillation term on the concept's own
    prompts, which DreamBooth's prior preservation only gives on other prompts), it
    leaves them as the base draws them; ``other_weight`` weighs their error instead. A
    figure, clothing or object slot is every cell it touches, grown by one cell (its
    edge); the background's is every cell the other slots cover less than half of; a
    style covers the whole picture and leaves no other cell."""
    slot = CONCEPTS[concept].slot
    inside = []
    for scene in scenes:
        _, masks = render_layers(scene)
        drawn = np.zeros((64, 64), bool)
        for mask in masks.values():
            drawn |= mask
        if slot == "style":
            drawn[:] = False
        inside.append(~drawn if slot in ("background", "style") else masks.get(slot, np.zeros((64, 64), bool)))
    pixels = torch.from_numpy(np.stack(inside)).float()[:, None]
    if slot in ("background", "style"):
        return (F.avg_pool2d(pixels, cell) <= 0.5).float()
    return 1 - F.max_pool2d(F.max_pool2d(pixels, cell), 3, stride=1, padding=1)


def _new_factors(base: nn.Linear | nn.Conv2d, rank: int, device: torch.device) -> Factors:
    """PEFT's initialisation: ``down`` Kaiming-uniform, ``up`` zero (the LoRA starts as a no-op)."""
    if isinstance(base, nn.Conv2d):
        down = torch.empty(rank, base.in_channels, *base.kernel_size)
        up = torch.zeros(base.out_channels, rank, 1, 1)
    else:
        down = torch.empty(rank, base.in_features)
        up = torch.zeros(base.out_features, rank)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    return Factors(down.to(device).requires_grad_(), up.to(device).requires_grad_())


def _save_lora(path: Path, name: str, tables: dict[str, dict[str, Factors]], settings: dict, images: int) -> None:
    """Diffusers-format keys (``unet.<module>.lora_A/B.weight``, and
    ``text_encoder.text_model.<module>...`` where it has a text part; alpha = rank so the
    scale is 1) in fp16, with the metadata other tools read: kohya's ``ss_*`` training
    record and ``sshs_*`` hashes (A1111 takes its hash and the base family from them),
    Stability's ``modelspec.*`` (architecture, trigger phrase, tensor hash), and ours
    (``compose_*``)."""
    tensors = {}
    for component, table in tables.items():
        for module, f in table.items():
            if component == "text_encoder" and not module.startswith("text_model."):
                module = f"text_model.{module}"  # the name diffusers and older transformers give it
            tensors[f"{component}.{module}.lora_A.weight"] = f.down.detach().to(torch.float16).cpu().contiguous()
            tensors[f"{component}.{module}.lora_B.weight"] = f.up.detach().to(torch.float16).cpu().contiguous()
    if name == CEILING:
        trigger, look = ", ".join(c.trigger for c in CONCEPTS.values()), "all eleven concepts, composed"
    else:
        trigger, look = CONCEPTS[name].trigger, CONCEPTS[name].look
    models = training_config()["models"]
    metadata = _kohya_record(path, name, next(iter(tables["unet"].values())).rank, trigger, settings, images, models)
    model_hash, legacy_hash = _kohya_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    metadata.update(_model_spec(name, trigger, look, model_hash, models))
    metadata["compose_look"] = look
    if name != CEILING:
        metadata["compose_category"] = CONCEPTS[name].category
    with atomic_open(path, "wb") as handle:
        handle.write(save(tensors, metadata))


def _kohya_record(path: Path, name: str, rank: int, trigger: str, settings: dict, images: int,
                  models: dict) -> dict[str, str]:  # fmt: skip
    """The ``ss_*`` keys kohya's ``train_network.py`` writes and A1111 shows or tests:
    ``ss_base_model_version``/``ss_v2`` for the family (kohya's ``sd_v1``, as the world is
    an SD1-architecture pipeline), ``ss_output_name`` for the alias, ``ss_tag_frequency``
    for the trigger, ``ss_sd_model_name`` (the base's folder) and ``ss_resolution``."""
    size = models["vae"]["sample_size"]
    return {
        "ss_output_name": name,
        "ss_sd_model_name": path.parent.parent.name,
        "ss_resolution": f"({size}, {size})",
        "ss_tag_frequency": json.dumps({"demo_world": {trigger: images}}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_num_train_images": str(images),
        "ss_max_train_steps": str(settings["steps"]),
        "ss_learning_rate": str(settings["lr"]),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
    }


def _kohya_hashes(tensors: dict[str, torch.Tensor], record: dict[str, str]) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)``, computed as kohya does on the file
    its ``ss_*`` keys alone would make: sha256 of the bytes after the header (A1111's and
    Civitai's LoRA hash, the same whatever the header holds), and the old addnet hash, the
    first 8 hex of sha256 of the 64 KiB at offset 1 MiB (of nothing, in a smaller file)."""
    import hashlib

    data = save(tensors, {k: v for k, v in record.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def _model_spec(name: str, trigger: str, look: str, model_hash: str, models: dict) -> dict[str, str]:
    """Stability's model spec (``modelspec.*``) as kohya writes it for an SD1 LoRA, with
    the world's resolution and prediction type; no date, so a re-run writes the same file."""
    size = models["vae"]["sample_size"]
    prediction = "v" if models["scheduler"]["prediction_type"] == "v_prediction" else "epsilon"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": prediction,
        "modelspec.trigger_phrase": trigger,
        "modelspec.description": look,
        "modelspec.hash_sha256": "0x" + model_hash,
    }


# -- stage 4: the offline CLIP ------------------------------------------------------------


def clip_preprocess_cfg(size: int) -> dict:
    """open_clip's preprocessing record for the demo world's CLIP (OpenAI's normalisation)."""
    return {"size": size, "mode": "RGB", "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}  # fmt: skip


def train_clip(out: Path, preset: dict, models: dict, progress: Progress | None) -> dict:
    """Train a small open_clip CLIP on renders and captions; saved for ``CLIPScorer.from_folder``."""
    import open_clip

    from ..evaluation.clipscore import CLIPScorer
    from .detectors import degrade

    settings, seed, config = preset["clip"], preset["seed"], models["clip"]
    rng = np.random.default_rng([seed, 4])
    torch.manual_seed(seed)
    device = _device()
    scenes = mixed_scenes(settings["images"], rng)
    clean = render_scenes(scenes)
    damaged = np.stack([np.asarray(degrade(Image.fromarray(a), seed=i, blur=rng.uniform(0, 1.2),
                                           noise=rng.uniform(0, 0.1), quality=int(rng.integers(30, 95))))
                        for i, a in enumerate(clean)])  # fmt: skip
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    captions = tokenizer([s.caption() for s in scenes])
    tags = tokenizer([tag_text(s) for s in scenes])
    model = open_clip.CLIP(**config).to(device)
    size = config["vision_cfg"]["image_size"]
    open_clip.set_model_preprocess_cfg(model, clip_preprocess_cfg(size))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    batches = _batches(rng, len(scenes), settings["batch"])

    def loss_fn(step: int) -> torch.Tensor:
        index = next(batches)
        use_damaged = rng.random(len(index)) < 0.5
        pixels = np.where(use_damaged[:, None, None, None], damaged[index], clean[index])
        x = ((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std).to(device)
        use_tags = torch.from_numpy(rng.random(len(index)) < 0.5)[:, None]
        text = torch.where(use_tags, tags[index], captions[index]).to(device)
        with _autocast():
            image_features = F.normalize(model.encode_image(x).float(), dim=-1)
            text_features = F.normalize(model.encode_text(text).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T
        labels = torch.arange(len(index), device=device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    losses = _optimise(list(model.parameters()), settings["steps"], settings["lr"], loss_fn, "clip", progress, 0.1,
                       resume=_Resume(_checkpoint(out, "clip"), [rng], settings))  # fmt: skip
    model.eval().to(torch.float16)
    preprocess = open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    CLIPScorer(model, preprocess, tokenizer, device="cpu", model_cfg=config).save(out / CLIP_FOLDER)
    return {"final_loss": float(np.mean(losses[-50:])), "parameters": sum(p.numel() for p in model.parameters())}


# -- the whole run -------------------------------------------------------------------------

_TRAINERS = {"vae": train_vae, "base": train_base, "refine": refine_base, "loras": train_loras, "clip": train_clip}


def train(
    out: str | Path,
    preset: str = "cpu",
    stages: tuple[str, ...] = STAGES,
    progress: Progress | None = None,
    force: bool = False,
    jobs: int | None = None,
) -> dict:
    """Run the ``stages`` of ``preset`` into ``out``, skipping those already finished
    there with the same preset and continuing an interrupted one from its checkpoint.
    A folder that holds a world of another preset is replaced only with ``force``.
    ``jobs`` processes train the LoRAs side by side (:func:`lora_jobs` by default).
    Returns (and writes to ``out/training.json``) the record
    of every stage: seconds, losses and checks. Also writes ``out/sets.json``, the
    benchmark's 240 composition sets (:func:`~compose.evaluation.sets.demo_world_manifest`),
    ``out/two_characters.json``, its 18 two-character sets, and ``out/loras/order.json``,
    the concepts' order, which the engine loads the LoRAs in without importing this
    package (:mod:`compose.bundles`); on every run, so a run with nothing left to train
    adds it to a world trained before it existed."""
    config = training_config()
    if preset not in config["presets"]:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(config['presets'])}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / REPORT
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    if record.get("preset") != preset:
        if record and not force:
            raise ValueError(f"{out} holds a demo world trained with preset {record.get('preset')!r}: train into "
                             "another folder, or pass --force to replace it")  # fmt: skip
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        record = {"preset": preset, "stages": {}}
    record["machine"] = _machine()
    record["world"] = WORLD_VERSION
    with atomic_open(record_path, "w") as handle:
        json.dump(record, handle, indent=2)
    settings = config["presets"][preset]
    for stage in STAGES:
        previous = record["stages"].get(stage)
        done, wanted = _segments_done(previous), settings[stage].get("segments", 1)
        if stage in PER_WORLD_VERSION and (previous or {}).get("world") != WORLD_VERSION:
            done = 0
        if stage not in stages or done >= wanted:
            continue
        for later in _downstream(stage):
            record["stages"].pop(later, None)
            _checkpoint(out, later).unlink(missing_ok=True)
            shutil.rmtree(_checkpoint(out, later).with_suffix(""), ignore_errors=True)
        with atomic_open(record_path, "w") as handle:
            json.dump(record, handle, indent=2)
        for segment in range(done + 1, wanted + 1):
            start = time.perf_counter()
            extra = {"segment": segment} if wanted > 1 else {"jobs": jobs} if stage == "loras" else {}
            result = _TRAINERS[stage](out, settings, config["models"], progress, **extra)
            result["seconds"] = round(time.perf_counter() - start, 1)
            if stage in PER_WORLD_VERSION:
                result["world"] = WORLD_VERSION
            record["stages"][stage] = _add_segment(record["stages"].get(stage), result) if wanted > 1 else result
            with atomic_open(record_path, "w") as handle:
                json.dump(record, handle, indent=2)
    demo_world_manifest(out).save(out / SETS)
    two_character_manifest(out).save(out / TWO_CHARACTERS)
    write_lora_order(out, CONCEPTS)
    return record


def _segments_done(result: dict | None) -> int:
    """How many segments of a stage ``result`` records: 0 if none, else its ``segments``
    list's length (a record from before segments existed counts as one)."""
    if result is None:
        return 0
    return len(result.get("segments", [result]))


def _add_segment(result: dict | None, segment: dict) -> dict:
    """The stage record with ``segment``'s result appended: the latest losses on top, the
    seconds summed, and every segment's own record under ``segments``."""
    earlier = [] if result is None else result.get("segments", [result])
    segments = [{k: v for k, v in s.items() if k != "segments"} for s in earlier] + [segment]
    return {**segment, "seconds": round(sum(s["seconds"] for s in segments), 1), "segments": segments}


def _downstream(stage: str) -> list[str]:
    """The stages trained on ``stage``'s output, directly or not: a rerun of ``stage``
    makes their results stale (refining the base means retraining the LoRAs)."""
    found: list[str] = []
    for later in STAGES:
        if any(u == stage or u in found for u in UPSTREAM[later]):
            found.append(later)
    return found


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
