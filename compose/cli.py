"""The ``compose`` command: generate, inspect and benchmark.

Errors a user can act on (a bad LoRA file, a model that cannot be loaded, a wrong
setting) are printed as one line, ``compose: error: ...``, with exit status 2; no
traceback reaches the user.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from . import checks
from .bundles import BUNDLES, DEMO_WORLD, brought_loras, bundle_clip, bundle_folder
from .calls import RunOptions, SamplingConfig
from .checks import CATEGORIES, printable
from .prompts import MAX_WEIGHT, extract_lora_tags

DEFAULT_MODEL = DEMO_WORLD
EPILOG_GENERATE = """\
examples:
  compose generate --prompt "a zorbo creature on the left, vosh sky background" \\
      --lora zorbo --lora vosh --method composite           # the embedded demo world
  compose generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --lora knight.safetensors --lora watercolor.safetensors:0.7 \\
      --method composite --prompt "a knight, watercolor" --seed 1 2 3 --out knight.png
  compose generate --from-png knight-1.png --lora knight.safetensors --lora watercolor.safetensors
"""


def _lora_arg(text: str) -> tuple[str, float | str]:
    """``PATH``, ``PATH:WEIGHT`` or ``PATH:SCHEDULE`` (``0@0,1@0.5``)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            if "@" in weight:
                return path, weight
        else:
            if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
                raise argparse.ArgumentTypeError(
                    f"{text}: the weight {weight} must be a finite number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}"
                )
            return path, value
    return text, 1.0


