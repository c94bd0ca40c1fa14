"""The released reference code's own generation settings, per method, with their sources.

``compose`` keeps one set of defaults for every method (25 steps, CFG 7.5, LoRA scale
0.8, DPM++ 2M) so that methods compare at equal cost and strength; the references each
ran their own. This table is where those live: ``compose generate --help`` prints it,
:func:`settings` gives them as :meth:`compose.Composer.generate` arguments, and a
method built with ``reference=True`` runs at the reference's LoRA scale unless one is
given (:func:`default_lora_scale`). Line numbers are those of the commits named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..calls import SamplingConfig

if TYPE_CHECKING:
    from .base import CompositionMethod

DEFAULT_LORA_SCALE = 0.8
"""The global LoRA scale of every method that is not told otherwise (Multi-LoRA Composition's)."""

MLC = "maszhongming/Multi-LoRA-Composition@cac122a compose_lora.py"
KLORA = "HVision-NKU/K-LoRA@893d0f9 inference_sd.py"
CMLORA = "Yqcca/CMLoRA@5e79e41 compose_offline.py"


@dataclass(frozen=True)
class ReferenceSettings:
    """What one reference script runs: ``steps`` denoising steps at CFG ``guidance_scale``,
    each LoRA at ``lora_scale``, with sampler ``scheduler`` (a :mod:`compose.schedulers`
    name), on ``size`` px images of ``model``; ``sources`` says where each value is set."""

    code: str
    steps: int
    guidance_scale: float
    lora_scale: float
    scheduler: str
    size: int
    model: str
    sources: str


_MLC = ReferenceSettings(
    code=MLC,
    steps=200,
    guidance_scale=10.0,
    lora_scale=0.8,
    scheduler="dpm++2m",
    size=512,
    model="Counterfeit-V2.5 / Realistic Vision 5.1",
    sources="--denoise_steps :131, --cfg_scale :133, --lora_scale :121, DPMSolverMultistep dpmsolver++ :44-46, "
    "--height/--width :127-129",
)
REFERENCE_SETTINGS: dict[str, ReferenceSettings] = {
    "merge": _MLC,
    "switch": _MLC,
    "composite": _MLC,
    "klora": ReferenceSettings(
        code=KLORA,
        steps=50,
        guidance_scale=5.0,
        lora_scale=1.0,
        scheduler="euler",
        size=1024,
        model="SDXL base 1.0",
        sources="pipe(prompt, generator) :74 keeps StableDiffusionXLPipeline's 50 steps, CFG 5 and the model's "
        "own EulerDiscreteScheduler; LoRACompatibleLinear adds the chosen B A at scale 1; SDXL base :13",
    ),
    "cmlora": ReferenceSettings(
        code=CMLORA,
        steps=220,
        guidance_scale=8.5,
        lora_scale=1.0,
        scheduler="dpm++2m",
        size=512,
        model="Counterfeit-V2.5 / Realistic Vision 5.1",
        sources="--denoise_steps :179, --cfg_scale :181, --lora_scale :164, DPMSolverMultistep dpmsolver++ :50-52, "
        "--height/--width :175-177",
    ),
}
"""Methods with released code; patch, bands, wswitch, wcomposite and regional have none."""


def settings(method: str) -> dict:
    """The reference's settings of ``method`` as :meth:`compose.Composer.generate` arguments:
    ``lora_scale`` and ``sampling``."""
    ref = REFERENCE_SETTINGS[method]
    sampling = SamplingConfig(steps=ref.steps, guidance_scale=ref.guidance_scale, width=ref.size, height=ref.size,
                              scheduler=ref.scheduler)  # fmt: skip
    return {"lora_scale": ref.lora_scale, "sampling": sampling}


def default_lora_scale(method: str | CompositionMethod, parameters: Mapping | None = None) -> float:
    """The LoRA scale a generation runs at when none is given: the reference's for a
    method asked to reproduce its reference (``reference=True``), else 0.8."""
    name = method if isinstance(method, str) else method.name
    reference = (parameters or {}).get("reference") if isinstance(method, str) else getattr(method, "reference", False)
    if reference and name in REFERENCE_SETTINGS:
        return REFERENCE_SETTINGS[name].lora_scale
    return DEFAULT_LORA_SCALE


def describe() -> str:
    """The table as text, for ``compose generate --help``: one entry per reference script."""
    lines = ["reference settings (each released script's own; compose's defaults are one set for every method):"]
    scripts: dict[ReferenceSettings, list[str]] = {}
    for method, ref in REFERENCE_SETTINGS.items():
        scripts.setdefault(ref, []).append(method)
    for ref, methods in scripts.items():
        lines.append(
            f"  {', '.join(methods)}: --steps {ref.steps} --guidance {ref.guidance_scale:g} "
            f"--lora-scale {ref.lora_scale:g} --scheduler {ref.scheduler} --width/--height {ref.size} ({ref.model})"
        )
        lines.append(f"      {ref.code}: {ref.sources}")
    lines.append("  klora, cmlora: --reference takes the released code's rules (but a few: docs/methods.md), and its "
                 "LoRA scale unless given")  # fmt: skip
    return "\n".join(lines) + "\n"
