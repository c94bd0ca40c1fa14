"""The GPU check (issue #38): exactness in float16 and speed at full size on one CUDA
machine, within a few minutes, written to ``docs/speed-gpu.json`` and ``docs/speed-gpu.md``.

Run it through ``scripts/gpu_check.sh``, which installs what the machine lacks from
``.whl/`` and puts the source tree on the path (see docs/gpu-check.md). Sections run in
order of value, each only if the time left covers its estimate; each prints its table as
it ends and the files are rewritten after every section, so a run that is cut off still
says what it measured. ``--dry-run`` runs the same sections on the CPU at toy sizes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import packages_distributions, version
from pathlib import Path

import torch

from compose import Composer, RunOptions, SamplingConfig
from compose.full_size import peft_state_dict, pipeline, random_loras, shared_copy, write_loras
from compose.methods import METHODS
from compose.schedulers import make_scheduler
from compose.speed import TensorMemory, agreement_markdown, generation_speed, run_speed_benchmark, summary_markdown
from compose.speed import to_markdown as speed_markdown

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a creature wearing a hat in front of a wall, painted"
SEED = 3
CATEGORIES = ("character", "clothing", "style", "background", "object")
METHOD_PARAMS = {"cmlora": {"ordering": "category"}}
"""CMLoRA orders its LoRAs by category here: its default, frequency profiling, generates
each LoRA's image first, which is not what is compared."""
DRY_NOTE = (
    "\nA dry run: toy models stand in (`tiny` for SD1.5, `tiny-xl` for SDXL), in float32 at toy sizes; the "
    "section titles say what the GPU run measures, the tables what this run did. Its numbers check the script, "
    "not the engine's speed.\n"
)
MARGIN_S = 20.0
"""Seconds kept back at the end of the budget for writing the files."""


@dataclass(frozen=True)
class Scale:
    """The sizes a run uses: the real ones on a GPU, toy ones in a dry run. ``models`` maps
    a full-size model to what runs for it, ``latents`` an image side in pixels to a latent
    side, ``ranks`` a LoRA rank to the rank used; ``ns`` are the LoRA counts of the speed
    tables, ``compiled_ns`` those of the compiled one."""

    models: dict[str, str]
    latents: dict[int, int]
    ranks: dict[int, int]
    ns: tuple[int, ...]
    compiled_ns: tuple[int, ...]
    dtype: torch.dtype
    warmup: int
    repeats: int
    exact_steps: int
    generation_steps: int
    memory_steps: int
    compile_backend: str


GPU = Scale(
    {"sd15": "sd15", "sdxl": "sdxl"},
    {512: 64, 1024: 128},
    {16: 16, 64: 64},
    (1, 2, 3, 4, 5),
    (1, 3, 5),
    torch.float16,
    warmup=1,
    repeats=3,
    exact_steps=4,
    generation_steps=25,
    memory_steps=4,
    compile_backend="inductor",
)
DRY = Scale(
    {"sd15": "tiny", "sdxl": "tiny-xl"},
    {512: 8, 1024: 16},
    {16: 4, 64: 8},
    (1, 3),
    (2,),
    torch.float32,
    warmup=0,
    repeats=1,
    exact_steps=3,
    generation_steps=3,
    memory_steps=2,
    compile_backend="eager",
)


@dataclass
class Run:
    """One run's settings and clock: the section functions read their sizes from ``scale``
    and stop timing sweeps at ``end``."""

    device: torch.device
    scale: Scale
    end: float
    """``time.perf_counter()`` value at which the budget, less :data:`MARGIN_S`, is spent."""
    workdir: Path

    def left(self) -> float:
        return self.end - time.perf_counter()

    def model(self, name: str) -> str:
        return self.scale.models[name]


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    run: Callable[[Run], dict]
    gpu_s: float
    """About how long it takes on an H100 (first estimates; a run records the real time)."""
    dry_s: float


def say(text: str) -> None:
    print(text, flush=True)


# -- exactness -------------------------------------------------------------------------


def _reference_latents(pipe, names: list[str], weights: list[float], size: int, steps: int) -> torch.Tensor:
    """diffusers' own generation with its PEFT adapters ``names`` at ``weights``."""
    pipe.set_adapters(names, weights)
    out = pipe(
        PROMPT,
        negative_prompt="",
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="latent",
    )
    return out.images.float()