def _checked(check, kind: str, convert=float):
    """An argparse type: ``convert`` the text, then ``check`` the value. A refusal says
    ``TEXT is not KIND`` and argparse puts the option in front, so the user reads the
    option, the value they gave and what a value must be."""

    def parse(text: str):
        try:
            return check(convert(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text} is not {kind}") from None

    return parse


FINITE = _checked(lambda v: checks.number("value", v), "a finite number")
NON_NEGATIVE = _checked(lambda v: checks.number("value", v, 0.0), "a finite number of at least 0")
FRACTION = _checked(lambda v: checks.number("value", v, 0.0, 1.0), "a number between 0 and 1")
GUIDANCE = _checked(lambda v: checks.number("value", v, 0.0, checks.MAX_GUIDANCE),
                    f"a finite number between 0 and {checks.MAX_GUIDANCE:g}")  # fmt: skip
SCALE = _checked(lambda v: checks.number("value", v, -MAX_WEIGHT, MAX_WEIGHT),
                 f"a finite number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")  # fmt: skip
COUNT = _checked(lambda v: checks.integer("value", v, 1), "an integer of at least 1", int)
NON_NEGATIVE_INT = _checked(lambda v: checks.integer("value", v, 0), "an integer of at least 0", int)
SEED = _checked(lambda v: checks.seed(v, "value"), "a seed (an integer in [0, 2**64))", int)
RANKS = _checked(lambda ranks: [checks.integer("rank", r, 1) for r in ranks], "ranks: integers of at least 1, "
                 "comma-separated", lambda text: [int(r) for r in text.split(",")])  # fmt: skip
MEGABYTES = _checked(lambda v: checks.number("value", v, 1.0), "a size in MB of at least 1")


def _temperature(text: str) -> float:
    """A softmax temperature: above 0; ``inf`` gives equal weights."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a temperature (a number above 0; inf gives equal weights)")
    return value


def _add_limits(parser: argparse.ArgumentParser) -> None:
    """The options that raise :class:`compose.checks.Limits` for real large models."""
    defaults = checks.Limits()
    group = parser.add_argument_group("limits (what one request may ask of the model)")
    group.add_argument("--max-side", type=COUNT, metavar="PX", help="largest width or height in pixels "
                       f"[{defaults.side_factor:g} x the model's native side]")  # fmt: skip
    group.add_argument("--max-steps", type=COUNT, metavar="N", help="most denoising steps "
                       "[the scheduler's training timesteps, 1000 for SD]")  # fmt: skip
    group.add_argument("--max-lora-mb", type=MEGABYTES, default=defaults.max_lora_mb, metavar="MB",
                       help=f"largest LoRA file [{defaults.max_lora_mb:g}]")  # fmt: skip
    group.add_argument("--max-lora-tensors", type=COUNT, default=defaults.max_lora_tensors, metavar="N",
                       help=f"most tensors in a LoRA file [{defaults.max_lora_tensors}]")  # fmt: skip
    group.add_argument("--max-prompt-chunks", type=COUNT, default=defaults.max_prompt_chunks, metavar="N",
                       help=f"most 75-token chunks in a prompt [{defaults.max_prompt_chunks}]")  # fmt: skip


def _limits(args: argparse.Namespace) -> checks.Limits:
    return checks.Limits(
        max_side=getattr(args, "max_side", None),
        max_steps=getattr(args, "max_steps", None),
        max_lora_mb=getattr(args, "max_lora_mb", checks.Limits.max_lora_mb),
        max_lora_tensors=getattr(args, "max_lora_tensors", checks.Limits.max_lora_tensors),
        max_prompt_chunks=getattr(args, "max_prompt_chunks", checks.Limits.max_prompt_chunks),
    )


def _pair(text: str) -> tuple[str, str]:
    """``NAME=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _method_params(args: argparse.Namespace) -> dict:
    """The chosen method's parameters from its options."""
    if args.method == "switch":
        return {"tau": args.tau, "reference_offset": args.reference_offset}
    if args.method == "klora":
        return {
            "alpha": args.klora_alpha,
            "beta": args.klora_beta,
            "top_k": args.top_k,
            "scale": args.klora_scale,
            "progress": args.klora_progress,
            "roles": dict(args.role) or None,
            "reference": args.reference,
        }
    if args.method == "regional":
        regions = {name: _region(name, value) for name, value in args.region}
        return {"regions": regions or None, "prompts": _region_prompts(args)}
    if args.method == "patch":
        return {"temperature": args.temperature, "top_k": args.patch_top_k}
    if args.method == "wswitch":
        return {"tau": args.tau, "reference_offset": args.reference_offset, "sharpness": args.sharpness,
                "hold": args.hold}  # fmt: skip
    if args.method == "wcomposite":
        return {"sharpness": args.sharpness}
    if args.method == "bands":
        return {"levels": args.levels, "temperature": args.band_temperature, "top_k": args.band_top_k}
    if args.method == "routed":
        return {"probe": args.probe, "threshold": args.threshold, "grow": args.grow, "roles": dict(args.role) or None,
                "prompts": _region_prompts(args, "clauses"), "probe_with": args.probe_with,
                "locate": args.locate}  # fmt: skip
    if args.method == "cmlora":
        return {
            "ordering": args.ordering,
            "schedule": args.cache_schedule,
            "switch_at": args.switch_at,
            "cache": not args.no_feature_cache,
            "recompute": args.recompute,
            "reference": args.reference,
        }
    return {}


def _region(name: str, value: str) -> list[float] | str:
    """``--region NAME=VALUE``: four numbers are a box, anything else the path of a mask
    image, read now (before the model loads) as a regular image file or refused, naming it."""
    from .methods.regional import region_mask

    try:
        region: list[float] | str = [float(v) for v in value.split(",")]
    except ValueError:
        region = value
    try:
        region_mask(region, 8, 8)
    except ValueError as error:
        raise ValueError(f"--region {name}={value}: {error}") from None
    return region


class _Parser(argparse.ArgumentParser):
    """argparse with the mistake first: one line, the closest choice offered for a
    misspelt one (``did you mean composite?``), and where the options are listed; its
    full usage (30 lines for ``generate``) buried the line that mattered."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")

    def _check_value(self, action: argparse.Action, value: object) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as error:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{error.message}; did you mean {close[0]}?") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="compose",
        description="Compose several LoRA adapters into one Stable Diffusion image.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands)
    _add_inspect(commands)
    _add_bench(commands)
    _add_studio(commands)
    _add_grid(commands)
    _add_demo_world(commands)
    return parser


def _add_generate(commands: argparse._SubParsersAction) -> None:
    """The ``generate`` command, its arguments in the groups ``--help`` shows."""
    from .methods.references import describe

    gen = commands.add_parser(
        "generate",
        help="generate images with LoRAs composed by a method",
        description="Generate images with several LoRAs composed by one method. Every PNG carries "
        "AUTOMATIC1111-style 'parameters' and a full JSON record that reproduces it.",
        epilog=EPILOG_GENERATE + "\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inputs(gen.add_argument_group("model, LoRAs and prompt"))
    _add_sampling(gen.add_argument_group("sampling"))
    _add_method_options(gen.add_argument_group("method options (each says which methods read it)"))
    _add_output(gen.add_argument_group("output, reproduction and running"))
    _add_limits(gen)


def _add_inputs(group: argparse._ArgumentGroup) -> None:
    from .methods import METHODS

    group.add_argument(
        "--model",
        help="demo-world (the embedded demo world, its eleven LoRAs loaded: <lora:zorbo> etc. work), a "
        "diffusers folder, single-file .safetensors checkpoint, hub id, or tiny:sd1 / tiny:sdxl (random weights) "
        f"[default: {DEFAULT_MODEL}; with --from-png the recorded model if it is {DEFAULT_MODEL} or tiny:*]",
    )
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        type=_lora_arg,
        metavar="PATH[:WEIGHT]",
        help="a LoRA file, or the name of one the model brings (the demo world's zorbo, flimbo, ...), and its "
        "weight (default 1); repeat for several, in method order. The prompt may "
        "also select LoRAs with <lora:NAME:WEIGHT> tags (WEIGHT may be a schedule like 0@0,1@0.5)",
    )
    group.add_argument("--lora-dir", help="folder where <lora:NAME> tags of the prompt find NAME.safetensors")
    group.add_argument("--method", choices=sorted(METHODS), default="merge", help="composition method [merge]")
    group.add_argument("--prompt", help="the prompt (required unless --from-png)")
    group.add_argument(
        "--category",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=CATEGORY",
        help=f"category of LoRA NAME (the file name without extension): {', '.join(CATEGORIES)}",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle LoRA files (.bin/.pt/.ckpt), loaded with torch.load(weights_only=True)",
    )


def _add_sampling(group: argparse._ArgumentGroup) -> None:
    from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    group.add_argument("--negative-prompt", default="", help="negative prompt")
    group.add_argument("--seed", type=SEED, nargs="+", default=[0], help="one or more seeds, one image each [0]")
    group.add_argument("--steps", type=COUNT, default=25, help="denoising steps [25]")
    group.add_argument("--guidance", type=GUIDANCE, default=7.5, help="classifier-free guidance scale [7.5]")
    group.add_argument("--width", type=COUNT, help="width in pixels [the model's native size]")
    group.add_argument("--height", type=COUNT, help="height in pixels [the model's native size]")
    group.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=DEFAULT_SCHEDULER,
        help=f"sampler [{DEFAULT_SCHEDULER}]",
    )
    group.add_argument(
        "--lora-scale",
        type=SCALE,
        help="global LoRA scale multiplying every weight [0.8; with --reference the reference's, 1]",
    )


def _add_method_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tau", type=COUNT, default=5, help="switch, wswitch: steps per LoRA [5]")
    group.add_argument(
        "--reference-offset",
        action="store_true",
        help="switch: reproduce the reference code's schedule (first LoRA tau+1 steps)",
    )
    group.add_argument(
        "--role",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=ROLE",
        help="klora: content or style for LoRA NAME (default: category style is style, others content); "
        "routed: region, complement or global (default by category: characters, clothing and objects are regions, "
        "backgrounds the complement, styles global)",
    )
    group.add_argument(
        "--klora-alpha", type=FINITE, default=1.5, help="klora: alpha of the content-to-style bias [1.5]"
    )
    group.add_argument("--klora-beta", type=FINITE,
                     help="klora: beta of the content-to-style bias [0.5 for s, 0.85 alpha for s*]")  # fmt: skip
    group.add_argument("--top-k", type=COUNT, help="klora: K of the top-K weight mass [the product of the ranks]")
    group.add_argument("--klora-scale", choices=["s", "s*"],
                     help="klora: style factor alpha p + beta (s) or that modulo alpha (s*) [s]")  # fmt: skip
    group.add_argument("--klora-progress", choices=["step", "calls"],
                     help="klora: p from the step index, or the reference's counter of layer calls [step]")  # fmt: skip
    group.add_argument(
        "--ordering",
        choices=["frequency", "category"],
        help="cmlora: order LoRAs by the spectra of their single-LoRA images (computed once, cached) "
        "or by category [frequency]",
    )
    group.add_argument(
        "--cache-schedule",
        choices=["nonuniform", "uniform", "off"],
        default="nonuniform",
        help="cmlora: refresh steps, where the dominant LoRA advances and branches recompute [nonuniform]",
    )
    group.add_argument("--switch-at", type=FRACTION, default=0.55, help="cmlora: fraction of steps led by H [0.55]")
    group.add_argument("--recompute", choices=["all", "dominant"],
                     help="cmlora: at refresh steps every branch and the dominant each step, or only the new "
                     "dominant (the reference's) [all]")  # fmt: skip
    group.add_argument("--reference", action="store_true",
                     help="klora, cmlora: the released code's rules (docs/methods.md lists the points that stay "
                     "compose's) and, unless --lora-scale, its LoRA scale (see below)")  # fmt: skip
    group.add_argument(
        "--no-feature-cache", action="store_true", help="cmlora: keep the schedule but never reuse cached features"
    )
    group.add_argument(
        "--region",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=X0,Y0,X1,Y1|MASK.png",
        help="regional: LoRA NAME's box in fractions of the image, or a mask image (white = inside)",
    )
    group.add_argument("--temperature", type=_temperature, default=0.05, help="patch: softmax temperature [0.05]")
    group.add_argument("--patch-top-k", type=COUNT, help="patch: keep the k heaviest LoRAs per patch [all]")
    group.add_argument("--levels", type=COUNT, default=2, help="bands: Haar wavelet levels [2]")
    group.add_argument("--band-temperature", type=_temperature, default=0.5,
                     help="bands: temperature of the band weights from energy (inf = Composite) [0.5]")  # fmt: skip
    group.add_argument("--band-top-k", type=COUNT, help="bands: keep the k heaviest LoRAs per band [all]")
    group.add_argument(
        "--sharpness",
        type=NON_NEGATIVE,
        default=1.0,
        help="wswitch/wcomposite: exponent on the trigger-word importances (0 = equal shares) [1]",
    )
    group.add_argument("--probe", type=FRACTION, default=0.2,
                       help="routed: fraction of the steps that read the regions before routing [0.2]")  # fmt: skip
    group.add_argument("--probe-with", choices=["base", "loras"], default="base",
                       help="routed: the probe steps run on the base model alone or as Merge [base]")  # fmt: skip
    group.add_argument("--threshold", type=FRACTION, default=0.5,
                       help="routed: share of its attention peak from which a pixel is a LoRA's [0.5]")  # fmt: skip
    group.add_argument("--grow", type=NON_NEGATIVE_INT, default=1,
                       help="routed: latent pixels each region grows by [1]")  # fmt: skip
    group.add_argument("--region-prompt", action="append", default=[], type=_pair, metavar="NAME=TEXT",
                       help="regional, routed: the text LoRA NAME's region attends to instead of the prompt "
                       "(its trigger words are put in front if missing)")  # fmt: skip
    group.add_argument("--clause-prompts", action=argparse.BooleanOptionalAction,
                       help="regional, routed: each region reads its LoRA's clause of the prompt "
                       "(\"a klinko robot on the right\") instead of the whole prompt "
                       "[routed: on, regional: off]")  # fmt: skip
    group.add_argument("--locate", choices=["clause", "trigger"], default="clause",
                       help="routed: find each LoRA by the attention to its trigger's whole clause or to its "
                       "trigger words alone [clause]")  # fmt: skip
    group.add_argument("--hold", type=FRACTION, default=0.2,
                     help="wswitch: final fraction of the steps held by the character LoRA [0.2]")  # fmt: skip


def _region_prompts(args: argparse.Namespace, default: str | None = None) -> dict[str, str] | str | None:
    """``--clause-prompts`` or the ``--region-prompt`` pairs (not both); ``default`` (the
    method's) where neither is given; ``--no-clause-prompts``: the whole prompt everywhere."""
    if args.clause_prompts and args.region_prompt:
        raise ValueError("give --clause-prompts or --region-prompt NAME=TEXT, not both")
    if args.region_prompt:
        return dict(args.region_prompt)
    return default if args.clause_prompts is None else "clauses" if args.clause_prompts else None


def _add_output(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-batch", type=COUNT, help="cap on UNet batch rows per call (composite runs its LoRAs in chunks)"
    )
    group.add_argument("--compile", action="store_true", help="run the UNet under torch.compile (inductor): the first "
                     "image pays the compilation, LoRA swaps within 5 LoRAs do not recompile [off]")  # fmt: skip
    group.add_argument(
        "--out",
        default="outputs/compose.png",
        help="output PNG, or a folder (ending in /, or existing) for compose.png; with several seeds, -SEED is "
        "added to the name. Only a new path or a regular file is written [outputs/compose.png]",
    )
    group.add_argument(
        "--from-png",
        metavar="PNG",
        help="take every setting from a PNG made by compose (LoRA files still given with --lora); a model "
        "other than demo-world or tiny:* is loaded only when named with --model or with --trust-png-model",
    )
    group.add_argument(
        "--trust-png-model",
        action="store_true",
        help="--from-png: load the base model the PNG names (a folder, file or hub id) without --model",
    )
    group.add_argument("--device", help="cuda, cpu, ... [cuda if available]")


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    """The ``inspect`` command's arguments."""
    ins = commands.add_parser(
        "inspect",
        help="show what a LoRA file holds",
        description="Show a LoRA file's format, algorithm (LoRA, LoCon, LoHa, LoKr, diff, + DoRA), base family, "
        "rank (LoKr: also its factor), alpha and the alpha/rank scale folded into its weights, targeted modules, "
        "trigger words, hashes (sha256, A1111's, Civitai's AutoV2), "
        "what its sidecars say, its metadata, and any keys that were not used.",
    )
    ins.add_argument("lora", help="LoRA file, or the name of a LoRA --model brings (the demo world's zorbo ...)")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--allow-pickle", action="store_true", help="allow pickle files (weights only)")
    ins.add_argument(
        "--frequency",
        action="store_true",
        help="also show the LoRA's spectral profile on --model (generated once, then cached)",
    )
    ins.add_argument("--model", default=DEFAULT_MODEL, help=f"base model for --frequency [{DEFAULT_MODEL}]")
    ins.add_argument("--device", help="cuda, cpu, ... [cuda if available]")
    _add_limits(ins)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    """The ``bench`` command's arguments."""
    bench = commands.add_parser(
        "bench",
        help="benchmark the methods: quality over composition sets, or speed",
        description="With --sets: generate every (set, method, seed) of a composition-set manifest, score "
        "it, and write images, records, tables, plots and grids to --out; a rerun resumes, and "
        "`accelerate launch --multi_gpu --num_processes K -m compose bench ...` or `torchrun "
        "--nproc_per_node K -m compose bench ...` shards the work over K processes (GPUs, or CPU "
        "processes on a machine without one) and nodes. With --speed: time one denoising step of "
        "every method for N = 1..5 LoRAs against a LoRA-free step and diffusers' own PEFT path.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = bench.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sets", metavar="FILE", help="composition-set manifest (JSON; see evaluation/README.md)")
    mode.add_argument("--speed", action="store_true", help="run the speed benchmark")
    bench.add_argument(
        "--methods",
        default="merge,switch,composite,klora,cmlora",
        help="comma-separated methods, each optionally with options after a +, on/off or KEY=VALUE: "
        "klora+reference runs K-LoRA as its released code does, klora+scale=s* with one of its rules, "
        "each beside klora [merge,switch,composite,klora,cmlora]",
    )
    bench.add_argument("--seeds", type=COUNT, default=3, help="seeds 0..K-1 per set, unless the set lists its own [3]")
    bench.add_argument("--sets-per-n", type=COUNT, metavar="K", help="--sets: only K sets per LoRA count N, evenly "
                       "spread (a quicker run with every N) [all]")  # fmt: skip
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"base model [{DEFAULT_MODEL}]")
    bench.add_argument(
        "--clip",
        help="CLIPScore model: an open_clip folder (open_clip_config.json + open_clip_model.safetensors) or "
        "NAME:PRETRAINED, e.g. ViT-B-16:openai (the papers' setting; weights must be in your cache) "
        "[the demo world's offline CLIP]",
    )
    bench.add_argument("--steps", type=COUNT, default=25, help="--sets: denoising steps [25]")
    bench.add_argument("--guidance", type=GUIDANCE, default=7.5, help="--sets: guidance scale [7.5]")
    bench.add_argument("--size", type=COUNT, help="--sets: image side in pixels [the model's native size]")
    bench.add_argument("--lora-scale", type=SCALE, help="--sets: global LoRA scale [0.8; a +reference variant's "
                       "reference's, 1]")  # fmt: skip
    bench.add_argument(
        "--preset",
        choices=["tiny", "small", "sd15", "sdxl"],
        default="small",
        help="UNet shape with random weights: tiny, small (SD1.5 topology, narrow), sd15, sdxl [small]",
    )
    bench.add_argument("--max-loras", type=COUNT, help="--speed: N = 1..K LoRAs [5; N = 3 and 5 for sd15/sdxl on a "
                       "CPU]")  # fmt: skip
    bench.add_argument("--rank", type=RANKS, help="--speed: LoRA rank, or ranks comma-separated, one per LoRA, cycled "
                       "[16; 16,64,128,32 for sd15/sdxl on a CPU]")  # fmt: skip
    bench.add_argument("--lora-files", nargs="+", metavar="FILE", help="--speed: time these LoRA files (for the "
                       "preset's model family) instead of random LoRAs")  # fmt: skip
    bench.add_argument("--latent-size", type=COUNT, help="--speed: latent side [the preset's sample size; 8 for "
                       "sd15/sdxl on a CPU]")  # fmt: skip
    bench.add_argument("--repeats", type=COUNT, help="--speed: timed repeats per configuration [5; 3 for sd15/sdxl on "
                       "a CPU]")  # fmt: skip
    bench.add_argument("--warmup", type=NON_NEGATIVE_INT, help="--speed: untimed warm-up calls [2; 1 for sd15/sdxl on "
                       "a CPU]")  # fmt: skip
    bench.add_argument("--no-baselines", action="store_true", help="skip diffusers' PEFT baselines")
    bench.add_argument("--compiled", action=argparse.BooleanOptionalAction, help="--speed: also time methods "
                       "under torch.compile (inductor, two graphs) [on; off for tiny, and for sd15/sdxl on a "
                       "CPU]")  # fmt: skip
    bench.add_argument("--world", action=argparse.BooleanOptionalAction, help="--speed: also time whole demo-world "
                       "generations, batch 1 and 8, in images per second, compiled too except on a CPU [on; off for "
                       "tiny, and for sd15/sdxl on a CPU]")  # fmt: skip
    bench.add_argument("--world-steps", type=COUNT, default=25, help="--speed: steps per demo-world generation [25]")
    bench.add_argument("--device", help="cuda, cpu, ... [cuda if available]")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="[float16 on CUDA, float32 on "
                       "CPU; --speed: bfloat16 for sd15/sdxl on a CPU]")  # fmt: skip
    bench.add_argument("--out", help="results folder [outputs/bench, or outputs/speed with --speed]")
    _add_limits(bench)


