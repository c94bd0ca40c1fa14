"""``compose bench --speed``: the cost of one denoising step per method, side by side.

For a UNet shape (random weights), N random LoRAs (or LoRA files) and batch 1 with CFG,
it times in one process, round-robin over configurations, with warm-up and device
synchronisation, the median and spread of: a LoRA-free step (the floor); this engine's
methods; the same under ``torch.compile`` (:mod:`compose.compiled`); and diffusers' own
PEFT path (``set_adapters`` for Merge, the reference's sequential N batch-2 passes with
adapter switching for Composite). Ratios are to the floor and to the diffusers baseline
of the same method, all measured in the same run. With the baselines, one step of Merge
and Composite is also compared with diffusers' (*agreement*: the largest difference
relative to the largest prediction).

Merge, Switch and K-LoRA fold their weights into the base weights
(:mod:`compose.layers`): their plain rows time a step with the fold in place, their
*folding step* rows a step that folds every layer first, and their 25-step averages
weigh the two by how often a generation folds (once for Merge; at every switch for
Switch; for K-LoRA, each layer whenever its winner changes). CMLoRA is timed at a
refresh and at a cached step and averaged over its 25-step non-uniform schedule.

Peak memory is the largest amount of tensor memory a step allocates beyond the model
(folded weights included): ``torch.cuda.max_memory_allocated`` on CUDA, on the CPU a
dispatch-level tracker of tensor storages (:class:`TensorMemory`; ``tracemalloc`` does
not see tensor storage, which PyTorch allocates outside Python's allocator).

The full-size presets (``sd15``, ``sdxl``: the real UNets, 860 M and 2.6 B parameters,
:mod:`compose.full_size`) run on a CPU too, with settings that finish there
(:func:`defaults`: bfloat16, 8x8 latents, N = 3 and 5 of ranks 16 to 128, no compiled
rows, median of 3). The demo world rows time whole generations of the shipped demo world
(``Composer.load("demo-world")``, its native size and 25 steps) in images per second,
batch 1 and 8, eager and compiled.
"""

from __future__ import annotations

import json
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from .attention_maps import AttentionProbe
from .calls import SamplingConfig
from .compiled import CompiledUNet
from .feature_cache import DeepFeatureCache
from .full_size import SD15, SDXL, TINY, TINY_XL, building, peft_state_dict, random_loras, shared_copy
from .layers import LayerRegistry, Routes
from .loading import LoRA, load_lora
from .loop import Conditioning, predict_noise
from .methods import CMLoRA, CompositionMethod, KLoRA, MethodContext, Routed, Switch, get_method
from .methods.cmlora import refresh_steps

SMALL = {**SD15, "block_out_channels": (64, 128, 256, 256), "sample_size": 32}
PRESETS = {"tiny": TINY, "tiny-xl": TINY_XL, "small": SMALL, "sd15": SD15, "sdxl": SDXL}
FULL_SIZE = ("sd15", "sdxl")
FOLDING = ("merge", "switch", "klora")
"""Methods whose steps fold their weights (every row shares them)."""
COMPILED = ("merge", "switch", "klora", "composite")
SCHEDULE_STEPS = 25
CMLORA_ROWS = ("cmlora refresh step", "cmlora cached step")
SHALLOW = "shallow branch (no LoRA, deep features cached)"
WORLD_LORAS = ("zorbo", "flimbo", "brakka", "vosh")
WORLD_PROMPT = "a zorbo creature wearing a flimbo hat on the right, a brakka key on the left, vosh sky background"
WORLD_METHODS = ("merge", "composite")
CPU_FULL_SIZE = dict(dtype=torch.bfloat16, latent_size=8, ns=(3, 5), rank=(16, 64, 128, 32), warmup=1, repeats=3,
                     compiled=False, world=False)  # fmt: skip
"""What a full-size preset runs with on a CPU unless told otherwise: bfloat16 (SDXL's UNet is
5 GB in it, 10 GB in float32, and bfloat16 steps are about twice as fast on a CPU), 8x8
latents, N = 3 and 5 LoRAs of ranks 16, 64, 128, 32, 16 (cycled), one warm-up and three
timed sweeps, without the compiled rows (compiling a full UNet takes many minutes on a
CPU) and without the demo world."""