def _with_adapters(pipe, loras: list[dict]) -> None:
    """``loras`` as diffusers' PEFT adapters ``lora0``, ``lora1``... of ``pipe``, whose
    scheduler becomes the composer's default (DPM-Solver++ 2M)."""
    for i, factors in enumerate(loras):
        pipe.load_lora_weights(peft_state_dict(factors, "unet."), adapter_name=f"lora{i}")
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)


def _compare(check: str, ours: torch.Tensor, reference: torch.Tensor, noise: float, effect: float) -> dict:
    """One comparison: within ``2 * noise`` (two results each within ``noise`` of the
    float32 result differ by at most that) plus 1e-4 of the largest latent, and only
    meaningful if the LoRAs' ``effect`` is larger than that allowance."""
    error = (ours.float() - reference).abs().max().item()
    allowed = 2 * noise + 1e-4 * reference.abs().max().item()
    row = {
        "check": check,
        "max_abs": error,
        "allowed": allowed,
        "noise": noise,
        "effect": effect,
        "ok": error <= allowed and effect > allowed,
    }
    say(
        f"  {check:<40} max |diff| {error:.2e}  allowed {allowed:.2e}  LoRA effect {effect:.2e}  "
        f"{'ok' if row['ok'] else 'FAIL'}"
    )
    return row


def exactness(run: Run) -> dict:
    """Every method with one LoRA against diffusers' ``load_lora_weights`` + ``set_adapters``;
    Merge of three LoRAs against ``set_adapters``; Composite of three in one batch-6 pass
    against its sequential form (``max_batch=2``: one batch-2 pass per LoRA). The allowance
    is diffusers' own float16 error (its float16 result against the same weights computed
    in float32, TF32 off) on the same LoRAs, twice over."""
    scale, model = run.scale, run.model("sd15")
    reference = pipeline(model, scale.dtype, run.device)
    composer = Composer(shared_copy(reference), model_name=f"random {model}")
    truth = copy.deepcopy(reference).to(dtype=torch.float32) if scale.dtype != torch.float32 else None
    loras = random_loras(reference.unet, [scale.ranks[16]] * 3)
    for i, path in enumerate(write_loras(loras, run.workdir / "exactness")):
        composer.load_lora(path, name=f"lora{i}", category=CATEGORIES[i])
    size = scale.latents[512] * reference.vae_scale_factor
    steps = scale.exact_steps
    for pipe in (reference, truth):
        if pipe is not None:
            _with_adapters(pipe, loras)

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a float32 truth

    def theirs(names: list[str], weights: list[float]) -> tuple[torch.Tensor, float]:
        low = _reference_latents(reference, names, weights, size, steps)
        if truth is None:
            return low, 0.0
        high = _reference_latents(truth, names, weights, size, steps)
        return low, (low - high).abs().max().item()

    def ours(loras_: list, method: str, max_batch: int | None = None) -> torch.Tensor:
        return composer.generate(
            PROMPT,
            loras_,
            method,
            seed=SEED,
            lora_scale=0.8,
            method_params=METHOD_PARAMS.get(method),
            sampling=SamplingConfig(steps=steps, width=size, height=size),
            run=RunOptions(output_type="latent", max_batch=max_batch),
        )

    base = ours([], "merge").float()
    one, noise_one = theirs(["lora0"], [0.8])
    effect_one = (one - base).abs().max().item()
    rows = [_compare(f"{m}, one LoRA vs diffusers", ours(["lora0"], m), one, noise_one, effect_one) for m in METHODS]
    weights = [1.0, 0.5, 0.7]
    three, noise_three = theirs(["lora0", "lora1", "lora2"], [0.8 * w for w in weights])
    effect_three = (three - base).abs().max().item()
    uses = list(zip(["lora0", "lora1", "lora2"], weights, strict=True))
    rows.append(_compare("merge, 3 LoRAs vs set_adapters", ours(uses, "merge"), three, noise_three, effect_three))
    sequential = ours(uses, "composite", max_batch=2).float()
    rows.append(
        _compare(
            "composite, 3 LoRAs: 1 pass vs 3 sequential",
            ours(uses, "composite"),
            sequential,
            noise_three,
            (sequential - base).abs().max().item(),
        )
    )
    return {
        "model": model,
        "dtype": str(scale.dtype).removeprefix("torch."),
        "size": size,
        "steps": steps,
        "rank": scale.ranks[16],
        "checks": rows,
        "passed": all(r["ok"] for r in rows),
    }


# -- speed -----------------------------------------------------------------------------


