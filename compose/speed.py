"""``compose bench --speed``: the cost of one denoising step per method, side by side.

For a UNet shape (random weights), N = 1..5 random LoRAs and batch 1 with CFG, it times
in one process, with warm-up and device synchronisation, the median and spread of:
a LoRA-free step (the floor); this engine's Merge, Switch and Composite; and diffusers'
own PEFT path (``set_adapters`` for Merge, the reference's sequential N batch-2 passes
with adapter switching for Composite). Ratios are to the floor and to the diffusers
baseline of the same method.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from .layers import LayerRegistry
from .loading import LoRA
from .loop import Conditioning, predict_noise
from .methods import CMLoRA, CompositionMethod, MethodContext, get_method
from .methods.cmlora import refresh_steps
from .tiny import ATTENTION_PROJECTIONS, random_factors, tiny_sd_unet

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
SMALL = {**SD15, "block_out_channels": (64, 128, 256, 256), "sample_size": 32}
PRESETS = {"tiny": None, "small": SMALL, "sd15": SD15, "sdxl": SDXL}
METHOD_NAMES = ("merge", "switch", "composite", "klora")
SCHEDULE_STEPS = 25
CMLORA_ROWS = ("cmlora refresh step", "cmlora cached step")


@dataclass
class Timing:
    config: str
    n: int
    median_ms: float
    iqr_ms: float
    peak_mib: float | None = None
    vs_floor: float | None = None
    vs_diffusers: float | None = None


def build_unet(preset: str) -> UNet2DConditionModel:
    """A random UNet of the preset's shape (``tiny``, ``small``, ``sd15``, ``sdxl``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    torch.manual_seed(0)
    return tiny_sd_unet() if preset == "tiny" else UNet2DConditionModel(**PRESETS[preset])


def _conditioning(unet, rows: int, device, dtype) -> Conditioning:
    width = unet.config.cross_attention_dim
    ehs = torch.randn(rows, 77, width, device=device, dtype=dtype)
    if unet.config.addition_embed_type != "text_time":
        return Conditioning(ehs)
    pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    return Conditioning(
        ehs,
        {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * rows, device=device, dtype=dtype),
        },
    )


Job = tuple[str, int, list, Callable[[], object]]