@dataclass
class Timing:
    config: str
    n: int
    median_ms: float
    iqr_ms: float
    peak_mib: float | None = None
    vs_floor: float | None = None
    vs_diffusers: float | None = None


@dataclass
class Job:
    """One timed configuration: ``setup`` (untimed: stack the LoRAs, fold where the row
    times a step with the fold in place) then ``run`` (timed)."""

    config: str
    n: int
    setup: Callable[[], None]
    run: Callable[[], object]
    memory: bool = True
    floor: str = "no LoRA (floor)"
    extra: dict = field(default_factory=dict)


class TensorMemory(TorchDispatchMode):
    """The peak bytes of tensor storage allocated by the operations run inside (views and
    in-place results, which share an input's storage, are not allocations); storages
    count until they are freed. Works on any device, in eager mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def build_unet(
    preset: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> UNet2DConditionModel:
    """A random UNet of the preset's shape (a key of :data:`PRESETS`), built in ``dtype``
    on ``device``, in eval mode."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    torch.manual_seed(0)
    with building(dtype, device):
        return UNet2DConditionModel(**PRESETS[preset]).eval()


def defaults(preset: str, device: torch.device) -> dict:
    """The settings :func:`run_speed_benchmark` uses where it is not told: on a CPU, a
    full-size preset runs :data:`CPU_FULL_SIZE`; otherwise float16 on CUDA (float32 on a
    CPU), the preset's own latent size, N = 1..5 of rank 16, two warm-up and five timed
    sweeps, with the compiled and demo-world rows unless the preset is ``tiny``."""
    if device.type == "cpu" and preset in FULL_SIZE:
        return dict(CPU_FULL_SIZE)
    toy = preset.startswith("tiny")
    return dict(dtype=torch.float16 if device.type == "cuda" else torch.float32, latent_size=None,
                ns=tuple(range(1, 6)), rank=16, warmup=2, repeats=5, compiled=not toy, world=not toy)  # fmt: skip


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