def _add_studio(commands: argparse._SubParsersAction) -> None:
    """The ``studio`` command's arguments."""
    studio = commands.add_parser(
        "studio",
        help="open the Gradio studio in the browser",
        description="The Gradio studio: a LoRA library, Compose, Compare and a Gallery, on one base model. Every "
        "button is also a named API endpoint for gradio_client.",
    )
    studio.add_argument("--model", default=DEFAULT_MODEL, help=f"base model [{DEFAULT_MODEL}]")
    studio.add_argument("--library", default="outputs/library", help="LoRA library folder [outputs/library]")
    studio.add_argument("--clip", help="CLIPScore model for Compare: an open_clip folder or NAME:PRETRAINED")
    studio.add_argument("--host", default="127.0.0.1", help="address to serve on [127.0.0.1]")
    studio.add_argument("--port", type=int, default=7860, help="port [7860]")
    studio.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    studio.add_argument("--allow-pickle", action="store_true", help="accept pickle uploads (loaded weights-only)")
    studio.add_argument("--max-upload-mb", type=MEGABYTES, default=1024, help="largest upload in MB [1024]")
    studio.add_argument(
        "--operator-actions",
        action=argparse.BooleanOptionalAction,
        help="let visitors switch the base model, load server folders and remove or edit library LoRAs "
        "(/load_model, /add_folder, /remove_lora, /edit_lora) "
        "[on when served on loopback only, off with --host beyond it or --share]",
    )
    _add_limits(studio)


