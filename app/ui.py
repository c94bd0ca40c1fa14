"""The studio's Gradio layout: Compose, Compare, Library and Gallery tabs.

Every button is also a named public API endpoint (``/generate``, ``/compare``,
``/load_settings``, ``/add_lora``, ...), so ``gradio_client`` can drive everything the
page does. The queue runs one generation at a time (``default_concurrency_limit=1``):
two users never run the model twice at once; they wait their turn. Stop ends only the
caller's own run (runs are keyed by Gradio's session hash). Error toasts render HTML,
so every message is escaped before it is shown (:func:`_user_error`).
"""

from __future__ import annotations

import html
import random
import tempfile
from pathlib import Path

import gradio as gr

from ..checks import Limits
from ..composer import DEMO_WORLD, Composer
from ..demo_world.evaluate import EXAMPLE_PROMPT
from ..demo_world.world import demo_world_clip
from ..loading import CATEGORIES
from ..loop import GenerationCancelled
from ..methods import METHODS
from ..schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from ..tiny import write_random_loras
from .studio import LIBRARY_COLUMNS, LORA_COLUMNS, Settings, Studio, StudioError, lora_weights, md

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

INTRO = """# compose studio
Pick LoRAs (weight above 0), write a prompt, choose a method, **Generate**. **Compare** renders the same
prompt and seed with every method side by side. Every PNG carries its full settings: drop one on
*Load settings from PNG* to get them back."""


def _settings(prompt, negative, loras, insert, method, tau, alpha, beta, ordering, schedule, steps, guidance,
              width, height, seed, scheduler) -> Settings:  # fmt: skip
    params = {
        "switch": {"tau": int(tau)},
        "wswitch": {"tau": int(tau)},
        "klora": {"alpha": float(alpha), "beta": float(beta)},
        "cmlora": {"ordering": ordering, "schedule": schedule},
    }.get(method, {})
    rows = loras.values.tolist() if hasattr(loras, "values") else (loras or {}).get("data", loras)
    return Settings(
        prompt=prompt or "",
        negative_prompt=negative or "",
        loras=lora_weights(rows),
        insert_triggers=bool(insert),
        method=method,
        method_params=params,
        steps=_whole("steps", steps),
        guidance_scale=_real("guidance", guidance),
        width=_whole("width", width),
        height=_whole("height", height),
        seed=_whole("seed", seed),
        scheduler=scheduler,
    )