def _measure(jobs: list[Job], device: torch.device, warmup: int, repeats: int, memory: bool,
             deadline: float | None = None) -> tuple[list[tuple], int]:  # fmt: skip
    """Per job: median and interquartile range in ms, and peak memory in MiB; and how many
    timed sweeps ran (fewer than ``repeats`` when ``deadline``, a ``time.perf_counter()``
    value, passed after the first timed sweep).

    Repeats run round-robin over the jobs, so slow drifts of the machine (clock,
    other load) spread over every configuration instead of biasing some.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: list[list[float]] = [[] for _ in jobs]
    peaks: list[float | None] = [None] * len(jobs)
    if memory and device.type != "cuda":
        for k, job in enumerate(tqdm(jobs, desc="memory", unit="job")):
            if job.memory:
                job.setup()
                with torch.no_grad(), TensorMemory() as tracker:
                    job.run()
                peaks[k] = tracker.peak / 2**20
    for sweep in tqdm(range(warmup + repeats), desc="timing sweeps", unit="sweep"):
        if deadline is not None and sweep > warmup and time.perf_counter() > deadline:
            break
        for k, job in enumerate(jobs):
            job.setup()
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            job.run()
            sync()
            if sweep >= warmup:
                samples[k].append((time.perf_counter() - start) * 1000)
                if device.type == "cuda" and memory:
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    peaks[k] = max(peaks[k] or 0.0, peak)
    results = []
    for times, peak in zip(samples, peaks, strict=True):
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        results.append((statistics.median(times), quartiles[2] - quartiles[0], peak))
    return results, len(samples[0])


def _loras(unet, count: int, ranks: Sequence[int], files: Sequence[str | Path]) -> list[LoRA]:
    """``files`` read as LoRAs for ``unet``, or ``count`` random ones of ``ranks`` (cycled)."""
    if files:
        return [load_lora(path, unet_config=dict(unet.config)) for path in files]
    factors = random_loras(unet, [ranks[i % len(ranks)] for i in range(count)])
    return [LoRA(f"lora{i}", "", "", "", "random", "random", {"unet": f}) for i, f in enumerate(factors)]


class _Rig:
    """What every timed step shares: one UNet of ``preset`` (random weights), one CFG batch
    (2 rows of ``latent_size``² latents at t = 500), ``max_loras`` LoRAs (random of
    ``ranks``, or read from ``files``); with ``baselines`` a copy holding them as diffusers
    PEFT adapters, with ``compiled`` a copy under :class:`~compose.compiled.CompiledUNet` with
    static LoRA slots. The copies share the UNet's weights (:func:`~compose.full_size.shared_copy`)."""

    def __init__(self, preset: str, max_loras: int, ranks: Sequence[int], latent_size: int | None,
                 device: torch.device, dtype: torch.dtype, baselines: bool, compiled: bool, compile_backend: str,
                 files: Sequence[str | Path] = ()) -> None:  # fmt: skip
        self.device = device
        self.unet = build_unet(preset, dtype, device)
        self.size = latent_size or self.unet.config.sample_size
        self.latents = torch.randn(2, self.unet.config.in_channels, self.size, self.size, device=device, dtype=dtype)
        self.t = torch.tensor(500, device=device)
        self.conditioning = _conditioning(self.unet, 2, device, dtype)
        self.loras = _loras(self.unet, max_loras, ranks, files)
        self.reference = self._peft_copy() if baselines else None
        compiled_unet = shared_copy(self.unet) if compiled else None
        self.registry = self._wrapped(self.unet)
        self.registry.state.expected_calls = SCHEDULE_STEPS
        self.targets: list[tuple[object, LayerRegistry]] = [(self.unet, self.registry)]
        if compiled_unet is not None:
            static = self._wrapped(compiled_unet)
            static.make_static(len(self.loras), max(lora_rank(lora) for lora in self.loras))
            self.targets.append((CompiledUNet(compiled_unet, static.state, backend=compile_backend), static))
        self.shallow = DeepFeatureCache(self.unet)

    @property
    def compiled(self) -> bool:
        return len(self.targets) > 1

    def _wrapped(self, unet) -> LayerRegistry:
        registry = LayerRegistry(unet)
        for module in dict.fromkeys(m for lora in self.loras for m in lora.factors["unet"]):
            registry.wrap(module)
        return registry

    def _peft_copy(self) -> UNet2DConditionModel:
        reference = shared_copy(self.unet)
        for lora in self.loras:
            reference.load_lora_adapter(peft_state_dict(lora.factors["unet"]), prefix=None, adapter_name=lora.name)
        return reference

    def floor(self) -> object:
        with torch.no_grad():
            return self.unet(self.latents, self.t, **_kwargs(self.conditioning)).sample

    def job(self, config: str, n: int, method: CompositionMethod | None, step: int = 1, target: int = 0,
            fold_first: bool = True, extra: dict | None = None) -> Job:  # fmt: skip
        """One CFG step of ``method`` (``None``: the LoRAs' plain sum) over the first ``n``
        LoRAs at step ``step``, on the eager (``target`` 0) or compiled (1) UNet."""
        model, reg = self.targets[target]
        run = partial(predict_noise, model, reg.state, self.latents, self.t, self.conditioning)
        active = [lora.factors["unet"] for lora in self.loras[:n]]
        if method is not None:
            weights = torch.full((n,), 0.8, device=self.device)
            method.prepare(MethodContext(self.loras[:n], weights, SCHEDULE_STEPS, list(reg.layers), model))

        def one_step() -> object:
            with torch.no_grad():
                if method is None:
                    return run(torch.zeros(1, n, device=self.device))
                eps = method.predict(step, run)
                eps = eps.view(-1, 2, 1, *eps.shape[1:])
                return method.combine(eps[:, 0], eps[:, 1], 7.5, step)

        def setup() -> None:
            reg.activate(active)
            if fold_first and (method is None or method.name in FOLDING or target == 1):
                one_step()  # the fold (or the folded graph) is in place for the timed step

        if isinstance(method, CMLoRA):
            reg.activate(active)
            with torch.no_grad():
                method.predict(0, run)
        return Job(config, n, setup, one_step, memory=target == 0, extra=extra or {})

    def routed_jobs(self, n: int) -> list[Job]:
        """Routed's two kinds of step for ``n`` LoRAs: a probe step (Merge, cross-attention
        maps read beside the layers) and a routed step (each LoRA on its own vertical
        stripe of the latent, off the other LoRAs' tokens)."""
        reg, run = self.registry, partial(predict_noise, self.unet, self.registry.state, self.latents, self.t,
                                          self.conditioning)  # fmt: skip
        active = [lora.factors["unet"] for lora in self.loras[:n]]
        row = torch.full((1, n), 0.8, device=self.device)
        stripes = torch.zeros(1, n, self.size, self.size, device=self.device)
        for j in range(n):
            stripes[:, j, :, j * self.size // n : (j + 1) * self.size // n] = 1
        tokens = self.conditioning.encoder_hidden_states.shape[1]
        routes = Routes(stripes, torch.ones(n, tokens, device=self.device))
        probe = AttentionProbe(self.unet, [[1, 2]] * n)

        def probed() -> object:
            with torch.no_grad(), probe:
                eps = run(row)
            probe.step((self.size, self.size))
            return eps

        def routed() -> object:
            with torch.no_grad():
                return run(row, routes=routes)

        def setup() -> None:
            reg.activate(active)
            probed()

        return [Job("routed probe step", n, setup, probed), Job("routed step", n, lambda: reg.activate(active), routed)]

    def shallow_jobs(self) -> list[Job]:
        """The LoRA-free floor, and the same step with its deep features replayed from a cache."""

        def capture() -> None:
            self.registry.activate([])
            with torch.no_grad(), self.shallow.capture([0]):
                self.floor()

        def replay() -> object:
            with self.shallow.reuse([0]):
                return self.floor()

        return [Job("no LoRA (floor)", 0, lambda: self.registry.activate([]), self.floor),
                Job(SHALLOW, 0, capture, replay)]  # fmt: skip

    def _diffusers_merge(self, n: int) -> Callable[[], torch.Tensor]:
        reference, names, kwargs = self.reference, [lora.name for lora in self.loras[:n]], _kwargs(self.conditioning)

        def merge() -> torch.Tensor:
            reference.set_adapters(names, [0.8] * n)
            with torch.no_grad():
                return reference(self.latents, self.t, **kwargs).sample

        return merge

    def _diffusers_composite(self, n: int) -> Callable[[], torch.Tensor]:
        """The reference's Composite prediction: ``n`` sequential batch-2 passes, one adapter
        each, averaged (before guidance)."""
        reference, names, kwargs = self.reference, [lora.name for lora in self.loras[:n]], _kwargs(self.conditioning)

        def composite() -> torch.Tensor:
            outs = []
            for name in names:
                reference.set_adapters([name], [0.8])
                with torch.no_grad():
                    outs.append(reference(self.latents, self.t, **kwargs).sample)
            return torch.stack(outs).mean(0)

        return composite

    def diffusers_jobs(self, n: int) -> list[Job]:
        """diffusers' own path for ``n`` LoRAs: ``set_adapters`` for Merge, and the reference's
        Composite, ``n`` sequential batch-2 passes switching the adapter between them."""
        return [Job("diffusers merge", n, _nothing, self._diffusers_merge(n), memory=False),
                Job("diffusers composite (sequential)", n, _nothing, self._diffusers_composite(n),
                    memory=False)]  # fmt: skip

    def agreement(self, n: int) -> list[dict]:
        """One step of this engine's Merge (all ``n`` LoRAs at 0.8, folded) and Composite (one
        batch-2n pass, branch j on LoRA j, averaged) against diffusers' ``set_adapters`` and
        sequential passes: the largest absolute difference, and relative to the largest
        absolute prediction."""
        self.registry.activate([lora.factors["unet"] for lora in self.loras[:n]])
        run = partial(predict_noise, self.unet, self.registry.state, self.latents, self.t, self.conditioning)
        with torch.no_grad():
            merge = run(torch.full((1, n), 0.8))
            branches = run(0.8 * torch.eye(n))
        composite = branches.view(n, *self.latents.shape).mean(0)
        self.registry.activate([])
        rows = []
        for method, ours, reference in (("merge", merge, self._diffusers_merge(n)()),
                                        ("composite", composite, self._diffusers_composite(n)())):  # fmt: skip
            error = (ours.float() - reference.float()).abs().max().item()
            scale = reference.float().abs().max().item()
            rows.append({"method": method, "n": n, "max_abs": error, "relative": error / scale})
        return rows


def _nothing() -> None:
    return None


def _jobs(rig: _Rig, ns: Sequence[int]) -> list[Job]:
    """Every configuration of the table, in the order it prints."""
    jobs = rig.shallow_jobs()
    if rig.compiled:
        jobs.append(rig.job("compiled no LoRA (floor)", 0, None, target=1))
    for n in ns:
        for name in ("merge", "switch", "composite", "klora"):
            jobs.append(rig.job(name, n, get_method(name)))
            if name in FOLDING:
                folding = get_method(name)
                jobs.append(rig.job(f"{name} (folding step)", n, folding, fold_first=False, extra={"method": folding}))
        cmlora = CMLoRA(ordering="category")
        jobs.append(rig.job("cmlora refresh step", n, cmlora, step=0))
        jobs.append(rig.job("cmlora cached step", n, cmlora, step=1))
        jobs += rig.routed_jobs(n)
        if rig.compiled:
            jobs += [rig.job(f"compiled {name}", n, get_method(name), target=1) for name in COMPILED]
        if rig.reference is not None:
            jobs += rig.diffusers_jobs(n)
    return jobs


def run_speed_benchmark(
    preset: str = "small",
    max_loras: int | None = None,
    rank: int | Sequence[int] | None = None,
    latent_size: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    baselines: bool = True,
    compiled: bool | None = None,
    world: bool | None = None,
    compile_backend: str = "inductor",
    memory: bool = True,
    world_steps: int = SCHEDULE_STEPS,
    world_batches: tuple[int, ...] = (1, 8),
    world_repeats: int | None = None,
    progress: Callable[[str], None] | None = None,
    ns: Sequence[int] | None = None,
    lora_files: Sequence[str | Path] = (),
    deadline: float | None = None,
) -> dict:
    """Time one CFG denoising step per configuration; returns the table as data.

    ``preset`` names the UNet shape (:data:`PRESETS`) and ``latent_size`` overrides its
    latent side (latent pixels); each configuration runs ``warmup`` untimed then ``repeats``
    timed steps, round-robin, over ``ns`` LoRA counts (or 1..``max_loras``), each LoRA of
    ``rank`` (one rank, or one per LoRA, cycled), or the LoRAs of ``lora_files`` (each count
    capped at their number).
    ``baselines`` adds diffusers' PEFT rows and the agreement check, ``compiled`` the
    ``torch.compile`` rows (``compile_backend``), ``memory`` the peak-memory column, and
    ``world`` whole demo-world generations of ``world_steps`` steps at each batch of
    ``world_batches`` (``world_repeats`` sweeps, default half of ``repeats``; compiled too
    where ``compiled`` and not on a CPU). Settings not
    given come from :func:`defaults`. ``deadline`` (a ``time.perf_counter()`` value) ends
    the timed sweeps early, after the first."""
    say = progress or (lambda _: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    given = dict(dtype=dtype, latent_size=latent_size, rank=rank, warmup=warmup, repeats=repeats, compiled=compiled,
                 world=world, ns=ns or (range(1, max_loras + 1) if max_loras else None))  # fmt: skip
    settings = defaults(preset, device) | {k: v for k, v in given.items() if v is not None}
    ranks = (settings["rank"],) if isinstance(settings["rank"], int) else tuple(settings["rank"])
    ns = sorted({min(n, len(lora_files)) if lora_files else n for n in settings["ns"]})
    rig = _Rig(preset, max(ns), ranks, settings["latent_size"], device, settings["dtype"], baselines,
               settings["compiled"], compile_backend, lora_files)  # fmt: skip
    jobs = _jobs(rig, ns)
    if settings["compiled"]:
        say("compiling (once per graph: folded, stacked)")
        for j in jobs:
            if j.config.startswith("compiled"):
                j.setup()
                j.run()
    say(f"timing {len(jobs)} configurations")
    measured, timed = _measure(jobs, device, settings["warmup"], settings["repeats"], memory, deadline)
    rows = [Timing(j.config, j.n, *_round(m)) for j, m in zip(jobs, measured, strict=True)]
    used = [lora_rank(lora) for lora in rig.loras]
    _averages(rows, jobs, ns)
    _ratios(rows)
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(settings["dtype"]).removeprefix("torch."),
        "latent_size": rig.size,
        "rank": used[0] if len(set(used)) == 1 else used,
        "loras": [Path(p).name for p in lora_files] or None,
        "batch": "1 image with CFG (2 rows)",
        "repeats": timed,
        "compile_backend": compile_backend if settings["compiled"] else None,
        "rows": [asdict(r) for r in rows],
    }
    if baselines:
        result["agreement"] = [row for n in ns for row in rig.agreement(n)]
    if settings["world"]:
        say("timing the demo world's generations")
        # a CPU compiles the world's UNet in about 3 min per graph and batch: longer than its timings
        backend = compile_backend if settings["compiled"] and device.type != "cpu" else None
        sweeps = world_repeats or max(1, settings["repeats"] // 2)
        result["world"] = world_speed(device, world_steps, world_batches, sweeps, backend)
    return result


def lora_rank(lora: LoRA) -> int:
    """The largest rank of a LoRA's UNet factors."""
    return max(f.rank for f in lora.factors["unet"].values())


def _folds(method: CompositionMethod, n: int) -> float:
    """How many whole-model folds a 25-step generation of ``method`` does: once for
    Merge, once per turn for Switch, and for K-LoRA one plus a layer fold each time a
    layer's winner changes, over the layer count (its choices are tabulated by then)."""
    if isinstance(method, Switch):
        return float(len({step // method.tau for step in range(SCHEDULE_STEPS)})) if n > 1 else 1.0
    choices = getattr(method, "choices", None)
    if isinstance(method, KLoRA) and choices is not None:
        return 1.0 + (choices[1:] != choices[:-1]).sum().item() / max(1, choices.shape[1])
    return 1.0


def _averages(rows: list[Timing], jobs: list[Job], ns: Sequence[int]) -> None:
    """The 25-step averages of the folding methods and of CMLoRA, appended to ``rows``."""
    by_key = {(r.config, r.n): (r, j) for r, j in zip(rows, jobs, strict=True)}
    refreshed = len(refresh_steps("nonuniform", SCHEDULE_STEPS)) / SCHEDULE_STEPS
    for n in ns:
        for name in FOLDING:
            steady, _ = by_key[(name, n)]
            folding, job = by_key[(f"{name} (folding step)", n)]
            folds = _folds(job.extra["method"], n)
            average = steady.median_ms + (folding.median_ms - steady.median_ms) * folds / SCHEDULE_STEPS
            rows.append(Timing(f"{name} ({SCHEDULE_STEPS}-step average)", n, round(average, 3), 0.0, folding.peak_mib))
        full, cached = (by_key[(c, n)][0] for c in CMLORA_ROWS)
        average = refreshed * full.median_ms + (1 - refreshed) * cached.median_ms
        rows.append(Timing(f"cmlora ({SCHEDULE_STEPS}-step average)", n, round(average, 3), 0.0, full.peak_mib))
        probed, routed = by_key[("routed probe step", n)][0], by_key[("routed step", n)][0]
        share = max(1, round(Routed.probe * SCHEDULE_STEPS)) / SCHEDULE_STEPS
        average = share * probed.median_ms + (1 - share) * routed.median_ms
        peaks = [p for p in (probed.peak_mib, routed.peak_mib) if p is not None]
        peak = max(peaks) if peaks else None
        rows.append(Timing(f"routed ({SCHEDULE_STEPS}-step average)", n, round(average, 3), 0.0, peak))


def _ratios(rows: list[Timing]) -> None:
    floors = {r.config: r.median_ms for r in rows if r.n == 0}
    by_key = {(r.config, r.n): r for r in rows}
    for r in rows:
        floor = floors.get("compiled no LoRA (floor)") if r.config.startswith("compiled") else None
        r.vs_floor = round(r.median_ms / (floor or floors["no LoRA (floor)"]), 3)
        if r.config.startswith("merge"):
            base = by_key.get(("diffusers merge", r.n))
        elif r.config == "composite" or r.config.startswith("cmlora"):
            base = by_key.get(("diffusers composite (sequential)", r.n))
        else:
            base = None
        if base is not None:
            r.vs_diffusers = round(r.median_ms / base.median_ms, 3)


def world_speed(
    device: torch.device,
    steps: int = SCHEDULE_STEPS,
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 2,
    compile_backend: str | None = "inductor",
    methods: tuple[str, ...] = WORLD_METHODS,
) -> list[dict]:
    """Images per second of whole demo-world generations with the quick start's four LoRAs
    at the world's native size (:func:`generation_speed`), eager and (with
    ``compile_backend``) compiled."""
    from .composer import Composer

    composers = {"eager": Composer.load("demo-world", device=str(device))}
    if compile_backend is not None:
        composers["compiled"] = Composer.load("demo-world", device=str(device), compile=compile_backend)
    return generation_speed(composers, WORLD_PROMPT, WORLD_LORAS, methods, batches, steps, repeats)


def generation_speed(composers: dict, prompt: str, loras: Sequence[str], methods: Sequence[str],
                     batches: Sequence[int], steps: int = SCHEDULE_STEPS, repeats: int = 2,
                     size: int | None = None) -> list[dict]:  # fmt: skip
    """Images per second of whole generations (text encoding, ``steps`` denoising steps, VAE
    decoding to images) of ``prompt`` with ``loras``, per method, batch (images per call, one
    seed each) and mode (a key of ``composers``: ``eager``, ``compiled``...), at ``size``
    pixels (default the model's). Each configuration is warmed up once (the compiled ones
    compile there), then timed ``repeats`` times round-robin; ``speedup`` is against the
    ``eager`` mode where there is one."""
    configs = [(mode, method, batch) for method in methods for batch in batches for mode in composers]

    def generate(mode: str, method: str, batch: int) -> None:
        composers[mode].generate(prompt, list(loras), method, seed=list(range(batch)),
                                 sampling=SamplingConfig(steps=steps, width=size, height=size))  # fmt: skip

    for config in tqdm(configs, desc="generation warm-up", unit="config"):
        generate(*config)
    samples: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in tqdm(range(repeats), desc="generation sweeps", unit="sweep"):
        for config in configs:
            start = time.perf_counter()
            generate(*config)
            samples[config].append(time.perf_counter() - start)
    rows = []
    for (mode, method, batch), times in samples.items():
        seconds = statistics.median(times)
        rows.append({"mode": mode, "method": method, "n": len(loras), "batch": batch, "steps": steps,
                     "seconds": round(seconds, 3), "images_per_s": round(batch / seconds, 3)})  # fmt: skip
    eager = {(r["method"], r["batch"]): r["seconds"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        if (r["method"], r["batch"]) in eager:
            r["speedup"] = round(eager[(r["method"], r["batch"])] / r["seconds"], 3)
    return rows


def _kwargs(conditioning: Conditioning) -> dict:
    return {
        "encoder_hidden_states": conditioning.encoder_hidden_states,
        "added_cond_kwargs": conditioning.added_cond_kwargs,
    }


def _round(values: tuple) -> tuple:
    return tuple(None if v is None else round(v, 3) for v in values)


SUMMARY_COLUMNS = (
    ("merge", "merge (25-step average)"),
    ("switch", "switch (25-step average)"),
    ("klora", "klora (25-step average)"),
    ("composite", "composite"),
    ("cmlora", "cmlora (25-step average)"),
    ("routed", "routed (25-step average)"),
    ("diffusers merge", "diffusers merge"),
    ("diffusers sequential composite", "diffusers composite (sequential)"),
)
COMPILED_COLUMNS = tuple((f"compiled {m}", f"compiled {m}") for m in COMPILED)


def summary_markdown(result: dict) -> str:
    """The tables of docs/speed.md: time per step relative to the LoRA-free step per method and
    N (compiled rows relative to the compiled LoRA-free step), Composite and CMLoRA
    against the sequential loop, peak memory, and the demo world's images per second."""
    rows = {(r["config"], r["n"]): r for r in result["rows"]}
    ns = sorted({r["n"] for r in result["rows"] if r["n"] > 0})
    columns = [c for c in SUMMARY_COLUMNS + COMPILED_COLUMNS if (c[1], ns[0]) in rows]
    has_sequential = ("diffusers composite (sequential)", ns[0]) in rows
    head = ["N", *(label for label, _ in columns)]
    has_shallow = (SHALLOW, 0) in rows and ("cmlora cached step", ns[0]) in rows
    if has_sequential:
        head += ["composite ÷ sequential", "cmlora ÷ composite"]
    if has_shallow:
        head += ["cmlora cached ÷ (full + shallow branches)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for n in ns:
        cells = [str(n)] + [f"{rows[(config, n)]['vs_floor']:.2f}" for _, config in columns]
        if has_sequential:
            composite = rows[("composite", n)]["median_ms"]
            cells += [f"{composite / rows[('diffusers composite (sequential)', n)]['median_ms']:.2f}",
                      f"{rows[('cmlora (25-step average)', n)]['median_ms'] / composite:.2f}"]  # fmt: skip
        if has_shallow:
            bound = rows[("no LoRA (floor)", 0)]["median_ms"] + (n - 1) * rows[(SHALLOW, 0)]["median_ms"]
            cells.append(f"{rows[('cmlora cached step', n)]['median_ms'] / bound:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if ("compiled no LoRA (floor)", 0) in rows:
        ratio = rows[("no LoRA (floor)", 0)]["median_ms"] / rows[("compiled no LoRA (floor)", 0)]["median_ms"]
        out += f"\nCompiled LoRA-free step: {ratio:.2f}x faster than the eager one.\n"
    memory = [("merge", "merge (folding step)"), ("switch", "switch (folding step)"), ("klora", "klora (folding step)"),
              ("composite", "composite"), ("cmlora refresh", "cmlora refresh step"),
              ("routed", "routed step")]  # fmt: skip
    if rows[("no LoRA (floor)", 0)].get("peak_mib") is not None:
        out += "\nPeak tensor memory of one step beyond the model, MiB (LoRA-free step: "
        out += f"{rows[('no LoRA (floor)', 0)]['peak_mib']:.1f}):\n\n"
        out += "| N | " + " | ".join(label for label, _ in memory) + " |\n" + "|---" * (len(memory) + 1) + "|\n"
        for n in ns:
            out += f"| {n} | " + " | ".join(f"{rows[(c, n)]['peak_mib']:.1f}" for _, c in memory) + " |\n"
    if result.get("world"):
        out += "\nDemo world, whole generations (4 LoRAs, native size, "
        out += f"{result['world'][0]['steps']} steps), images per second:\n\n"
        out += "| method | batch | mode | images/s | s per call | vs eager |\n|---|---|---|---|---|---|\n"
        for r in result["world"]:
            out += (f"| {r['method']} | {r['batch']} | {r['mode']} | {r['images_per_s']:.2f} | {r['seconds']:.2f} "
                    f"| {r['speedup']:.2f} |\n")  # fmt: skip
    return out


def to_markdown(result: dict) -> str:
    """The result as markdown: a one-line header of the setup, the summary tables
    (:func:`summary_markdown`) and the full table of every configuration."""
    rank = result["rank"]
    head = (
        f"UNet `{result['preset']}`, {result['device']}, {result['dtype']}, latents "
        f"{result['latent_size']}x{result['latent_size']}, "
        + (f"ranks {', '.join(map(str, rank))}" if isinstance(rank, list) else f"rank {rank}")
        + (f" ({', '.join(result['loras'])})" if result.get("loras") else "")
        + f", {result['batch']}, median of {result['repeats']}"
        + (f", compiled with {result['compile_backend']}" if result.get("compile_backend") else "")
        + "\n\n"
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
            cells.append("" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return (
        head
        + summary_markdown(result)
        + agreement_markdown(result)
        + "\nEvery configuration:\n\n"
        + "\n".join(lines)
        + "\n"
    )


def agreement_markdown(result: dict) -> str:
    """The agreement of one Merge and one Composite step with diffusers' (empty without it)."""
    if not result.get("agreement"):
        return ""
    against = {"merge": "merge vs diffusers' set_adapters", "composite": "composite vs diffusers' sequential passes"}
    out = "\nOne step against diffusers' PEFT path, largest difference of the predictions:\n\n"
    out += "| check | N | max abs | relative to max abs prediction |\n|---|---|---|---|\n"
    for a in result["agreement"]:
        out += f"| {against[a['method']]} | {a['n']} | {a['max_abs']:.2e} | {a['relative']:.2e} |\n"
    return out


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "speed.json", out / "speed.md"
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(to_markdown(result))
    return json_path, md_path