def _measure(jobs: list[Job], activate: Callable[[list], None], device: torch.device, warmup: int, repeats: int):
    """Per job: median and interquartile range in ms, and peak CUDA memory in MiB.

    Repeats run round-robin over the jobs, so slow drifts of the machine (clock,
    other load) spread over every configuration instead of biasing some.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: list[list[float]] = [[] for _ in jobs]
    peaks: list[float | None] = [None] * len(jobs)
    for sweep in tqdm(range(warmup + repeats), desc="timing sweeps", unit="sweep"):
        for k, (_, _, active, fn) in enumerate(jobs):
            activate(active)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            sync()
            if sweep >= warmup:
                samples[k].append((time.perf_counter() - start) * 1000)
                if device.type == "cuda":
                    peaks[k] = max(peaks[k] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
    results = []
    for times, peak in zip(samples, peaks, strict=True):
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        results.append((statistics.median(times), quartiles[2] - quartiles[0], peak))
    return results


def run_speed_benchmark(
    preset: str = "small",
    max_loras: int = 5,
    rank: int = 16,
    latent_size: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    warmup: int = 2,
    repeats: int = 5,
    baselines: bool = True,
) -> dict:
    """Time one CFG denoising step per configuration; returns the table as data."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    unet = build_unet(preset).to(device, dtype).eval()
    size = latent_size or unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    conditioning = _conditioning(unet, 2, device, dtype)
    loras = [
        LoRA(
            f"lora{i}",
            "",
            "",
            "",
            "random",
            "random",
            {"unet": random_factors(unet, ATTENTION_PROJECTIONS, rank, seed=i)},
        )
        for i in range(max_loras)
    ]
    reference = None
    if baselines:
        reference = copy.deepcopy(unet)
        for lora in loras:
            state = {
                f"{m}.lora_{ab}.weight": x
                for m, f in lora.factors["unet"].items()
                for ab, x in (("A", f.down), ("B", f.up))
            }
            reference.load_lora_adapter(state, prefix=None, adapter_name=lora.name)
    registry = LayerRegistry(unet)
    for module in loras[0].factors["unet"]:
        registry.wrap(module)

    jobs: list[Job] = []

    run = partial(predict_noise, unet, registry.state, latents, t, conditioning)

    def ours(method: CompositionMethod, n: int, step: int = 1) -> Callable[[], object]:
        weights = torch.full((n,), 0.8, device=device)
        method.prepare(MethodContext(loras[:n], weights, SCHEDULE_STEPS, list(registry.layers), unet))

        def one_step() -> object:
            with torch.no_grad():
                eps = method.predict(step, run)
                eps = eps.view(-1, 2, 1, *eps.shape[1:])
                return method.combine(eps[:, 0], eps[:, 1], 7.5, step)

        if isinstance(method, CMLoRA):
            registry.activate([lora.factors["unet"] for lora in loras[:n]])
            method.predict(0, run)
        return one_step

    def diffusers_merge(n: int) -> Callable[[], object]:
        def step() -> object:
            reference.set_adapters([lora.name for lora in loras[:n]], [0.8] * n)
            with torch.no_grad():
                return reference(latents, t, **_kwargs(conditioning)).sample

        return step

    def diffusers_composite(n: int) -> Callable[[], object]:
        def step() -> object:
            outs = []
            for lora in loras[:n]:
                reference.set_adapters([lora.name], [0.8])
                with torch.no_grad():
                    outs.append(reference(latents, t, **_kwargs(conditioning)).sample)
            return torch.stack(outs).mean(0)

        return step

    def floor() -> object:
        with torch.no_grad():
            return unet(latents, t, **_kwargs(conditioning)).sample

    jobs.append(("no LoRA (floor)", 0, [], floor))
    for n in range(1, max_loras + 1):
        active = [lora.factors["unet"] for lora in loras[:n]]
        for name in METHOD_NAMES:
            jobs.append((name, n, active, ours(get_method(name), n)))
        cmlora = CMLoRA(ordering="category")
        jobs.append(("cmlora refresh step", n, active, ours(cmlora, n, step=0)))
        jobs.append(("cmlora cached step", n, active, ours(cmlora, n, step=1)))
        if reference is not None:
            jobs.append(("diffusers merge", n, [], diffusers_merge(n)))
            jobs.append(("diffusers composite (sequential)", n, [], diffusers_composite(n)))
    measured = _measure(jobs, registry.activate, device, warmup, repeats)
    rows = [Timing(config, n, *_round(m)) for (config, n, _, _), m in zip(jobs, measured, strict=True)]

    refreshed = len(refresh_steps("nonuniform", SCHEDULE_STEPS)) / SCHEDULE_STEPS
    for n in range(1, max_loras + 1):
        full, cached = (next(r for r in rows if r.config == c and r.n == n) for c in CMLORA_ROWS)
        average = refreshed * full.median_ms + (1 - refreshed) * cached.median_ms
        rows.append(Timing(f"cmlora ({SCHEDULE_STEPS}-step average)", n, round(average, 3), 0.0, full.peak_mib))
    floor_ms = rows[0].median_ms
    by_key = {(r.config, r.n): r for r in rows}
    for r in rows:
        r.vs_floor = round(r.median_ms / floor_ms, 3)
        base = by_key.get(
            (
                f"diffusers {r.config}"
                if r.config == "merge"
                else "diffusers composite (sequential)"
                if r.config == "composite" or r.config.startswith("cmlora")
                else "",
                r.n,
            )
        )
        if base is not None:
            r.vs_diffusers = round(r.median_ms / base.median_ms, 3)
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "latent_size": size,
        "rank": rank,
        "batch": "1 image with CFG (2 rows)",
        "repeats": repeats,
        "rows": [asdict(r) for r in rows],
    }


def _kwargs(conditioning: Conditioning) -> dict:
    return {
        "encoder_hidden_states": conditioning.encoder_hidden_states,
        "added_cond_kwargs": conditioning.added_cond_kwargs,
    }


def _round(values: tuple) -> tuple:
    return tuple(None if v is None else round(v, 3) for v in values)


def to_markdown(result: dict) -> str:
    """The result as a markdown table with a one-line header of the setup."""
    head = (
        f"UNet `{result['preset']}`, {result['device']}, {result['dtype']}, latents "
        f"{result['latent_size']}x{result['latent_size']}, rank {result['rank']}, "
        f"{result['batch']}, median of {result['repeats']}\n\n"
    )
    memory = any(r["peak_mib"] is not None for r in result["rows"])
    columns = ["configuration", "N", "ms/step (median)", "IQR ms", "x floor", "x diffusers"]
    lines = [
        "| " + " | ".join(columns + ["peak MiB"] * memory) + " |",
        "|---" * (len(columns) + memory) + "|",
    ]
    for r in result["rows"]:
        cells = [
            r["config"],
            r["n"],
            f"{r['median_ms']:.2f}",
            f"{r['iqr_ms']:.2f}",
            f"{r['vs_floor']:.2f}",
            "" if r["vs_diffusers"] is None else f"{r['vs_diffusers']:.2f}",
        ]
        if memory:
            cells.append(f"{r['peak_mib']:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "speed.json", out / "speed.md"
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(to_markdown(result))
    return json_path, md_path