def _add_grid(commands: argparse._SubParsersAction) -> None:
    """The ``grid`` command's arguments."""
    grid = commands.add_parser(
        "grid",
        help="rebuild a benchmark's tables, plots and per-set image grids",
        description="Rebuild summary.md, results.csv/jsonl, plots/ and grids/ of a benchmark folder from its records.",
    )
    grid.add_argument("results", help="a benchmark's --out folder")
    grid.add_argument("--methods", help="comma-separated method order [as found in the records]")


def _add_demo_world(commands: argparse._SubParsersAction) -> None:
    """The ``demo-world`` command's arguments."""
    world = commands.add_parser(
        "demo-world",
        help="train, check or show the embedded demo world",
        description="The demo world (assets/demo_world): a small SD-architecture pipeline trained on a "
        "procedural image world, one LoRA per concept and an offline CLIP. 'train' regenerates it from "
        "renders (resumable, stage by stage), 'evaluate' measures its detector hit rates, 'grid' draws "
        "each LoRA alone and one composition per method, 'regional' scores two characters side by side "
        "(each on its own half) for merge, composite and regional composition; 'labels' generates "
        "pictures to label by eye (added to labels.json in --out, with numbered contact sheets), "
        "'agreement' compares the detectors with a labelled folder's held-out third (--out, "
        "[assets/labels]; --split), 'cards' saves beside each LoRA a picture of it alone that the "
        "detectors find right (<name>.preview.png, its prompt and seed in the PNG text).",
    )
    world.add_argument("action", choices=["train", "evaluate", "grid", "regional", "labels", "agreement", "cards"])
    world.add_argument(
        "--folder",
        help="the demo world's folder; train: where to train [outputs/demo-world; the "
        "shipped world only when named]; others: [assets/demo_world, or $COMPOSE_DEMO_WORLD]",
    )
    world.add_argument(
        "--preset",
        default="cpu",
        help="train: cpu (about 5 hours on 2 cores) or quick (a smoke test of every stage) [cpu]",
    )
    world.add_argument("--force", action="store_true", help="train: replace a world of another preset in --folder")
    world.add_argument("--stages", default="vae,base,refine,loras,clip", help="train: stages to run; "
                       "one that runs discards what was trained on it [vae,base,refine,loras,clip]")  # fmt: skip
    world.add_argument("--jobs", type=COUNT, help="train: LoRAs trained side by side, each on its share of the CPU "
                       "threads [1 on a GPU, else one per thread, at most 4]")  # fmt: skip
    world.add_argument("--generic", type=COUNT, default=200, help="evaluate: generic prompts on the base [200]")
    world.add_argument("--per-lora", type=COUNT, default=50, help="evaluate: seeds per concept's LoRA [50]")
    world.add_argument("--out", help="evaluate: report JSON [FOLDER/report.json]; grid: PNG "
                       "[docs/demo-world-grid.png]; regional: JSON [FOLDER/regional.json]; labels, "
                       "agreement: the labelled folder [assets/labels]")  # fmt: skip
    world.add_argument("--split", choices=["held-out", "tune", "all"], default="held-out",
                       help="agreement: the labelled pictures to measure on [held-out]")  # fmt: skip
    world.add_argument("--sheet", help="agreement: also draw the pictures where the detectors and the labels "
                       "disagree into this PNG")  # fmt: skip
    world.add_argument("--methods",
                       default="merge,switch,composite,klora,cmlora,patch,bands,wswitch,wcomposite,routed",
                       help="grid: methods of the composition rows; routed's regions follow them [all]")  # fmt: skip
    world.add_argument("--device", help="cuda, cpu, ... [cuda if available]")