def speed(model: str, pixels: int, rank: int, compiled: bool = False) -> Callable[[Run], dict]:
    """A section timing one step of every method (the speed benchmark, batch 2 = one image
    with CFG) on ``model`` at ``pixels`` px with LoRAs of ``rank``: against diffusers' PEFT
    path, or (``compiled``) under ``torch.compile`` against eager."""

    def section(run: Run) -> dict:
        scale = run.scale
        result = run_speed_benchmark(
            preset=run.model(model),
            ns=scale.compiled_ns if compiled else scale.ns,
            rank=scale.ranks[rank],
            latent_size=scale.latents[pixels],
            device=str(run.device),
            dtype=scale.dtype,
            warmup=scale.warmup,
            repeats=scale.repeats,
            baselines=not compiled,
            compiled=compiled,
            world=False,
            compile_backend=scale.compile_backend,
            deadline=run.end,
            progress=lambda text: say(f"  {text}"),
        )
        say(summary_markdown(result) + agreement_markdown(result))
        return result

    return section


# -- whole generations -----------------------------------------------------------------


def _composer(run: Run, model: str, count: int, rank: int) -> Composer:
    pipe = pipeline(run.model(model), run.scale.dtype, run.device)
    composer = Composer(pipe, model_name=f"random {run.model(model)}")
    loras = random_loras(pipe.unet, [run.scale.ranks[rank]] * count)
    for i, path in enumerate(write_loras(loras, run.workdir / f"{model}-{count}")):
        composer.load_lora(path, name=f"lora{i}", category=CATEGORIES[i])
    return composer