def _real(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a number, got {value!r}") from None


def _whole(name: str, value) -> int:
    """An integer setting; a float must be whole (the API may send 3.0, never 3.5)."""
    number = _real(name, value)
    if not number.is_integer():
        raise StudioError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _user_error(error: Exception) -> gr.Error:
    """A toast for a user's mistake. Toasts render HTML, and the message may carry LoRA
    names, file names and prompts from uploads and PNGs, so it is escaped."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    return gr.Error(html.escape(text, quote=False), print_exception=False)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def operator_default(host: str, share: bool) -> bool:
    """Operator actions (switching the model, loading server folders) are on only when
    the studio is reachable from this machine alone: served on loopback, no share link."""
    return host in LOOPBACK_HOSTS and not share


def build(studio: Studio) -> gr.Blocks:
    """The studio page bound to ``studio``."""
    scale = studio.composer.pipeline.vae_scale_factor
    size = studio.composer.pipeline.unet.config.sample_size * scale
    largest = max(size, min(1536, studio.limits.side_limit(size)))
    operator = bool(studio.operator)
    with gr.Blocks(title="compose studio") as page:
        gr.Markdown(INTRO)
        with gr.Row():
            model = gr.Textbox(
                studio.model,
                scale=4,
                label="base model (demo-world, diffusers folder, .safetensors, hub id or tiny:sd1)"
                + ("" if operator else "; switching it is an operator action, off here"),
                interactive=operator,
            )
            load_model = gr.Button("Load model", scale=1, interactive=operator)
        status = gr.Markdown("")
        with gr.Tabs():
            with gr.Tab("Compose"):
                with gr.Row():
                    with gr.Column(scale=3):
                        example = EXAMPLE_PROMPT if studio.model == DEMO_WORLD else ""
                        prompt = gr.Textbox(example, label="prompt", lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="negative prompt")
                        loras = gr.Dataframe(studio.compose_rows(), headers=LORA_COLUMNS, datatype=["str", "number"],
                                             label="LoRAs (weight 0 = off; row order = Switch order)",
                                             interactive=True, elem_id="loras")  # fmt: skip
                        insert = gr.Checkbox(label="insert the LoRAs' trigger words into the prompt")
                        method = gr.Radio(list(METHODS), value="merge", label="method")
                        with gr.Accordion("method parameters", open=False):
                            tau = gr.Slider(1, 20, 5, step=1, label="switch: steps per LoRA (tau)")
                            alpha = gr.Slider(0, 3, 1.5, step=0.05, label="K-LoRA alpha")
                            beta = gr.Slider(0, 2, 0.5, step=0.05, label="K-LoRA beta")
                            ordering = gr.Radio(["frequency", "category"], value="frequency", label="CMLoRA ordering")
                            schedule = gr.Radio(["nonuniform", "uniform", "off"], value="nonuniform",
                                                label="CMLoRA cache schedule")  # fmt: skip
                        with gr.Accordion("regions (regional method)", open=False):
                            with gr.Row():
                                names = list(studio.composer.loras)
                                region_lora = gr.Dropdown(names, value=names[0] if names else None, label="LoRA",
                                                          elem_id="region-lora")  # fmt: skip
                                region_box = gr.Textbox(label="box x0, y0, x1, y1 (fractions), or paint below")
                            region_paint = gr.Sketchpad(label="paint where this LoRA draws", type="numpy",
                                                        image_mode="RGBA", canvas_size=(256, 256),
                                                        elem_id="region-paint")  # fmt: skip
                            with gr.Row():
                                set_region = gr.Button("Set region", elem_id="set-region")
                                clear_regions = gr.Button("Clear regions")
                            regions_info = gr.Markdown(studio.describe_regions(), elem_id="regions-info")
                        with gr.Row():
                            steps = gr.Slider(1, 100, 25, step=1, label="steps")
                            guidance = gr.Slider(1, 20, 7.5, step=0.5, label="guidance")
                        with gr.Row():
                            width = gr.Slider(min(64, size), largest, size, step=scale, label="width")
                            height = gr.Slider(min(64, size), largest, size, step=scale, label="height")
                        with gr.Row():
                            seed = gr.Number(0, precision=0, label="seed")
                            randomize = gr.Checkbox(label="random seed")
                            scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="scheduler")
                        with gr.Row():
                            generate = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Stop", variant="stop")
                    with gr.Column(scale=2):
                        image = gr.Image(label="result", type="filepath", format="png", elem_id="result", height=420)
                        download = gr.File(label="PNG with settings")
                        info = gr.Markdown("")
                        reuse = gr.Button("Reuse this seed")
                        settings_png = gr.File(label="Load settings from PNG", file_types=[".png"], type="filepath",
                                               elem_id="settings-png")  # fmt: skip
            with gr.Tab("Compare"):
                compare = gr.Button("Compare every method (Compose tab settings)", variant="primary")
                comparison = gr.Gallery(label="same prompt and seed, every method", columns=len(METHODS), height=300)
                table = gr.Markdown("")
            with gr.Tab("Library"):
                library = gr.Dataframe(studio.library_rows(), headers=LIBRARY_COLUMNS, interactive=False,
                                       label=f"LoRAs (folder {studio.library})")  # fmt: skip
                upload = gr.File(label="add a LoRA (.safetensors)", type="filepath", height=120)
                with gr.Row():
                    folder = gr.Textbox(label="or load a folder of LoRAs" + ("" if operator else " (operator only)"),
                                        scale=4, interactive=operator)  # fmt: skip
                    add_folder = gr.Button("Load folder", scale=1, interactive=operator)
                with gr.Row():
                    name = gr.Dropdown(list(studio.composer.loras), label="LoRA", allow_custom_value=True)
                    category = gr.Dropdown(["", *CATEGORIES], label="category")
                    triggers = gr.Textbox(label="trigger words (comma-separated)")
                with gr.Row():
                    save_edit = gr.Button("Save category and triggers")
                    profile = gr.Button("Frequency profile")
                    remove = gr.Button("Remove", variant="stop")
            with gr.Tab("Gallery"):
                gallery = gr.Gallery(label="made in this session (newest first)", columns=4)
        history = gr.State([])

        inputs = [prompt, negative, loras, insert, method, tau, alpha, beta, ordering, schedule, steps, guidance,
                  width, height, seed, scheduler]  # fmt: skip

        def refreshed(message: str, previous=None):
            rows = previous.values.tolist() if hasattr(previous, "values") else None
            names = list(studio.composer.loras)
            choices = gr.update(choices=names)
            return message, studio.library_rows(), studio.compose_rows(rows), choices, choices

        library_outputs = [status, library, loras, name, region_lora]

        def on_generate(request: gr.Request, *values, progress=gr.Progress()):
            *rest, randomize_seed, made = values
            try:  # every step that reads the user's values is inside: a bad value is a toast, not "null"
                settings = _settings(*rest)
                if randomize_seed:
                    settings.seed = random.randrange(2**32)
                path, record, seconds = studio.generate(settings, lambda f, d: progress(f, desc=d), _session(request))
            except (StudioError, ValueError, KeyError, GenerationCancelled) as error:
                raise _user_error(error) from None
            score = studio.clipscore(path, record)
            text = f"**{settings.method}**, seed {settings.seed}, {seconds:.2f} s" + (
                f", CLIPScore {score:.2f}" if score is not None else ""
            )
            made = [(str(path), f"{settings.method} · seed {settings.seed}"), *made]
            return str(path), str(path), text, settings.seed, made, made

        generate.click(on_generate, [*inputs, randomize, history], [image, download, info, seed, gallery, history],
                       api_name="generate", concurrency_id="model", show_progress_on=image)  # fmt: skip

        def on_stop(request: gr.Request) -> str:
            return studio.stop(_session(request))

        stop.click(on_stop, None, status, api_name="stop", queue=False)

        def on_reuse(record_path):
            if not record_path:
                raise gr.Error("no image yet", print_exception=False)
            try:
                return studio.settings_from_png(record_path).seed
            except StudioError as error:
                raise _user_error(error) from None

        reuse.click(on_reuse, image, seed, api_name="reuse_seed")

        def on_compare(request: gr.Request, *values, progress=gr.Progress()):
            *rest, made = values
            try:
                rows = studio.compare(_settings(*rest), lambda f, d: progress(f, desc=d), _session(request))
            except (StudioError, ValueError, KeyError, GenerationCancelled) as error:
                raise _user_error(error) from None
            items = [
                (str(r["path"]), f"{r['method']} · {r['seconds']:.2f} s"
                 + ("" if r["clipscore"] is None else f" · CLIPScore {r['clipscore']:.2f}"))
                for r in rows
            ]  # fmt: skip
            lines = ["| method | seconds / image | CLIPScore | concepts present |", "|---|---|---|---|"]
            for r in rows:
                score = "n/a" if r["clipscore"] is None else f"{r['clipscore']:.2f}"
                found = "n/a" if r["presence"] is None else f"{r['presence']['concepts_present']:.0%}"
                lines.append(f"| {r['method']} | {r['seconds']:.2f} | {score} | {found} |")
            if studio.scorer is None:
                lines.append("\nCLIPScore needs a CLIP model: start the studio with `--clip`.")
            made = [*items[::-1], *made]
            return items, "\n".join(lines), made, made

        compare.click(on_compare, [*inputs, history], [comparison, table, gallery, history], api_name="compare",
                      concurrency_id="model", show_progress_on=comparison)  # fmt: skip

        def on_settings(png):
            if not png:
                return [gr.update()] * (len(inputs) + 1)
            try:
                s = studio.settings_from_png(png)
            except StudioError as error:
                raise _user_error(error) from None
            params = s.method_params or {}
            prompt, weights, note = _blocks_as_tags(s)
            rows = [[n, weights.get(n, 0.0)] for n in studio.composer.loras]
            return (prompt, s.negative_prompt, rows, False, s.method, params.get("tau", 5), params.get("alpha", 1.5),
                    params.get("beta", 0.5), params.get("ordering", "frequency"), params.get("schedule", "nonuniform"),
                    s.steps, s.guidance_scale, s.width, s.height, s.seed, s.scheduler,
                    f"settings of {md(Path(png).name)} loaded{note}")  # fmt: skip

        settings_png.upload(on_settings, settings_png, [*inputs, status], api_name="load_settings")

        def guarded(action):
            def handler(*args):
                *values, previous = args
                try:
                    return refreshed(action(*values), previous)
                except StudioError as error:
                    raise _user_error(error) from None

            return handler

        def on_pick(picked):
            lora = studio.composer.loras.get(picked)
            return ("", "") if lora is None else (lora.category or "", ", ".join(lora.triggers))

        def on_set_region(lora_name, box, painting):
            try:
                return studio.set_region(lora_name, box or "", painting)
            except StudioError as error:
                raise _user_error(error) from None

        set_region.click(on_set_region, [region_lora, region_box, region_paint], regions_info, api_name="set_region")
        clear_regions.click(studio.clear_regions, None, regions_info, api_name="clear_regions")
        name.change(on_pick, name, [category, triggers], api_name=False)
        upload.upload(guarded(studio.add_upload), [upload, loras], library_outputs, api_name="add_lora")
        add_folder.click(guarded(studio.load_folder), [folder, loras], library_outputs, api_name="add_folder")
        save_edit.click(guarded(studio.edit), [name, category, triggers, loras], library_outputs, api_name="edit_lora")
        remove.click(guarded(studio.remove), [name, loras], library_outputs, api_name="remove_lora")
        profile.click(guarded(studio.frequency), [name, loras], library_outputs, api_name="frequency_profile",
                      concurrency_id="model")  # fmt: skip
        load_model.click(guarded(studio.load_model), [model, loras], library_outputs, api_name="load_model",
                         concurrency_id="model")  # fmt: skip
    return page


def _blocks_as_tags(settings: Settings) -> tuple[str, dict[str, float], str]:
    """The prompt, table weights and a status note for settings from a PNG: the table has
    no column for block weights, so a LoRA that has them goes into the prompt as an A1111
    tag ``<lora:NAME:WEIGHT:lbw=BLOCKS>`` (which keeps them) instead of the table."""
    prompt, weights, moved = settings.prompt, {}, []
    for name, weight, *blocks in settings.loras or []:
        if blocks and blocks[0] is not None:
            prompt += f" <lora:{name}:{weight}:lbw={blocks[0]}>"
            moved.append(name)
        else:
            weights[name] = weight
    note = f" (block weights of {', '.join(md(n) for n in moved)} kept as prompt tags)" if moved else ""
    return prompt, weights, note


def make_studio(model: str, library: Path, clip: str | None = None, allow_pickle: bool = False,
                max_upload_mb: float = 1024, operator: bool | None = None,
                limits: Limits | None = None) -> Studio:  # fmt: skip
    """A studio on ``model``; on the demo world its eleven LoRAs and its offline CLIP (unless
    ``clip`` names another), on a tiny random model three random LoRAs to compose.
    ``operator``: see :class:`~compose.app.studio.Studio` (``None``: :func:`launch` decides)."""
    scorer = None
    if clip is None and model == DEMO_WORLD and demo_world_clip().is_dir():
        clip = str(demo_world_clip())
    if clip:
        from ..evaluation.clipscore import CLIPScorer

        scorer = CLIPScorer.from_folder(clip) if Path(clip).is_dir() else CLIPScorer.from_open_clip(*clip.split(":"))
    studio = Studio(model, library, Composer.load, allow_pickle, max_upload_mb, scorer, operator, limits)
    if model.startswith("tiny:") and not studio.composer.loras:
        extras = Path(tempfile.mkdtemp(prefix="compose-random-loras-"))
        write_random_loras(studio.composer.pipeline, extras)
        studio.load_trusted_folder(extras)
    return studio


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True) -> gr.Blocks:  # fmt: skip
    """Serve the studio; ``block=False`` returns at once (tests, notebooks). Operator
    actions follow :func:`operator_default` unless the studio was told."""
    if studio.operator is None:
        studio.operator = operator_default(host, share)
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                max_file_size=studio.max_upload_bytes, allowed_paths=[str(studio.outputs)])  # fmt: skip
    if block:
        public = f", public link {page.share_url}" if page.share_url else " (--share makes a public link)"
        print(f"compose studio: open {page.local_url}{public}; Ctrl+C stops it", flush=True)
        page.block_thread()
    return page