def _load_composer(model: str, device: str | None, limits: checks.Limits | None = None, compile: bool = False):
    from .composer import Composer

    composer = Composer.load(model, device, compile=compile)
    if limits is not None:
        composer.limits = limits
    return composer


def _cli_lora(composer, spec: str, allow_pickle: bool, category: str | None):
    """``--lora NAME_OR_PATH``: a file (the loaded LoRA itself where the model already
    brings that very file), else a LoRA the model brings by name; anything else is
    refused, listing those names."""
    if Path(spec).exists():
        return composer.load_lora(spec, allow_pickle=allow_pickle, category=category)
    if spec in composer.loras:
        return composer.loras[spec]
    raise ValueError(_unknown_lora(spec, list(composer.loras)))


def _unknown_lora(spec: str, names: list[str]) -> str:
    """Why ``spec`` names no LoRA, with the names the model does bring."""
    brings = _brings(names)
    return f"{spec}: no such file, and no LoRA of that name comes with the model ({brings}); give a LoRA file's path"


def _unknown_tag(name: str, names: list[str]) -> str:
    """Why a prompt's ``<lora:NAME>`` names no LoRA, with the names it could have named."""
    return (f"the prompt's <lora:{name}> names no LoRA: no LoRA of that name comes with the model ({_brings(names)}) "
            "or is given with --lora; pass its file with --lora or its folder with --lora-dir")  # fmt: skip


def _brings(names: list[str]) -> str:
    return f"it brings {', '.join(sorted(names))}" if names else "it brings none"


def _check_names(args: argparse.Namespace, model: str, prompt: str | None) -> None:
    """Every ``--lora`` and every ``<lora:NAME>`` of ``prompt`` names a file or a LoRA the
    model brings, checked before the model loads (10 s), so that a typo is answered at
    once; the load checks again what only it can (a file that is the model's LoRA)."""
    library = _library(model)
    if library is None:
        return
    brought = list(library)
    for spec, _ in args.lora:
        if not Path(spec).exists() and spec not in brought:
            raise ValueError(_unknown_lora(spec, brought))
    given = {*brought, *(Path(spec).stem for spec, _ in args.lora)}
    folder = Path(args.lora_dir) if args.lora_dir else None
    for use in extract_lora_tags(prompt or "")[1]:
        if use.name not in given and not (folder and (folder / f"{use.name}.safetensors").is_file()):
            raise ValueError(_unknown_tag(use.name, brought))


