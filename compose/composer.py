"""The Python API: a Stable Diffusion pipeline with composable LoRAs.

    composer = Composer.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    composer.load_lora("knight.safetensors", category="character")
    composer.load_lora("watercolor.safetensors", category="style")
    images = composer.generate("a knight, watercolor", loras=["knight", "watercolor"],
                               method="composite", seed=[1, 2, 3], sampling=SamplingConfig(steps=30))

The composer keeps the pipeline's components (UNet, VAE, text encoders, tokenizers,
scheduler config) and one :class:`~compose.layers.LayerRegistry` per model it
composes LoRAs into. Loading, unloading and re-weighting LoRAs never reloads or
copies the base model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import calls, checks, emphasis, frequency, metadata
from .bundles import BUNDLES, brought_loras, bundle_folder
from .calls import LoRASpec, RunOptions, SamplingConfig
from .encoding import PromptEncoder
from .frequency import FrequencyProfile
from .layers import Factors, LayerRegistry, fit_factors, get_submodule
from .loading import COMPONENTS, LoRA, LoRAError, load_lora, model_family
from .logs import quiet_dependencies
from .loop import denoise
from .memory import memory_rows
from .methods import CompositionMethod, MethodContext, get_method
from .methods.references import default_lora_scale
from .pipelines import ModelLoadError, check_parts, decode_latents, read_pipeline
from .prompts import LoRAUse, extract_lora_tags, without_phrases
from .schedulers import a1111_sampler_name, make_scheduler, step_kwargs
from .weights import WeightPlan, weight_plan

__all__ = ["Composer", "ModelLoadError", "RunOptions", "SamplingConfig"]


@dataclass(frozen=True)
class Request:
    """One :meth:`Composer.generate` call as the denoising loop and the PNG record read it:
    ``prompts`` (one per image, their ``<lora:...>`` tags removed) and their ``seeds``, the
    ``negative_prompt``, and the ``sampling`` settings with the size filled in."""

    prompts: list[str]
    seeds: list[int]
    negative_prompt: str
    sampling: SamplingConfig

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return self.sampling.height, self.sampling.width


def _mask_images(masks: torch.Tensor | None, names: list[str], count: int,
                 size: tuple[int, int]) -> list[dict[str, Image.Image]]:  # fmt: skip
    """Per image, LoRA name -> its ``masks`` ``(B, N, h, w)`` row as an 8-bit greyscale
    image of ``size`` (height, width), upscaled without smoothing, as the layers saw it."""
    if masks is None:
        return [{} for _ in range(count)]
    grey = (masks.float().clamp(0, 1) * 255).round().byte().cpu()
    grey = grey.expand(count, *grey.shape[1:])
    return [{name: Image.fromarray(grey[b, j].numpy(), "L").resize(size[::-1], Image.NEAREST)
             for j, name in enumerate(names)} for b in range(count)]  # fmt: skip


class Composer:
    """A diffusers SD1.x/SD2.x/SDXL pipeline plus composable LoRAs and the methods."""

    def __init__(self, pipeline, model_name: str = "custom", compile: bool | str = False, capacity: int = 5) -> None:
        """``compile``: run the UNet under ``torch.compile`` (``True``: inductor, or a backend
        name), its LoRA layers in static mode with room for ``capacity`` LoRAs per
        generation without recompiling (:mod:`compose.compiled`)."""
        check_parts(pipeline, model_name)
        self.pipeline = pipeline
        self.encoder = PromptEncoder(pipeline)
        self.model_name = model_name
        self.family = model_family(pipeline.unet)
        self.is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.registries = {
            c: LayerRegistry(getattr(pipeline, c)) for c in COMPONENTS if getattr(pipeline, c, None) is not None
        }
        self.loras: dict[str, LoRA] = {}
        self.compile, self.capacity, self._compiled = compile, capacity, None
        self.limits = checks.Limits()
        """What one request may ask of this model (:class:`compose.checks.Limits`)."""

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        compile: bool | str = False,
    ) -> Composer:
        """Load a base model: a diffusers folder, a single-file checkpoint
        (``.safetensors``/``.ckpt``, SD1.x/2.x or SDXL) or a Hugging Face Hub id.

        Defaults: CUDA with float16 when available, else CPU with float32.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        with quiet_dependencies():
            pipeline = read_pipeline(model, dtype)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline.to(device), model_name=str(model), compile=compile)

    @classmethod
    def load(cls, model: str, device: str | torch.device | None = None, compile: bool | str = False) -> Composer:
        """The one spelling of a base model that the CLI, the studio and the benchmark
        accept: a bundled model's name such as ``demo-world`` (the trained demo world with
        its eleven LoRAs loaded, see :meth:`bundled`), ``tiny:sd1`` / ``tiny:sdxl``
        (:meth:`tiny`), else anything :meth:`from_pretrained` takes."""
        if model in BUNDLES:
            return cls.bundled(model, device=device, compile=compile)
        if model.startswith("tiny:"):
            return cls.tiny(model.removeprefix("tiny:"), compile=compile)
        return cls.from_pretrained(model, device=device, compile=compile)

    @classmethod
    def bundled(
        cls,
        name: str,
        folder: str | Path | None = None,
        device: str | torch.device | None = None,
        compile: bool | str = False,
    ) -> Composer:
        """The bundled model ``name`` (:mod:`compose.bundles`, ``"demo-world"``) with every
        LoRA it brings loaded under its name, in the bundle's order; from ``folder`` where
        given (a demo world trained elsewhere, say), else from its own folder, which PNGs
        record as ``name`` so that the name loads it again."""
        where = bundle_folder(name) if folder is None else Path(folder)
        try:
            loras = brought_loras(name, where)
        except (FileNotFoundError, ValueError) as error:
            raise ModelLoadError(str(error)) from None
        composer = cls.from_pretrained(where, device=device, compile=compile)
        if folder is None:
            composer.model_name = name
        for lora, path in loras.items():
            composer.load_lora(path, name=lora)
        return composer

    @classmethod
    def tiny(
        cls, family: str = "sd1", seed: int = 0, compile: bool | str = False, dtype: torch.dtype | None = None
    ) -> Composer:
        """A composer over a tiny random pipeline (see :mod:`compose.tiny`), built in float32
        and cast to ``dtype`` if given (the same weights, rounded)."""
        from .tiny import tiny_pipeline

        name = f"tiny:{family}" if seed == 0 else f"tiny:{family} (seed {seed})"
        pipeline = tiny_pipeline(family, seed)
        if dtype is not None:
            with quiet_dependencies():
                pipeline.to(dtype)
        return cls(pipeline, model_name=name, compile=compile)

    def _denoiser(self, n: int):
        """What the loop calls as the UNet: the UNet itself, or with ``compile`` its
        :class:`~compose.compiled.CompiledUNet` (built on first use, the UNet's layers
        switched to static mode sized for the loaded LoRAs)."""
        if not self.compile:
            return self.pipeline.unet
        if self._compiled is None:
            from .compiled import CompiledUNet

            registry = self.registries["unet"]
            ranks = [f.rank for lora in self.loras.values() for f in lora.factors.get("unet", {}).values()]
            registry.make_static(max(self.capacity, n), max(ranks, default=4))
            backend = "inductor" if self.compile is True else self.compile
            self._compiled = CompiledUNet(self.pipeline.unet, registry.state, backend=backend)
        return self._compiled

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    # -- LoRAs -----------------------------------------------------------------------

    def load_lora(
        self,
        path: str | Path,
        name: str | None = None,
        category: str | None = None,
        triggers: list[str] | None = None,
        allow_pickle: bool = False,
    ) -> LoRA:
        """Load a LoRA file and make it available to :meth:`generate` under ``name``
        (default: the file name without extension)."""
        lora = load_lora(
            path,
            name=name,
            category=category,
            triggers=triggers,
            allow_pickle=allow_pickle,
            unet_config=dict(self.pipeline.unet.config),
            limits=self.limits,
        )
        return self.add_lora(lora)

    def add_lora(self, lora: LoRA) -> LoRA:
        """Check that ``lora`` fits this base model and register it.

        Modules the model lacks are reported in ``lora.unused_keys``; factors whose
        shapes do not fit refuse the whole LoRA, naming the family it was made for.
        The very file loaded again under its name (same sha256, as when a demo-world LoRA
        is also passed by path) gives the loaded LoRA back; another file under a taken
        name is refused.
        """
        if checks.safe_name(lora.name) != lora.name:  # load_lora makes names safe; a record built by hand may not be
            raise LoRAError(lora.path, f"the name {checks.printable(repr(lora.name))} holds control, line or "
                            f"bidi characters; name it {checks.safe_name(lora.name)!r} as load_lora does")  # fmt: skip
        loaded = self.loras.get(lora.name)
        if loaded is not None and lora.sha256 and loaded.sha256 == lora.sha256:
            return loaded
        if loaded is not None:
            raise LoRAError(lora.path, f"a different LoRA named {lora.name!r} is already loaded ({loaded.path}, "
                            f"sha256 {loaded.sha256[:12]}..., this file's is {lora.sha256[:12]}...): load this "
                            "one under another name (name=..., or rename the file), or unload the other")  # fmt: skip
        known = ("SD1.x", "SD2.x", "SDXL")
        if lora.family in known and self.family in known and lora.family != self.family:
            raise LoRAError(lora.path, f"was made for {lora.family}, but the base model is {self.family}")
        fitted: dict[str, dict[str, Factors]] = {}
        unused = list(lora.unused_keys)
        for component, table in lora.factors.items():
            registry = self.registries.get(component)
            for module, f in table.items():
                base = get_submodule(registry.model, module) if registry is not None else None
                if base is None and component.startswith("text_encoder"):
                    base = (
                        get_submodule(registry.model, module.removeprefix("text_model."))
                        if registry is not None
                        else None
                    )
                    module = module.removeprefix("text_model.")
                if base is None:
                    unused.append(f"{component}.{module}")
                    continue
                shaped = fit_factors(base, lora.effective(component, module, base, f))  # DoRA: the delta on this base
                if shaped is None:
                    raise LoRAError(lora.path, lora.misfit(component, module, base, self.family))
                fitted.setdefault(component, {})[module] = shaped
        if not fitted:
            raise LoRAError(
                lora.path,
                f"none of its {sum(len(t) for t in lora.factors.values())} modules exist in the "
                f"base model (the LoRA was made for {lora.family}; the base model is {self.family})",
            )
        lora.factors, lora.unused_keys, lora.magnitudes = fitted, sorted(unused), {}
        for component, table in fitted.items():
            for module in table:
                self.registries[component].wrap(module)
        self.loras[lora.name] = lora
        return lora

    def unload_lora(self, name: str) -> None:
        """Forget a LoRA; layers no other LoRA targets go back to the plain base layer."""
        self._lookup([name])
        del self.loras[name]
        for component, registry in self.registries.items():
            registry.unwrap_unused({m for lora in self.loras.values() for m in lora.factors.get(component, {})})

    def frequency_profile(
        self, name: str, seeds: Sequence[int] = (0, 1), steps: int = 20, progress: bool = False
    ) -> FrequencyProfile:
        """The spectral profile of LoRA ``name`` alone on this base model (see
        :mod:`compose.frequency`): its trigger words (or name) as the prompt, weight 1,
        Merge, at the model's native size. Cached in memory and on disk by base model,
        settings and the LoRA's sha256, so it is computed once."""
        lora = self._lookup([name])[0]
        prompt = ", ".join(lora.triggers) or lora.name
        key = f"{self.model_name}|{self.family}|{prompt}|{list(seeds)}|{steps}"
        cached = lora.derived.get(("frequency", key)) or frequency.load_cached(key, lora.sha256)
        if cached is None:
            if progress:
                print(f"profiling LoRA {lora.name!r} for CMLoRA's frequency ordering ({len(seeds)} images, {steps} "
                      f"steps; once: the profile is cached in {frequency.cache_dir()})", file=sys.stderr)  # fmt: skip
            images = self.generate(prompt, [lora.name], "merge", seed=list(seeds), lora_scale=1.0,
                                   sampling=SamplingConfig(steps=steps), run=RunOptions(progress=progress))  # fmt: skip
            cached = frequency.profile_images(images, prompt, list(seeds))
            frequency.store(key, lora.sha256, cached)
        lora.derived[("frequency", key)] = cached
        return cached

    @torch.no_grad()
    def trigger_importance(self, prompt: str, names: Sequence[str], size: tuple[int, int] = (512, 512)) -> torch.Tensor:
        """How much each LoRA's trigger words shape ``prompt``'s encoding, ``(N,)`` float32:
        the mean over token positions of the distance between the base text encoder's
        output for the prompt and for the prompt without that LoRA's triggers
        (:func:`~compose.prompts.without_phrases`). 0 for a LoRA whose triggers are absent."""
        loras = self._lookup(names)
        variants = [prompt] + [without_phrases(prompt, lora.triggers) for lora in loras]
        states = self.encoder.encode(variants, [""] * len(variants), False, size).encoder_hidden_states.float()
        return (states[1:] - states[0]).norm(dim=-1).mean(dim=-1).cpu()

    def trigger_tokens(self, prompt: str, names: Sequence[str], clauses: bool = False) -> torch.Tensor:
        """``(N, T)`` bool: which positions of ``prompt``'s encoding (``T`` = 77 per chunk)
        hold each LoRA's trigger words, or with ``clauses`` the whole clauses that hold them
        (:func:`~compose.emphasis.clause_positions`); a row of ``False`` for a LoRA whose
        triggers are absent."""
        loras = self._lookup(names)
        tokenizer = self.pipeline.tokenizer
        length = len(emphasis.chunks(tokenizer, prompt)) * (emphasis.CHUNK_TOKENS + 2)
        table = torch.zeros(len(loras), length, dtype=torch.bool)
        find = emphasis.clause_positions if clauses else emphasis.phrase_positions
        for j, lora in enumerate(loras):
            for trigger in lora.triggers:
                table[j, find(tokenizer, prompt, trigger)] = True
        return table

    def clause_texts(self, prompt: str, names: Sequence[str], rows: torch.Tensor | None = None) -> dict[str, str]:
        """LoRA name -> the clauses of ``prompt`` that hold its trigger words, as the encoder
        reads them ("a klinko robot on the right"); LoRAs whose triggers are absent are left
        out. ``rows``: ``trigger_tokens(prompt, names, clauses=True)`` where already at hand."""
        rows = self.trigger_tokens(prompt, names, clauses=True) if rows is None else rows
        tokenizer = self.pipeline.tokenizer
        return {name: emphasis.words_at(tokenizer, prompt, row.nonzero().flatten().tolist())
                for name, row in zip(names, rows, strict=True) if row.any()}  # fmt: skip

    @property
    def shape(self) -> checks.ModelShape:
        """What :attr:`limits` are relative to: native side, VAE factor, training timesteps."""
        factor = self.pipeline.vae_scale_factor
        train_steps = int(self.scheduler_config.get("num_train_timesteps") or 1000)
        return checks.ModelShape(self.pipeline.unet.config.sample_size * factor, factor, train_steps)

    @staticmethod
    def _method(method: str | CompositionMethod, parameters: dict | None, latent: tuple[int, int]) -> CompositionMethod:
        """The method object, its parameter names checked before it is built and its values after."""
        from .methods import METHODS

        if isinstance(method, str) and method in METHODS:
            checks.method_parameters(method, METHODS[method], parameters or {})
        built = get_method(method, **(parameters or {}))
        checks.method_values(built.name, built.parameters(), latent)
        return built

    def _lookup(self, names: Iterable[str]) -> list[LoRA]:
        missing = [n for n in names if n not in self.loras]
        if missing:
            loaded = ", ".join(self.loras) or "none"
            raise KeyError(f"LoRA {missing[0]!r} is not loaded (loaded: {loaded})")
        return [self.loras[n] for n in names]

    # -- generation ------------------------------------------------------------------

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return self.pipeline.image_processor.postprocess(decode_latents(self.pipeline.vae, latents), output_type="pil")

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        loras: Sequence[LoRASpec] | dict[str, float] | None = None,
        method: str | CompositionMethod = "merge",
        *,
        negative_prompt: str = "",
        seed: int | Sequence[int] = 0,
        lora_scale: float | None = None,
        method_params: dict | None = None,
        sampling: SamplingConfig | None = None,
        run: RunOptions | None = None,
    ) -> list[Image.Image] | torch.Tensor | tuple[list[Image.Image], list[dict[str, Image.Image]]]:
        """Generate one image per (prompt, seed) with the given LoRAs composed by ``method``.

        ``loras``: names, ``(name, weight)`` pairs or ``{name: weight}``, in the order
        methods use (Switch rotates in this order), followed by any ``<lora:name:weight>``
        tags of the prompt (removed from the encoded text). Each LoRA's effective weight
        is ``weight * lora_scale``; ``lora_scale`` ``None`` is 0.8 (Multi-LoRA Composition's),
        or the reference's own (1 for K-LoRA and CMLoRA) for a method built with
        ``reference=True`` (:mod:`compose.methods.references`). A weight may be a schedule over
        the steps such as ``"0@0,1@0.5"`` (:mod:`compose.prompts`; the text encoder
        uses its first value). A list of prompts and/or seeds
        makes a batch (an int seed gives ``seed, seed+1, ...``); each image equals the
        one generated alone with its prompt and seed.

        ``sampling`` (:class:`SamplingConfig`; ``None``: 25 steps, CFG 7.5, native size,
        DPM++ 2M) says how the images are sampled, ``run`` (:class:`RunOptions`) how the call
        reports and what it returns. Returns PIL images whose ``info`` carries the A1111
        ``parameters`` text and the full ``compose`` record; latents or ``(images, masks)``
        as ``run`` asks.
        """
        sampling, run = calls.options(sampling, run)
        if lora_scale is None:
            lora_scale = default_lora_scale(method, method_params)
        prompts, seeds = calls.batch(prompt, seed, negative_prompt)
        self._check_lengths(prompts, negative_prompt)
        width, height = checks.request(self.limits, self.shape, width=sampling.width, height=sampling.height,
                                       steps=sampling.steps, images=len(prompts),
                                       guidance_scale=sampling.guidance_scale, lora_scale=lora_scale,
                                       max_batch=run.max_batch)  # fmt: skip
        raw_prompts = prompts
        prompts, uses, active = self._resolve_loras(prompts, loras)
        self.check_prompts(prompts, negative_prompt)
        plan = weight_plan(uses, sampling.steps, lora_scale, list(self.registries["unet"].layers), self.is_sdxl)
        factor = self.pipeline.vae_scale_factor
        method = self._method(method, method_params, (height // factor, width // factor))
        if not active and method.name != "merge":
            raise ValueError(f"method {method.name!r} needs at least one LoRA")
        request = Request(prompts, seeds, negative_prompt, replace(sampling, width=width, height=height))
        context = self._method_context(method, active, plan, request, run.progress)
        latents = self._sample(method, context, plan, request, run)
        if run.output_type == "latent":
            return latents
        images = self._decode(latents)
        shared = self._shared_record(method, active, uses, lora_scale, request)
        records = [{"prompt": p, "seed": s, **shared} for p, s in zip(raw_prompts, seeds, strict=True)]
        images = [metadata.attach(image, record) for image, record in zip(images, records, strict=True)]
        if run.return_masks:
            return images, _mask_images(
                method.lora_masks(), [lora.name for lora in active], len(images), (height, width)
            )
        return images

    def _resolve_loras(
        self, prompts: list[str], loras: Sequence[LoRASpec] | dict[str, float] | None
    ) -> tuple[list[str], list[LoRAUse], list[LoRA]]:
        """The prompts without their ``<lora:...>`` tags, the LoRA uses (``loras`` then the
        tags) and the loaded LoRAs they name, in that order."""
        uses = calls.lora_uses(loras, self.is_sdxl)
        parsed = [extract_lora_tags(p) for p in prompts]
        if any(tags != parsed[0][1] for _, tags in parsed):
            raise ValueError("every prompt of a batch must carry the same <lora:...> tags")
        uses = uses + calls.lora_uses([tuple(use) for use in parsed[0][1]], self.is_sdxl)
        active = self._lookup([use.name for use in uses])
        calls.each_once(uses, len(uses) - len(parsed[0][1]))
        return [text for text, _ in parsed], uses, active

    def _check_lengths(self, prompts: list[str], negative_prompt: str) -> None:
        """The characters of each text against :attr:`limits`, before anything reads them."""
        for what, text in calls.texts(prompts, negative_prompt):
            checks.prompt_length(self.limits, what, text)

    def check_prompts(self, prompts: Sequence[str], negative_prompt: str = "") -> None:
        """Refuse a prompt or negative prompt beyond :attr:`limits`'s chunks of 75 tokens
        before any model work: a megabyte of text would otherwise hold the model for
        minutes per step. Characters are counted first (no tokenizer), then chunks as the
        encoder will cut them (``<lora:...>`` tags already out of ``prompts``)."""
        self._check_lengths(list(prompts), negative_prompt)
        for what, text in calls.texts(prompts, negative_prompt):
            checks.prompt_chunks(self.limits, what, len(emphasis.chunks(self.pipeline.tokenizer, text)))

    def _method_context(self, method: CompositionMethod, active: list[LoRA], plan: WeightPlan, request: Request,
                        progress: bool) -> MethodContext:  # fmt: skip
        """What ``method`` is prepared with: the LoRAs, their base weights, the UNet's
        layers, and the frequency profiles or prompt importances it asks for."""
        prompts, size = request.prompts, request.size
        frequency = {}
        if method.needs_frequency:
            frequency = {lora.name: self.frequency_profile(lora.name, progress=progress).score for lora in active}
        if (method.needs_importance or method.needs_tokens) and len(set(prompts)) > 1:
            raise ValueError(f"method {method.name!r} reads the LoRAs' trigger words in the prompt: "
                             "give one prompt per call")  # fmt: skip
        importance = tokens = clauses = clause_texts = None
        names = [lora.name for lora in active]
        if method.needs_importance:
            importance = self.trigger_importance(prompts[0], names, size)
        if method.needs_tokens:
            tokens = self.trigger_tokens(prompts[0], names)
            clauses = self.trigger_tokens(prompts[0], names, clauses=True)
            clause_texts = self.clause_texts(prompts[0], names, clauses)
        unet_layers = list(self.registries["unet"].layers)
        factor = self.pipeline.vae_scale_factor
        steps = request.sampling.steps
        return MethodContext(active, plan.base.to(self.device), steps, unet_layers, self.pipeline.unet, frequency,
                             importance, tokens, clauses, clause_texts, state=self.registries["unet"].state,
                             images=len(prompts), latent_size=(size[0] // factor, size[1] // factor))  # fmt: skip

    def _sample(self, method: CompositionMethod, context: MethodContext, plan: WeightPlan, request: Request,
                run: RunOptions) -> torch.Tensor:  # fmt: skip
        """Encode the prompts (text-encoder LoRAs at their first weights, where the method
        uses them), draw each image's noise from its seed on the CPU, and denoise:
        the final latents ``(B, C, h, w)``."""
        prompts, seeds, size, steps = request.prompts, request.seeds, request.size, request.sampling.steps
        guidance_scale = request.sampling.guidance_scale
        active = context.loras
        denoiser = self._denoiser(len(active))
        for component, registry in self.registries.items():
            registry.activate([lora.factors.get(component, {}) for lora in active])
        unet_registry = self.registries["unet"]
        sched = make_scheduler(request.sampling.scheduler, self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)
        cfg = guidance_scale > 1.0
        text_loras = active and method.text_encoder_loras
        for component, registry in self.registries.items():
            if component != "unet":
                registry.state.weights = plan.text[None, :].to(self.device) if text_loras else None
        texts = method.region_texts(context)
        try:
            conditioning = self.encoder.encode(prompts, [request.negative_prompt] * len(prompts), cfg, size)
            context.region_states = {name: self.encoder.encode([text], [""], False, size).encoder_hidden_states
                                     for name, text in texts.items()}  # fmt: skip
        finally:
            for registry in self.registries.values():
                registry.release()
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        factor = self.pipeline.vae_scale_factor
        shape = (len(prompts), self.pipeline.unet.config.in_channels, size[0] // factor, size[1] // factor)
        dtype = conditioning.encoder_hidden_states.dtype
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=dtype) * sched.init_noise_sigma
        max_batch = run.max_batch
        if max_batch is None:
            tokens = conditioning.encoder_hidden_states.shape[1]
            max_batch = memory_rows(self.pipeline.unet, shape[-2:], dtype, tokens, self.device)
        method.prepare(context)
        try:
            return denoise(
                denoiser,
                sched,
                unet_registry.state,
                latents,
                conditioning,
                method,
                guidance_scale,
                extra_step_kwargs=step_kwargs(sched, generators),
                callback=run.callback,
                max_rows=max_batch,
                progress=run.progress,
                step_scales=None if plan.steps is None else plan.steps.to(self.device),
            )
        finally:
            unet_registry.release()  # drops the folded weights; the base weights were never written

    def _shared_record(self, method: CompositionMethod, active: list[LoRA], uses: list[LoRAUse], lora_scale: float,
                       request: Request) -> dict:  # fmt: skip
        """The part of the PNG record that every image of a call shares."""
        sampling = request.sampling
        return {
            "negative_prompt": request.negative_prompt,
            "steps": sampling.steps,
            "scheduler": sampling.scheduler,
            "sampler": a1111_sampler_name(sampling.scheduler),
            "schedule_type": metadata.schedule_type(sampling.scheduler, self.scheduler_config),
            "guidance_scale": sampling.guidance_scale,
            "width": sampling.width,
            "height": sampling.height,
            "model": self.model_name,
            "model_hash": metadata.model_hash(self.model_name),
            "model_family": self.family,
            "dtype": str(self.dtype).removeprefix("torch."),
            "loras": [metadata.lora_entry(lora, use) for lora, use in zip(active, uses, strict=True)],
            "lora_scale": lora_scale,
            **self.encoder.syntax(request.prompts, request.negative_prompt, sampling.guidance_scale > 1.0),
            "method": {"name": method.name, "parameters": method.parameters()},
            "versions": metadata.versions(),
        }