def _peak(device: torch.device, work: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak MiB of tensor memory that ``work`` allocates beyond what was
    allocated before it (``torch.cuda.max_memory_allocated``; on a CPU, :class:`TensorMemory`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    start = time.perf_counter()
    with torch.no_grad(), TensorMemory() as tracker:
        work()
    return time.perf_counter() - start, tracker.peak / 2**20


def memory(run: Run) -> dict:
    """Composite with 5 LoRAs at 1024 px on SDXL, a whole generation (VAE decoding
    included): time and peak memory with ``generate``'s default ``max_batch`` and with
    ``max_batch=2`` (one LoRA branch per UNet call)."""
    composer = _composer(run, "sdxl", 5, 16)
    size = run.scale.latents[1024] * composer.pipeline.vae_scale_factor
    names = [f"lora{i}" for i in range(5)]
    default = RunOptions().max_batch
    model_mib = sum(p.numel() * p.element_size() for p in composer.pipeline.unet.parameters()) / 2**20
    rows, calls = [], []
    composer.pipeline.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    for max_batch in dict.fromkeys([default, 2]):
        calls.clear()

        def generate(max_batch: int | None = max_batch) -> None:
            composer.generate(
                PROMPT,
                names,
                "composite",
                seed=SEED,
                sampling=SamplingConfig(steps=run.scale.memory_steps, width=size, height=size),
                run=RunOptions(max_batch=max_batch),
            )

        seconds, peak = _peak(run.device, generate)
        rows.append(
            {
                "max_batch": max_batch,
                "rows_per_call": sorted(set(calls)),
                "seconds": round(seconds, 3),
                "peak_mib": round(peak, 1),
            }
        )
        say(
            f"  composite N=5 {size}px, max_batch={max_batch} (UNet rows per call {sorted(set(calls))}): "
            f"{seconds:.2f} s for {run.scale.memory_steps} steps, peak {peak / 1024:.2f} GiB beyond the models "
            f"(UNet {model_mib / 1024:.2f} GiB)"
        )
    return {
        "model": run.model("sdxl"),
        "size": size,
        "steps": run.scale.memory_steps,
        "n": 5,
        "default_max_batch": default,
        "unet_mib": round(model_mib, 1),
        "rows": rows,
    }


def generations(run: Run) -> dict:
    """Images per second of whole SD1.5 generations (text encoding, 25 steps, VAE
    decoding) at 512 px: no LoRA, and Merge and Composite of three LoRAs, 1 and 2 images a call."""
    composer = _composer(run, "sd15", 3, 16)
    size = run.scale.latents[512] * composer.pipeline.vae_scale_factor
    steps, composers = run.scale.generation_steps, {"eager": composer}
    rows = generation_speed(composers, PROMPT, [], ["merge"], (1, 2), steps, 2, size)
    rows += generation_speed(
        composers, PROMPT, ["lora0", "lora1", "lora2"], ["merge", "composite"], (1, 2), steps, 2, size
    )
    for r in rows:
        say(f"  {r['method']} N={r['n']} batch {r['batch']}: {r['images_per_s']:.2f} images/s ({r['seconds']:.2f} s)")
    return {"model": run.model("sd15"), "size": size, "rows": rows}


# -- the plan --------------------------------------------------------------------------

SECTIONS = (
    Section("exactness", "Exactness, float16, SD1.5 at 512 px", exactness, 40, 15),
    Section("sd15-512", "Speed, SD1.5 UNet, 512 px, rank 16", speed("sd15", 512, 16), 35, 8),
    Section("sdxl-1024", "Speed, SDXL UNet, 1024 px, rank 16", speed("sdxl", 1024, 16), 70, 10),
    Section("memory", "Memory, SDXL Composite of 5 LoRAs at 1024 px", memory, 30, 5),
    Section("generation", "Whole SD1.5 generations, 512 px", generations, 30, 8),
    Section(
        "compiled",
        "Compiled vs eager, SD1.5 UNet, 512 px, rank 16",
        speed("sd15", 512, 16, compiled=True),
        150,
        30,
    ),
    Section("sd15-512-r64", "Speed, SD1.5 UNet, 512 px, rank 64", speed("sd15", 512, 64), 35, 8),
    Section("sdxl-512", "Speed, SDXL UNet, 512 px, rank 16", speed("sdxl", 512, 16), 35, 8),
    Section("sd15-1024", "Speed, SD1.5 UNet, 1024 px, rank 16", speed("sd15", 1024, 16), 70, 8),
)


def environment(device: torch.device) -> dict:
    """What ran the check: the device, its driver, and the versions that matter."""
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for package in ("diffusers", "transformers", "peft", "accelerate", "safetensors"):
        env[package] = version(package)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            env["driver"] = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown (no nvidia-smi)"
    return env


def imports() -> dict[str, list[str]]:
    """What this process imported: the installed distributions of its top-level modules
    (the check's dependencies), and the subpackages of ``compose`` (``app`` and
    ``evaluation`` would need the installed package-dir mapping)."""
    owners = packages_distributions()
    names = {name.partition(".")[0] for name in sys.modules}
    inner = {name.split(".")[1] for name in sys.modules if name.startswith("compose.")}
    return {"imported": sorted({d for name in names for d in owners.get(name, [])}), "compose": sorted(inner)}


def to_markdown(report: dict) -> str:
    """docs/speed-gpu.md: the machine, then each section's tables or why it did not run."""
    env = report["environment"]
    where = f"CPU ({env['cpu']}), a dry run"
    if "gpu" in env:
        where = f"{env['gpu']} ({env['gpu_memory_gib']} GiB), driver {env['driver']}"
    out = (
        f"# GPU check\n\nMeasured by `bash scripts/gpu_check.sh{' --dry-run' if report['dry_run'] else ''}` "
        f"on {where}, {env['date']}: Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), "
        f"diffusers {env['diffusers']}, transformers {env['transformers']}, peft {env['peft']}. "
        f"Random weights, real configs; budget {report['budget_s']:.0f} s.\n" + (DRY_NOTE if report["dry_run"] else "")
    )
    for key, entry in report["sections"].items():
        out += f"\n## {entry['title']}\n\n"
        if entry["status"] != "done":
            out += f"{entry['status']}: {entry['reason']}\n"
            continue
        out += f"{entry['seconds']:.0f} s.\n\n" + _section_markdown(key, entry["result"])
    return out


def _section_markdown(key: str, result: dict) -> str:
    if key == "exactness":
        out = (
            f"{result['model']}, {result['dtype']}, {result['size']} px, {result['steps']} steps, rank "
            f"{result['rank']}; final latents.\n\n| check | max abs diff | allowed | LoRA effect | ok |\n"
            "|---|---|---|---|---|\n"
        )
        for r in result["checks"]:
            out += f"| {r['check']} | {r['max_abs']:.2e} | {r['allowed']:.2e} | {r['effect']:.2e} | {r['ok']} |\n"
        return out
    if key == "memory":
        out = (
            f"{result['model']}, {result['size']} px, {result['steps']} steps, N = 5, UNet "
            f"{result['unet_mib'] / 1024:.2f} GiB; `generate`'s default `max_batch` is "
            f"{result['default_max_batch']}; the rows per call are what the UNet received.\n\n"
            "| max_batch | UNet rows per call | seconds | peak GiB beyond the models |\n|---|---|---|---|\n"
        )
        return out + "".join(
            f"| {r['max_batch']} | {', '.join(map(str, r['rows_per_call']))} | {r['seconds']:.2f} | "
            f"{r['peak_mib'] / 1024:.2f} |\n"
            for r in result["rows"]
        )
    if key == "generation":
        out = (
            f"{result['model']}, {result['size']} px, {result['rows'][0]['steps']} steps.\n\n"
            "| method | N | images per call | images/s | s per call |\n|---|---|---|---|---|\n"
        )
        return out + "".join(
            f"| {r['method']} | {r['n']} | {r['batch']} | {r['images_per_s']:.2f} | {r['seconds']:.2f} |\n"
            for r in result["rows"]
        )
    return speed_markdown(result)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed-gpu.json").write_text(json.dumps(report, indent=2))
    (out / "speed-gpu.md").write_text(to_markdown(report))


def _previous(out: Path, env: dict) -> dict:
    """The sections of an earlier run on the same device and versions, kept by a partial rerun."""
    path = out / "speed-gpu.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    same = all(earlier["environment"].get(k) == env.get(k) for k in ("gpu", "torch", "diffusers"))
    return earlier["sections"] if same else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, toy sizes, float32")
    parser.add_argument("--budget", type=float, help="seconds for the whole command [360; 110 with --dry-run]")
    parser.add_argument("--started", type=float, help="the command's start (Unix time) [now]")
    parser.add_argument("--sections", help=f"comma-separated, of: {', '.join(s.key for s in SECTIONS)} [all]")
    parser.add_argument("--out", type=Path, help="folder [docs, or outputs/gpu-check-dry-run with --dry-run]")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        say("gpu_check: no CUDA device here; use --dry-run to check the script on a CPU")
        return 2
    wanted = args.sections.split(",") if args.sections else [s.key for s in SECTIONS]
    unknown = set(wanted) - {s.key for s in SECTIONS}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    budget = args.budget or (110.0 if dry else 360.0)
    elapsed = time.time() - (args.started or time.time())
    device = torch.device("cpu" if dry else "cuda")
    out = args.out or (ROOT / ("outputs/gpu-check-dry-run" if dry else "docs"))
    env = environment(device)
    report = {"dry_run": dry, "budget_s": budget, "environment": env, "sections": {}}
    report["sections"] = {k: v for k, v in _previous(out, env).items() if k not in wanted}
    say(
        f"gpu_check: {env.get('gpu', 'CPU dry run')}, torch {env['torch']}, diffusers {env['diffusers']}; "
        f"{budget - elapsed:.0f} s left of {budget:.0f}"
    )
    with tempfile.TemporaryDirectory() as workdir:
        run = Run(device, DRY if dry else GPU, time.perf_counter() + budget - elapsed - MARGIN_S, Path(workdir))
        plan = [s for s in SECTIONS if s.key in wanted]
        for section in plan:
            report["sections"][section.key] = _run_section(run, section, dry)
            report["environment"] |= imports()
            write(report, out)
        skipped = [s.key for s in plan if report["sections"][s.key]["status"] == "skipped"]
    if skipped:
        say(
            f"gpu_check: out of time for {', '.join(skipped)}; run them with "
            f"`bash scripts/gpu_check.sh --sections {','.join(skipped)}` (results merge into {out})"
        )
    failed = [k for k, v in report["sections"].items() if v["status"] == "failed"]
    exact = report["sections"].get("exactness", {}).get("result", {}).get("passed", True)
    say(
        f"gpu_check: wrote {out / 'speed-gpu.json'} and {out / 'speed-gpu.md'}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ("" if exact else "; EXACTNESS FAILED")
    )
    return 1 if failed or not exact else 0


def _run_section(run: Run, section: Section, dry: bool) -> dict:
    """Run one section if the time left covers its estimate; its entry in the report."""
    estimate = section.dry_s if dry else section.gpu_s
    entry = {"title": section.title}
    if run.left() < estimate:
        say(f"\n== {section.title}: skipped ({run.left():.0f} s left, needs about {estimate:.0f} s)")
        return entry | {
            "status": "skipped",
            "reason": f"{run.left():.0f} s of the budget left, about {estimate:.0f} s needed",
        }
    say(f"\n== {section.title}")
    start = time.perf_counter()
    try:
        result = section.run(run)
    except Exception as error:  # noqa: BLE001 - one section's failure must not lose the others' results
        say(f"  failed: {type(error).__name__}: {error}")
        return entry | {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    finally:
        gc.collect()
        torch._dynamo.reset()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - start
    say(f"  ({seconds:.0f} s)")
    return entry | {"status": "done", "seconds": round(seconds, 1), "result": result}


if __name__ == "__main__":
    sys.exit(main())