def _check_method(settings: dict) -> None:
    """Build the method once before the model loads, so that a parameter it refuses is
    answered in seconds rather than after the load."""
    from .methods import METHODS, get_method

    method, parameters = settings["method"], settings.get("method_params") or {}
    if isinstance(method, str) and method in METHODS:
        checks.method_parameters(method, METHODS[method], parameters)
    get_method(method, **parameters)


def _library(model: str) -> dict[str, Path] | None:
    """The LoRA files ``model`` brings by name, in load order (a bundled model's,
    :mod:`compose.bundles`), read from its folder without importing torch (seconds on a
    loaded machine), so that a misspelt name is answered at once and ``inspect`` shows
    them as ``generate`` uses them; ``None`` where the bundle's folder is not there (its
    load then says what to do)."""
    if model not in BUNDLES:
        return {}
    try:
        return brought_loras(model)
    except FileNotFoundError:
        return None


AUTOMATIC_MODELS = (DEFAULT_MODEL, "tiny:sd1", "tiny:sdxl")
"""Models a PNG record may name and ``--from-png`` loads without being asked: they ship
with compose or are built in memory, so loading them reads nothing the record chose."""


def _recorded_model(args: argparse.Namespace, record: dict) -> str:
    """The model to reproduce ``record`` on: ``--model``, else the recorded one where it
    is automatic or ``--trust-png-model`` is given. A forged record must not make
    compose load (or download) whatever folder, file or hub id it names."""
    recorded = record["model"]
    if args.model:
        return args.model
    if recorded in AUTOMATIC_MODELS or args.trust_png_model:
        return recorded
    raise ValueError(
        f"{args.from_png}: the image was made with the model {recorded!r}; compose loads a model that a PNG names "
        f"only when asked: pass --model {recorded} (or another model), or --trust-png-model"
    )


def _announce(args: argparse.Namespace, model: str, record: dict) -> None:
    """Say which model and LoRA files a reproduction will load, before it loads them: for
    each LoRA of the record, the local file (``--lora``) with its sha256, never the file the
    record names (a path on the machine that made it, or a forged one)."""
    from .loading import file_hashes

    brought = _library(model) or {}
    files = [Path(spec) if Path(spec).is_file() else brought.get(spec) for spec, _ in args.lora]
    local = {file_hashes(path)[0]: path for path in files if path is not None}
    loras = "; ".join(f"{e['name']} ({local.get(e['sha256'], 'no --lora file has it')}, sha256 {e['sha256'][:12]})"
                      for e in record["loras"]) or "none"  # fmt: skip
    print(printable(f"compose: {args.from_png}: model {model}; LoRAs (from --lora, matched by sha256): {loras}"),
          file=sys.stderr)  # fmt: skip


def _output_paths(out: str, seeds: list[int]) -> list[Path]:
    """Where each seed's PNG goes, every path checked writable before any work: ``--out``
    a folder (ending in ``/`` or existing) gets ``compose.png``, a name without an
    extension gets ``.png``, another extension is refused (the settings live in PNG
    text chunks); several seeds add ``-SEED`` before the extension."""
    from .files import OutputError, check_writable

    folder = out.endswith(("/", os.sep)) or Path(out).is_dir()
    base = Path(out) / "compose.png" if folder else Path(out)
    if not base.suffix:
        base = base.with_suffix(".png")
    if base.suffix.lower() != ".png":
        raise OutputError(f"--out {out}: compose writes PNG images (the settings are kept in PNG text chunks); "
                          "give a name ending in .png, or a folder")  # fmt: skip
    paths = [base] if len(seeds) == 1 else [base.with_name(f"{base.stem}-{seed}{base.suffix}") for seed in seeds]
    for path in paths:
        check_writable(path)
    return paths


def _generate(args: argparse.Namespace) -> None:
    from .metadata import read_record, save_png

    record = read_record(args.from_png) if args.from_png else None
    if record is not None:
        settings, seeds, model = _png_settings(args, record)
    elif args.prompt is None:
        raise ValueError("--prompt is required (or --from-png)")
    else:
        settings, seeds, model = _arg_settings(args), args.seed, args.model or DEFAULT_MODEL
    paths = _output_paths(args.out, seeds)
    for what, text in (("the prompt", settings["prompt"]), ("the negative prompt", settings["negative_prompt"])):
        checks.prompt_length(_limits(args), what, text)  # the chunks are counted before the first step
    extract_lora_tags(settings["prompt"])  # a malformed or path-like tag is refused before the model loads
    _check_names(args, model, settings["prompt"] if record is None else None)
    _check_method(settings)
    if record is not None:
        _announce(args, model, record)
    composer = _load_composer(model, args.device, _limits(args), compile=args.compile)
    categories = dict(getattr(args, "category", []))
    loaded = [(_cli_lora(composer, spec, args.allow_pickle, categories.get(Path(spec).stem)), weight)
              for spec, weight in args.lora]  # fmt: skip
    if record is not None:
        settings["loras"] = _png_loras(args.from_png, composer, record, settings["loras"])
    else:
        tagged = _load_tagged(args, composer, categories)
        settings["loras"] = [(lora.name, weight) for lora, weight in loaded if lora.name not in tagged]
    sampling = settings["sampling"]
    width, height = checks.size_and_steps(composer.limits, composer.shape, width=sampling.width,
                                          height=sampling.height, steps=sampling.steps)  # fmt: skip
    note = checks.cost_note(width, height, composer.shape.native, sampling.steps)
    if note:
        print(f"note: {note}", file=sys.stderr)
    run = RunOptions(max_batch=args.max_batch, progress=True)
    for seed, path in zip(seeds, paths, strict=True):
        image = composer.generate(seed=seed, run=run, **settings)[0]
        save_png(image, path)
        print(path)


def _arg_settings(args: argparse.Namespace) -> dict:
    """The :meth:`Composer.generate` arguments the command line gives (LoRAs and seed aside)."""
    return dict(
        prompt=args.prompt,
        method=args.method,
        method_params=_method_params(args),
        negative_prompt=args.negative_prompt,
        lora_scale=args.lora_scale,
        sampling=SamplingConfig(
            steps=args.steps,
            guidance_scale=args.guidance,
            width=args.width,
            height=args.height,
            scheduler=args.scheduler,
        ),
    )


def _png_settings(args: argparse.Namespace, record: dict) -> tuple[dict, list[int], str]:
    """The generate arguments, seeds and model of a PNG's record; refuses a regional record
    with mask files (a PNG must not make compose open files on this machine)."""
    from .metadata import generate_kwargs, record_masks

    masks = record_masks(record)
    if masks:
        raise ValueError(f"{args.from_png}: its regional method reads the mask file {masks[0]!r} of the machine "
                         "that made it; compose does not open files a PNG names (give the regions with "
                         "--method regional --region NAME=MASK.png instead)")  # fmt: skip
    settings = generate_kwargs(record)
    return settings, [settings.pop("seed")], _recorded_model(args, record)


def _png_loras(png: str, composer, record: dict, uses: list[tuple]) -> list[tuple]:
    """The record's LoRA uses (name, weight, blocks, text weight, steps) renamed to the
    loaded LoRAs with the same sha256: the files given with ``--lora`` may be named
    otherwise here than on the machine that made the PNG."""
    by_hash = {lora.sha256: lora for lora in composer.loras.values()}
    out = []
    for entry, (_, *use) in zip(record["loras"], uses, strict=True):
        lora = by_hash.get(entry["sha256"])
        if lora is None:
            raise ValueError(f"{png} uses LoRA {entry['name']!r} ({entry['file']}, sha256 "
                             f"{entry['sha256'][:12]}...); pass that file with --lora")  # fmt: skip
        out.append((lora.name, *use))
    return out


def _load_tagged(args: argparse.Namespace, composer, categories: dict[str, str]) -> list[str]:
    """Load the LoRAs the prompt's ``<lora:NAME>`` tags name from ``--lora-dir`` unless loaded
    already; returns the tagged names."""
    tagged = [use.name for use in extract_lora_tags(args.prompt)[1]]
    for name in tagged:
        candidate = Path(args.lora_dir or ".") / f"{name}.safetensors"
        if name not in composer.loras and args.lora_dir and candidate.is_file():
            composer.load_lora(candidate, category=categories.get(name))
        elif name not in composer.loras:
            raise ValueError(_unknown_tag(name, list(composer.loras)))
    return tagged


def _inspect_file(spec: str, model: str) -> tuple[Path, str | None]:
    """The file ``inspect`` reads and the name it goes by: a path as it is, else a LoRA
    that ``model`` brings by name (the demo world's ``zorbo`` ...)."""
    if Path(spec).exists():
        return Path(spec), None
    library = _library(model) or {}
    if spec in library:
        return library[spec], spec
    raise ValueError(_unknown_lora(spec, list(library)))


def _span_text(value: float | list[float] | None) -> str:
    """A rank, alpha or scale of :meth:`LoRA.scale_summary` as text: ``None`` is no alpha
    stored (scale 1), ``[min, max]`` a value that varies by layer."""
    if value is None:
        return "none stored (scale 1)"
    if isinstance(value, list):
        return f"{value[0]:g} to {value[1]:g} (varies by layer)"
    return f"{value:g}"


def _inspect(args: argparse.Namespace) -> None:
    from .loading import load_lora

    path, name = _inspect_file(args.lora, args.model)
    summary = load_lora(path, name=name, allow_pickle=args.allow_pickle, limits=_limits(args)).summary()
    if args.frequency:
        from .frequency import sparkline

        composer = _load_composer(args.model, args.device, _limits(args))
        lora = composer.load_lora(path, name=name, allow_pickle=args.allow_pickle)
        profile = composer.frequency_profile(lora.name)
        summary["frequency"] = {
            "model": args.model,
            "high_frequency_score": round(profile.score, 4),
            "cutoff_radius_px": profile.cutoff,
            "image_size_px": profile.size,
            "profile": sparkline(profile.profile),
        }
    if args.json:
        print(json.dumps(summary, indent=2))  # JSON escapes control characters itself
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key in ("metadata", "frequency", "notes"):
            continue
        if key == "rank" and value is None:
            value = "full matrices (no low-rank factors: a full diff, a LoKr of two full halves)"
        elif key in ("rank", "alpha", "scale"):
            value = _span_text(value) + (" (alpha / rank, folded into the weights at load)" if key == "scale" else "")
        elif isinstance(value, (dict, list)):
            value = json.dumps(value) if value else "none"
        print(f"{key:<{width}}  {printable(value)}")
    if summary["notes"]:
        print("sidecars say:")  # A1111's and Civitai's text, escaped like the metadata
        for key, value in summary["notes"].items():
            print(f"  {key}: {printable(value)}")
    if "frequency" in summary:
        print("frequency:")
        for key, value in summary["frequency"].items():
            print(f"  {key}: {printable(value)}")
    if summary["metadata"]:
        print("metadata:")  # the file's own text: escape sequences in it must not reach the terminal
        for key, value in summary["metadata"].items():
            print(f"  {printable(key)}: {printable(value)}")
    if summary["category"] is None:
        print(f"(no category stored; set one with category= / a sidecar JSON: {', '.join(CATEGORIES)})")


def _bench(args: argparse.Namespace) -> None:
    import torch

    if args.sets:
        _bench_sets(args)
        return
    from .speed import run_speed_benchmark, to_markdown, write_results

    result = run_speed_benchmark(
        preset=args.preset,
        max_loras=args.max_loras,
        rank=args.rank,
        lora_files=args.lora_files or (),
        latent_size=args.latent_size,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        warmup=args.warmup,
        repeats=args.repeats,
        baselines=not args.no_baselines,
        compiled=args.compiled,
        world=args.world,
        world_steps=args.world_steps,
        progress=lambda text: print(f"compose: {text}", file=sys.stderr),
    )
    print(to_markdown(result))
    for path in write_results(result, Path(args.out or "outputs/speed")):
        print(path)


def _scorer(spec: str | None, device: str | None):
    from .evaluation.clipscore import CLIPScorer

    if spec is None:
        if not bundle_clip(DEMO_WORLD).is_dir():
            raise ValueError(
                f"no --clip given and the demo world's offline CLIP is not at {bundle_clip(DEMO_WORLD)}: pass an "
                "open_clip folder or NAME:PRETRAINED such as ViT-B-16:openai"
            )
        spec = str(bundle_clip(DEMO_WORLD))
    if Path(spec).is_dir():
        return CLIPScorer.from_folder(spec, device=device)
    name, _, pretrained = spec.partition(":")
    return CLIPScorer.from_open_clip(name, pretrained or "openai", device=device)


def _bench_sets(args: argparse.Namespace) -> None:
    from .evaluation.bench import method_spec, run_benchmark
    from .extras import require

    require("matplotlib", "the benchmark (its plots)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or [""]
    for spec in methods:
        method_spec(spec)
    settings = {
        "lora_scale": args.lora_scale,
        "sampling": SamplingConfig(steps=args.steps, guidance_scale=args.guidance, width=args.size, height=args.size),
    }
    out = Path(args.out or "outputs/bench")
    run_benchmark(
        Path(args.sets),
        methods,
        args.seeds,
        out,
        composer_factory=lambda: _load_composer(args.model, args.device, _limits(args)),
        scorer_factory=lambda: _scorer(args.clip, args.device),
        settings=settings,
        per_n=args.sets_per_n,
    )
    if (out / "summary.md").exists():
        print((out / "summary.md").read_text())


def _studio(args: argparse.Namespace) -> None:
    from .extras import require

    require("gradio", "the studio")
    from .app.ui import launch, make_studio

    studio = make_studio(args.model, Path(args.library), args.clip, args.allow_pickle, args.max_upload_mb,
                         operator=args.operator_actions, limits=_limits(args))  # fmt: skip
    launch(studio, host=args.host, port=args.port, share=args.share)


def _grid(args: argparse.Namespace) -> None:
    from .evaluation.bench import load_records
    from .evaluation.report import write_report
    from .extras import require

    require("matplotlib", "compose grid (its plots)")
    out = Path(args.results)
    records = load_records(out)
    if not records:
        raise ValueError(f"{out}: no benchmark records under items/")
    methods = args.methods.split(",") if args.methods else list(dict.fromkeys(r["method"] for r in records))
    for path in write_report(out, records, methods).values():
        print(path)
    print(out / "grids")


def _demo_world(args: argparse.Namespace) -> None:
    if args.action == "train":
        _train_world(args)
        return
    if args.action == "agreement":
        from .demo_world.labels import LABELLED, agreement, disagreement_sheet

        split = None if args.split == "all" else args.split
        print(json.dumps(agreement(args.out or LABELLED, split), indent=2))
        sheet = disagreement_sheet(args.out or LABELLED, split) if args.sheet else None
        if sheet is not None:
            sheet.save(args.sheet)
            print(args.sheet)
        return
    from .composer import Composer
    from .demo_world.world import world_loras

    folder = Path(args.folder) if args.folder else bundle_folder(DEMO_WORLD)
    world_loras(folder)  # every concept's LoRA is there, else it says which are not
    composer = Composer.bundled(DEMO_WORLD, folder if args.folder else None, args.device)
    if args.action == "evaluate":
        from .demo_world.evaluate import evaluate, load_ceiling

        load_ceiling(composer, folder)
        report = evaluate(composer, generic=args.generic, per_lora=args.per_lora, progress=print)
        _write_json(Path(args.out) if args.out else folder / "report.json", report)
    elif args.action == "labels":
        from .demo_world.labels import LABELLED, candidates, model_id, pictures, save_candidates

        labelled = Path(args.out or LABELLED)  # a new batch draws new scenes: its seed is the count so far
        print(save_candidates(labelled, candidates(composer, seed=pictures(labelled)), model=model_id(folder)))
    elif args.action == "cards":
        from .demo_world.cards import write_cards

        write_cards(composer, folder, say=print)
    elif args.action == "regional":
        from .demo_world.evaluate import two_characters

        result = two_characters(composer, ["merge", "composite", "regional", "routed"])
        _write_json(Path(args.out) if args.out else folder / "regional.json", result)
    else:
        from .demo_world.evaluate import example_grid

        out = Path(args.out or "docs/demo-world-grid.png")
        example_grid(composer, [m.strip() for m in args.methods.split(",")]).save(out)
        print(out)


def _train_world(args: argparse.Namespace) -> None:
    """``compose demo-world train``: a progress bar per stage (with its ETA), resumable."""
    from tqdm import tqdm

    from .demo_world.train import train

    bars: dict[str, tqdm] = {}

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        bar = bars.setdefault(stage, tqdm(total=steps, desc=stage, unit="step"))
        bar.update(step - bar.n)
        if loss:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == steps:
            bar.close()

    folder = Path(args.folder or "outputs/demo-world")
    print(f"training the demo world into {folder} (resumable: run the same command again)", file=sys.stderr)
    stages = tuple(s.strip() for s in args.stages.split(","))
    record = train(folder, args.preset, stages, progress, force=args.force, jobs=args.jobs)
    print(json.dumps(record, indent=2))


def _write_json(path: Path, data: dict) -> None:
    from .files import atomic_open

    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2)
    print(path)


class Terminated(Exception):
    """SIGTERM arrived (a service manager, ``kill``, a batch scheduler): stop like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


@contextmanager
def _sigterm_stops():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, so the
    atomic writes clean up their temporary files and the user reads why the command
    stopped; the previous handler comes back after (``main`` may run inside a program)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raised_by(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes ``names`` of ``compose.MODULE`` where it is imported: a module
    not imported raised nothing, and importing it (torch, diffusers: seconds) only to say
    so would delay the one line that a typo gets before anything loads."""
    loaded = sys.modules.get(f"{__package__}.{module}")
    return tuple(getattr(loaded, name) for name in names) if loaded else ()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from .extras import MissingExtra
    from .logs import debugging

    handlers = {
        "generate": _generate,
        "inspect": _inspect,
        "bench": _bench,
        "grid": _grid,
        "studio": _studio,
        "demo-world": _demo_world,
    }
    try:
        with _sigterm_stops():
            handlers[args.command](args)
    except (ValueError, KeyError, OSError, MissingExtra, *_raised_by("composer", "ModelLoadError"),
            *_raised_by("loop", "NonFiniteLatentsError", "OutOfMemory")) as error:  # fmt: skip
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        parser.exit(2, f"compose: error: {printable(message)}\n")
    except (KeyboardInterrupt, *_raised_by("loop", "GenerationCancelled")):
        parser.exit(130, "compose: interrupted; images already written are complete\n")
    except Terminated:
        parser.exit(143, "compose: terminated (SIGTERM); images already written are complete\n")
    except Exception as error:  # an unforeseen failure: one line, the traceback on request
        if debugging():
            raise
        parser.exit(1, f"compose: internal error: {type(error).__name__}: {printable(error)} "
                    "(set COMPOSE_DEBUG=1 for the traceback)\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
