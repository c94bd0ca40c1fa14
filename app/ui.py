"""The studio's page: Compose, Compare, X/Y plot, PNG Info, Library and Gallery tabs.

Laid out for one look at 1440×900: the prompt, the method and Generate on top, the LoRA
cards and weights under them, the result large beside them with its progress on it.
Every mistake shows as a message beside the control that caused it and leaves every
other control as it was (a handler returns the message; it never raises into the
page). Everything a session makes or sets (gallery, regions, Stop) is its own; the
library is shared and re-read on every page load. The public API is declared apart,
with named parameters (:mod:`.api`).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import gradio as gr
from tqdm import tqdm

from ..bundles import BUNDLES, DEMO_WORLD, bundle_clip
from ..checks import Limits
from ..composer import Composer
from ..demo_world.evaluate import EXAMPLE_METHOD, EXAMPLE_PROMPT, EXAMPLE_SEED, EXAMPLE_SET
from ..loading import CATEGORIES
from ..loop import GenerationCancelled
from ..methods import METHODS
from ..schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from ..tiny import write_random_loras
from .api import USER_ERRORS, register_api, session_of, user_text
from .display import for_display
from .studio import LIBRARY_COLUMNS, LORA_COLUMNS, Settings, Studio, StudioError, as_weight, lora_weights, md

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
COMPARE_TILES = 6
"""Compare's tiles per row: every method side by side in two rows, all on one 1440×900 screen."""
STOP_WAIT = 30.0
"""Seconds Stop waits for the run to end before it says "stopping after the current step"."""
COMPARE_COLUMNS = ["method", "seconds / image (warm)", "warm-up first (s, untimed)", "CLIPScore = 100·max(cos, 0)",
                   "cos", "concepts present"]  # fmt: skip

INTRO = """**compose studio** · write a prompt, pick LoRA cards and switch them **on**, pick a method, **Generate**
(Ctrl+Enter). Every PNG carries its full settings: drop one on *Load settings from PNG* to get them back."""
CSS = """#card-on .info, #card-on label span, #card-weight label span { white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }"""
"""One line for each label of the picked card's controls, whatever its name: the row keeps its height."""
MESSAGE_HEIGHT = 48
"""The Compose status line's fixed height (two lines; a longer message scrolls in it): it
never pushes the cards down as it appears or changes."""

CTRL_ENTER = """() => { document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    document.querySelector("#generate")?.click(); event.preventDefault();
  }
}); }"""


SHOWN_PARAMS = {"switch": ("tau",), "wswitch": ("tau",), "klora": ("alpha", "beta"),
                "cmlora": ("ordering", "schedule")}  # fmt: skip
"""The method parameters the Compose tab has a control for; the others go in *other method parameters*."""


def _settings(prompt, negative, loras, insert, method, tau, alpha, beta, ordering, schedule, steps, guidance,
              width, height, seed, scheduler, lora_scale, extra) -> Settings:  # fmt: skip
    """The Compose tab's values (in ``ui.inputs`` order) as :class:`Settings`."""
    shown = {"tau": int(tau), "alpha": float(alpha), "beta": float(beta), "ordering": ordering, "schedule": schedule}
    params = {**_extra_params(extra), **{k: shown[k] for k in SHOWN_PARAMS.get(method, ())}}
    return Settings(
        prompt=prompt or "",
        negative_prompt=negative or "",
        loras=lora_weights(_rows(loras)),
        insert_triggers=bool(insert),
        method=method,
        method_params=params,
        steps=_whole("steps", steps),
        guidance_scale=_real("guidance", guidance),
        width=_whole("width", width),
        height=_whole("height", height),
        seed=_whole("seed", seed),
        scheduler=scheduler,
        lora_scale=_real("LoRA scale", lora_scale),
    )


def _extra_params(text: str | None) -> dict:
    """*Other method parameters*: a JSON object (empty: none)."""
    if not (text or "").strip():
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise StudioError(f"other method parameters: not JSON ({error.msg}); write an object like "
                          '{"hold": 0.3}') from None  # fmt: skip
    if not isinstance(params, dict):
        raise StudioError('other method parameters must be a JSON object like {"hold": 0.3}')
    return params


def compose_values(studio: Studio, settings: Settings) -> tuple[list, str]:
    """The Compose tab's values (``ui.inputs`` order) that give ``settings`` back exactly,
    and a note for the status line: the table in the settings' LoRA order (Switch's order),
    the method's parameters in their controls or, without one, in *other method
    parameters* (those off their defaults), and the LoRA scale. The inverse of
    :func:`_settings`, so that Send to Compose reproduces a PNG's image."""
    params = dict(settings.method_params or {})
    defaults = METHODS[settings.method]().parameters()
    shown = SHOWN_PARAMS.get(settings.method, ())
    extra = {k: v for k, v in params.items() if k not in shown and (k not in defaults or v != defaults[k])}
    prompt, weights, note = _table_and_tags(settings)
    rows = studio.compose_rows([[name, weight] for name, weight in weights.items()])
    values = [prompt, settings.negative_prompt, rows, False, settings.method, params.get("tau", 5),
              params.get("alpha", 1.5), params.get("beta", 0.5), params.get("ordering", "frequency"),
              params.get("schedule", "nonuniform"), settings.steps, settings.guidance_scale, settings.width,
              settings.height, settings.seed, settings.scheduler, settings.lora_scale,
              json.dumps(extra) if extra else ""]  # fmt: skip
    return values, note


def _rows(table) -> list[list]:
    """A Dataframe's value as rows, whichever form Gradio hands it in."""
    if hasattr(table, "values"):
        return table.values.tolist()
    return (table or {}).get("data", []) if isinstance(table, dict) else list(table or [])


def _real(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a number, got {value!r}") from None


def _whole(name: str, value) -> int:
    """An integer setting; a float must be whole (3.0, never 3.5)."""
    number = _real(name, value)
    if not number.is_integer():
        raise StudioError(f"{name} must be a whole number, got {value!r}")
    return int(number)


WARM_NOTE = ("every method's seconds are its run alone, warm: a method's first run on this model pays a warm-up, "
             "so Compare runs it a few untimed steps first (the warm-up column)")  # fmt: skip


def problem(error: Exception) -> str:
    """A mistake as the page shows it beside its control: escaped (names and prompts come
    from files and PNGs), marked so it reads as a warning, not a result."""
    return f"**⚠ {md(user_text(error))}**"


def operator_default(host: str, share: bool) -> bool:
    """Operator actions (switching the model, loading server folders, removing or editing
    a library LoRA) are on only when the studio is reachable from this machine alone:
    served on loopback, no share link."""
    return host in LOOPBACK_HOSTS and not share


def build(studio: Studio) -> gr.Blocks:
    """The studio page bound to ``studio``."""
    with gr.Blocks(title="compose studio") as page:
        ui = SimpleNamespace(history=gr.State([]), view=gr.State(None), picked=gr.State(None))
        gr.Markdown(INTRO)
        with gr.Tabs() as ui.tabs:
            with gr.Tab("Compose", id="compose"):
                _compose_tab(studio, ui)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(ui)
            with gr.Tab("X/Y plot", id="xy"):
                _xy_tab(studio, ui)
            with gr.Tab("PNG Info", id="png-info"):
                _png_info_tab(ui)
            with gr.Tab("Library", id="library"):
                _library_tab(studio, ui)
            with gr.Tab("Gallery", id="gallery"):
                ui.gallery = gr.Gallery(label="made in this session (newest first)", columns=5, elem_id="gallery")
                with gr.Row():
                    ui.gallery_send = gr.Button("Send to Compose", elem_id="gallery-send")
                    ui.gallery_message = gr.Markdown("")
        ui.inputs = [ui.prompt, ui.negative, ui.loras, ui.insert, ui.method, ui.tau, ui.alpha, ui.beta, ui.ordering,
                     ui.schedule, ui.steps, ui.guidance, ui.width, ui.height, ui.seed, ui.scheduler, ui.lora_scale,
                     ui.extra]  # fmt: skip
        _wire_generation(studio, ui)
        _wire_compare(studio, ui)
        _wire_xy(studio, ui)
        _wire_settings(studio, ui)
        _wire_regions(studio, ui)
        _wire_library(studio, ui)
        page.load(_on_load(studio), None, [ui.loras, ui.cards, ui.library, ui.name, ui.category, ui.triggers,
                                           ui.region_lora, ui.regions_info, ui.xy_x_kind, ui.xy_y_kind])  # fmt: skip
        register_api(studio)
    return page


# -- layout ------------------------------------------------------------------------------


def _model_row(studio: Studio, ui: SimpleNamespace) -> None:
    operator = bool(studio.operator)
    with gr.Row():
        ui.model = gr.Textbox(studio.model, scale=4, interactive=operator,
                              label="base model (demo-world, diffusers folder, .safetensors, hub id or tiny:sd1)"
                              + ("" if operator else "; switching it is an operator action, off here"))  # fmt: skip
        ui.load_model = gr.Button("Load model", scale=1, interactive=operator)
    ui.model_message = gr.Markdown("", elem_id="model-message")


def _compose_tab(studio: Studio, ui: SimpleNamespace) -> None:
    scale = studio.composer.pipeline.vae_scale_factor
    size = studio.composer.pipeline.unet.config.sample_size * scale
    largest = max(size, min(1536, studio.limits.side_limit(size)))
    demo = studio.model == DEMO_WORLD
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ui.prompt = gr.Textbox(EXAMPLE_PROMPT if demo else "", label="prompt", lines=2, elem_id="prompt",
                                   max_length=studio.limits.prompt_characters())  # fmt: skip
            with gr.Row(equal_height=True):  # the status line under the buttons, beside the method: no empty band
                ui.method = gr.Dropdown(list(METHODS), value=EXAMPLE_METHOD if demo else "merge", label="method",
                                        scale=2, elem_id="method")  # fmt: skip
                with gr.Column(scale=3, min_width=320):
                    with gr.Row():
                        ui.generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=2)
                        ui.stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                    ui.message = gr.Markdown("", elem_id="compose-message", height=MESSAGE_HEIGHT)
            with gr.Row(equal_height=True):  # the picked card's controls beside the search: the table stays in view
                ui.search = gr.Textbox(show_label=False, placeholder="search LoRAs: name, category or trigger",
                                       elem_id="lora-search", scale=2)  # fmt: skip
                ui.card_on = gr.Checkbox(False, label="on", info="pick a card first", scale=1, interactive=False,
                                         elem_id="card-on")  # fmt: skip
                ui.card_weight = gr.Slider(0, 2, 1, step=0.05, label="weight of the card you picked", scale=2,
                                           interactive=False, elem_id="card-weight")  # fmt: skip
                ui.card_picked = gr.State("")
            defaults = _defaults(studio)
            ui.cards = gr.Gallery(studio.cards(weights=defaults), columns=4, height=220, allow_preview=False,
                                  label="LoRAs (green ● on, grey ○ off): click a card to pick it, then switch it on",
                                  object_fit="contain", elem_id="cards")  # fmt: skip
            ui.loras = gr.Dataframe(studio.compose_rows(defaults=defaults), headers=LORA_COLUMNS,
                                    datatype=["str", "number"], static_columns=[0], interactive=True,
                                    label="weights (0 = off; row order = Switch order)", elem_id="loras")  # fmt: skip
            with gr.Accordion("prompt and sampling", open=False):
                ui.negative = gr.Textbox(label="negative prompt", max_length=studio.limits.prompt_characters())
                ui.insert = gr.Checkbox(label="insert the LoRAs' trigger words into the prompt")
                with gr.Row():
                    ui.steps = gr.Slider(1, 100, 25, step=1, label="steps", elem_id="steps")
                    ui.guidance = gr.Slider(1, 20, 7.5, step=0.5, label="guidance")
                with gr.Row():
                    ui.width = gr.Slider(min(64, size), largest, size, step=scale, label="width", elem_id="width")
                    ui.height = gr.Slider(min(64, size), largest, size, step=scale, label="height")
                ui.cost = gr.Markdown("", elem_id="cost")
                with gr.Row():
                    ui.seed = gr.Number(EXAMPLE_SEED if demo else 0, precision=0, label="seed")
                    ui.randomize = gr.Checkbox(label="random seed")
                    ui.scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="scheduler")
                ui.lora_scale = gr.Slider(0, 2, 0.8, step=0.05, elem_id="lora-scale",
                                          label="LoRA scale: every weight × this (0.8: Multi-LoRA's)")  # fmt: skip
            with gr.Accordion("method parameters", open=False):
                ui.tau = gr.Slider(1, 20, 5, step=1, label="switch: steps per LoRA (tau)")
                ui.alpha = gr.Slider(0, 3, 1.5, step=0.05, label="K-LoRA alpha")
                ui.beta = gr.Slider(0, 2, 0.5, step=0.05, label="K-LoRA beta")
                ui.ordering = gr.Radio(["frequency", "category"], value="frequency", label="CMLoRA ordering")
                ui.schedule = gr.Radio(["nonuniform", "uniform", "off"], value="nonuniform",
                                       label="CMLoRA cache schedule")  # fmt: skip
                ui.extra = gr.Textbox(label="other method parameters (JSON; a PNG fills them, a new method clears "
                                      "them)", placeholder='{"hold": 0.3}', elem_id="method-extra")  # fmt: skip
            _regions(studio, ui)
        with gr.Column(scale=2):
            ui.image = gr.Image(label="result", type="filepath", interactive=False, height=460, elem_id="result",
                                buttons=["fullscreen"])  # fmt: skip
            ui.info = gr.Markdown("", elem_id="result-info")
            ui.regions_view = gr.Image(label="where each LoRA acted", type="filepath", interactive=False,
                                       height=260, visible=False, elem_id="result-regions")  # fmt: skip
            ui.regions_legend = gr.HTML("", visible=False, elem_id="result-regions-legend")
            ui.download = gr.File(label="the PNG, with its settings", interactive=False, height=60)
            ui.reuse = gr.Button("Reuse this seed")
            ui.settings_png = gr.File(label="Load settings from PNG (compose or AUTOMATIC1111)", file_types=[".png"],
                                      type="filepath", height=120, elem_id="settings-png")  # fmt: skip


def _regions(studio: Studio, ui: SimpleNamespace) -> None:
    with gr.Accordion("regions (regional method)", open=False):
        names = list(studio.composer.loras)
        with gr.Row():
            ui.region_lora = gr.Dropdown(names, value=names[0] if names else None, label="LoRA", elem_id="region-lora")
            ui.region_box = gr.Textbox(label="box x0, y0, x1, y1 (fractions), or paint on the last result below")
        ui.region_prompt = gr.Textbox(label="this region's own prompt (optional): it reads this instead of the prompt",
                                      elem_id="region-prompt")  # fmt: skip
        ui.region_paint = gr.ImageEditor(label="paint where this LoRA draws (over your last result)", type="numpy",
                                         image_mode="RGBA", sources=(), canvas_size=(256, 256), layers=False,
                                         brush=gr.Brush(colors=["#ff3b30"], default_size=24),
                                         elem_id="region-paint")  # fmt: skip
        with gr.Row():
            ui.set_region = gr.Button("Set region", elem_id="set-region")
            ui.clear_regions = gr.Button("Clear regions")
        ui.regions_info = gr.Markdown("", elem_id="regions-info")


def _compare_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.compare = gr.Button("Compare every method (the Compose tab's settings)", variant="primary",
                               elem_id="compare", scale=3)  # fmt: skip
        ui.compare_stop = gr.Button("Stop", variant="stop", scale=1)
    ui.compare_message = gr.Markdown("", elem_id="compare-message")
    ui.comparison = gr.Gallery(label="same prompt and seed, every method (each appears as it finishes)",
                               columns=COMPARE_TILES, height="auto", object_fit="contain",
                               elem_id="comparison")  # fmt: skip
    ui.compare_table = gr.Dataframe(headers=COMPARE_COLUMNS, interactive=False, label="click a column to sort",
                                    elem_id="compare-table")  # fmt: skip


def _xy_tab(studio: Studio, ui: SimpleNamespace) -> None:
    kinds = xy_kinds(studio)
    with gr.Row():
        ui.xy_x_kind = gr.Dropdown(kinds, value="method", label="X axis", elem_id="xy-x-kind")
        ui.xy_x_values = gr.Textbox("merge, composite, switch", elem_id="xy-x-values",
                                    label="X values (a, b, c · 1-5 · 0-1 (+0.25) · 0-1 [5])")  # fmt: skip
    with gr.Row():
        ui.xy_y_kind = gr.Dropdown(["none", *kinds], value="seed", label="Y axis", elem_id="xy-y-kind")
        ui.xy_y_values = gr.Textbox("1, 2", label="Y values", elem_id="xy-y-values")
    with gr.Row():
        ui.xy_make = gr.Button("Make the X/Y plot (the Compose tab's other settings)", variant="primary",
                               elem_id="xy-make", scale=3)  # fmt: skip
        ui.xy_stop = gr.Button("Stop", variant="stop", elem_id="xy-stop", scale=1)
    ui.xy_message = gr.Markdown("", elem_id="xy-message")
    ui.xy_grid = gr.Image(label="X/Y plot", type="filepath", interactive=False, elem_id="xy-grid",
                          buttons=["fullscreen"])  # fmt: skip
    ui.xy_download = gr.File(label="the plot, with its settings", interactive=False, height=60)


def xy_kinds(studio: Studio) -> list[str]:
    """The X/Y axes this library allows: the settings, and each LoRA's weight."""
    return ["method", "seed", "steps", "guidance", "lora_scale", *(f"weight:{n}" for n in studio.composer.loras)]


def _png_info_tab(ui: SimpleNamespace) -> None:
    ui.png_info_file = gr.File(label="a PNG (made here, by compose, or by AUTOMATIC1111)", file_types=[".png"],
                               type="filepath", height=120, elem_id="png-info-file")  # fmt: skip
    ui.png_info = gr.Markdown("", elem_id="png-info")
    ui.png_send = gr.Button("Send to Compose", elem_id="png-send")


def _library_tab(studio: Studio, ui: SimpleNamespace) -> None:
    operator = bool(studio.operator)
    _model_row(studio, ui)
    ui.library = gr.Dataframe(studio.library_rows(), headers=LIBRARY_COLUMNS, interactive=False,
                              label=f"LoRAs (folder {studio.library})")  # fmt: skip
    ui.library_message = gr.Markdown("", elem_id="library-message")
    ui.upload = gr.File(label="add a LoRA (.safetensors)", type="filepath", height=120, elem_id="upload")
    with gr.Row():
        ui.folder = gr.Textbox(label="or load a folder of LoRAs" + ("" if operator else " (operator only)"), scale=4,
                               interactive=operator)  # fmt: skip
        ui.add_folder = gr.Button("Load folder", scale=1, interactive=operator)
    names = list(studio.composer.loras)
    category, triggers = _editor_values(studio, names[0] if names else None)
    with gr.Row():
        ui.name = gr.Dropdown(names, value=names[0] if names else None, label="LoRA", elem_id="edit-name")
        ui.category = gr.Dropdown(["", *CATEGORIES], value=category, label="category", elem_id="edit-category")
        ui.triggers = gr.Textbox(triggers, label="trigger words (comma-separated)", elem_id="edit-triggers")
    with gr.Row():
        only = "" if operator else " (operator only)"  # they change the library for every session
        ui.save_edit = gr.Button(f"Save category and triggers{only}", interactive=operator, elem_id="save-edit")
        ui.clear_edit = gr.Checkbox(label="erase both (confirms a blank save)", interactive=operator,
                                    elem_id="edit-clear")  # fmt: skip
        ui.profile = gr.Button("Frequency profile")
        ui.remove = gr.Button(f"Remove{only}", variant="stop", interactive=operator)


# -- events ------------------------------------------------------------------------------


def _on_load(studio: Studio):
    def load(request: gr.Request):
        names = list(studio.composer.loras)
        kinds = xy_kinds(studio)
        first = names[0] if names else None
        return (gr.update(value=studio.compose_rows(defaults=_defaults(studio))),
                studio.cards(weights=_defaults(studio)), studio.library_rows(),
                gr.update(choices=names, value=first), *_editor_values(studio, first), gr.update(choices=names),
                studio.describe_regions(session_of(request)), gr.update(choices=kinds),
                gr.update(choices=["none", *kinds]))  # fmt: skip

    return load


def _defaults(studio: Studio) -> dict[str, float]:
    return dict.fromkeys(EXAMPLE_SET, 1.0) if studio.model == DEMO_WORLD else {}


def _editor_values(studio: Studio, name: str | None) -> tuple[str, str]:
    """The Library editor's category and triggers for LoRA ``name``: its current values,
    so that Save changes what the user changed and nothing else."""
    lora = studio.composer.loras.get(name) if name else None
    return ("", "") if lora is None else (lora.category or "", ", ".join(lora.triggers))


def _wire_generation(studio: Studio, ui: SimpleNamespace) -> None:
    outputs = [ui.image, ui.download, ui.info, ui.regions_view, ui.regions_legend, ui.seed, ui.gallery, ui.history,
               ui.view, ui.region_paint, ui.message]  # fmt: skip

    def on_generate(request: gr.Request, *values, progress=gr.Progress()):
        *rest, randomize_seed, made = values
        try:
            settings = _settings(*rest)
            if randomize_seed:
                settings.seed = random.randrange(2**32)
            first = not studio.warmed_up(settings.method)
            path, record, seconds = studio.generate(settings, lambda f, d: progress(f, desc=d), session_of(request))
        except GenerationCancelled as stopped:
            return [gr.update()] * (len(outputs) - 1) + [f"stopped ({stopped}): no image was made"]
        except USER_ERRORS as error:
            return [gr.update()] * (len(outputs) - 1) + [problem(error)]
        warm_up = f" (the first {settings.method} run here: includes its warm-up)" if first else ""
        text = " · ".join([f"**{settings.method}**, seed {settings.seed}, {seconds:.2f} s{warm_up}",
                           *score_parts(studio.judge(path, record))])  # fmt: skip
        view = for_display(path)
        made = [(str(view), f"{settings.method} · seed {settings.seed}", str(path)), *made]
        canvas = {"background": str(view), "layers": [], "composite": None}
        regions = studio.regions_of(path)
        shown = gr.update(value=str(regions[0]) if regions else None, visible=regions is not None)
        caption = gr.update(value=regions[1] if regions else "", visible=regions is not None)
        return (str(view), str(path), text, shown, caption, settings.seed, _gallery(made), made, str(view), canvas,
                "")  # fmt: skip

    # the last run's warning goes as the new run is asked for, not when it ends
    ui.generate.click(lambda: "", None, ui.message, api_visibility="private", queue=False).then(
        on_generate, [*ui.inputs, ui.randomize, ui.history], outputs, api_visibility="private",
        concurrency_id="model", show_progress_on=ui.image)  # fmt: skip

    def on_stop(request: gr.Request):
        # the run writes its own last word to the same message: a "stopping" that arrived
        # after it once left the page saying "stopping", so Stop speaks only if the run is slow
        return studio.stop(session_of(request), wait=STOP_WAIT) or gr.update()

    ui.stop.click(on_stop, None, ui.message, api_visibility="private", queue=False)
    ui.compare_stop.click(on_stop, None, ui.compare_message, api_visibility="private", queue=False)
    ui.xy_stop.click(on_stop, None, ui.xy_message, api_visibility="private", queue=False)

    def on_cost(width, height, steps) -> str:
        note = studio.cost_note(width, height, steps)
        return f"**⚠ {note}**" if note else ""

    for slider in (ui.width, ui.height, ui.steps):
        slider.change(on_cost, [ui.width, ui.height, ui.steps], ui.cost, api_visibility="private", queue=False)
    ui.method.input(lambda: "", None, ui.extra, api_visibility="private", queue=False)  # they were another method's
    _wire_cards(studio, ui)


def score_parts(judged: dict) -> list[str]:
    """What the page says of an image's scores (:meth:`Studio.judge`), each with its scale;
    nothing for a score that cannot be computed. A negative cosine is shown, not hidden
    behind CLIPScore's 0."""
    parts = []
    presence = judged["presence"]
    if presence is not None:
        missing = ", ".join(md(name) for name in presence["missing"])
        parts.append(f"concepts present {presence['concepts_present']:.0%}" + (f" (missing {missing})" if missing
                                                                                else ""))  # fmt: skip
    if judged["cosine"] is not None:
        text = md(judged["text"])
        if judged["cosine"] >= 0:
            parts.append(f"CLIPScore {judged['clipscore']:.1f} of 100 (100·max(cos, 0) against “{text}”)")
        else:
            parts.append(f"CLIPScore 0 of 100: cos {judged['cosine']:.2f} < 0, CLIP finds no match with “{text}”")
    return parts


def _wire_cards(studio: Studio, ui: SimpleNamespace) -> None:
    """A click on a card picks it for the *on* box and the weight slider; only they change
    the table. The cards, the box and the slider follow the table, whatever changed it (a
    card's controls, an edit in the table, Send to Compose, a page load)."""
    private = {"api_visibility": "private"}

    def on_card(table, query, event: gr.SelectData):
        names = studio.card_names(query or "")
        if not 0 <= event.index < len(names):
            return problem(StudioError("that card is no longer in the library")), gr.update(), gr.update(), ""
        name = names[event.index]
        weight = _weights(table).get(name, 0.0)
        state = f"on, weight {weight:g}" if weight else "off: tick *on* (or move the slider) to use it"
        return (f"picked {md(name)}: {state}", *_card_controls(name, weight), name)

    def on_set(table, name, weight):
        if not name:
            return gr.update(), "pick a card first: the box and the slider act on it"
        rows = studio.compose_rows(_rows(table))
        for row in rows:
            if row[0] == name:
                row[1] = float(weight)
                return rows, f"{md(name)} {f'on, weight {row[1]:g}' if row[1] else 'off'}"
        return gr.update(), problem(StudioError(f"no LoRA named {name!r} in the library"))

    def on_table(table, name, query):
        weights = _weights(table)
        picked = studio.card_names(query or "")
        cards = gr.Gallery(studio.cards(query or "", weights),
                           selected_index=picked.index(name) if name in picked else None)  # fmt: skip
        controls = _card_controls(name, weights.get(name, 0.0)) if name else (gr.update(), gr.update())
        return cards, *controls

    ui.cards.select(on_card, [ui.loras, ui.search], [ui.message, ui.card_on, ui.card_weight, ui.card_picked],
                    **private)  # fmt: skip
    ui.card_on.input(lambda table, name, on: on_set(table, name, 1.0 if on else 0.0), [ui.loras, ui.card_picked,
                     ui.card_on], [ui.loras, ui.message], **private)  # fmt: skip
    ui.card_weight.input(on_set, [ui.loras, ui.card_picked, ui.card_weight], [ui.loras, ui.message], **private)
    for changed in (ui.loras.change, ui.search.change):
        changed(on_table, [ui.loras, ui.card_picked, ui.search], [ui.cards, ui.card_on, ui.card_weight], **private)


def _weights(table) -> dict[str, float]:
    """The Compose table as ``{name: weight}`` (a weight that is not a number is 0: off)."""
    return {str(row[0]): as_weight(row[1]) for row in _rows(table) if len(row) >= 2 and row[0]}


def _card_controls(name: str, weight: float) -> tuple[dict, dict]:
    """The *on* box and the weight slider showing LoRA ``name`` at ``weight`` (0: off)."""
    return (
        gr.update(value=bool(weight), label="on", info=name, interactive=True),
        gr.update(value=weight, label=f"weight of {name}", interactive=True),
    )


def _gallery(made: list[tuple]) -> list[tuple[str, str]]:
    return [(view, caption) for view, caption, *_ in made]


def _wire_compare(studio: Studio, ui: SimpleNamespace) -> None:
    outputs = [ui.comparison, ui.compare_table, ui.compare_message, ui.gallery, ui.history]

    def on_compare(request: gr.Request, *values, progress=gr.Progress()):
        *rest, made = values
        items, rows = [], []
        try:
            settings = _settings(*rest)
            for r in studio.compare(settings, lambda f, d: progress(f, desc=d), session_of(request)):
                view = str(for_display(r["path"]))
                score = None if r["clipscore"] is None else round(r["clipscore"], 1)
                cosine = None if r["cosine"] is None else round(r["cosine"], 3)
                found = None if r["presence"] is None else f"{r['presence']['concepts_present']:.0%}"
                items.append((view, f"{r['method']} · {r['seconds']:.2f} s"))
                warm_up = None if r["warm_up"] is None else round(r["warm_up"], 2)
                rows.append([r["method"], round(r["seconds"], 2), warm_up, score, cosine, found])
                made = [(view, f"{r['method']} · seed {settings.seed}", str(r["path"])), *made]
                text = f"{len(items)} of {len(METHODS)} methods done"
                yield items, rows, text, _gallery(made), made
        except GenerationCancelled:
            yield items, rows, f"stopped after {len(items)} of {len(METHODS)} methods", _gallery(made), made
            return
        except USER_ERRORS as error:
            yield items, rows, problem(error), _gallery(made), made
            return
        note = "" if studio.scorer else "; CLIPScore needs a CLIP model: start the studio with `--clip`"
        yield items, rows, f"every method done; {WARM_NOTE}{note}", _gallery(made), made

    ui.compare.click(lambda: "", None, ui.compare_message, api_visibility="private", queue=False).then(
        on_compare, [*ui.inputs, ui.history], outputs, api_visibility="private", concurrency_id="model",
        show_progress_on=ui.comparison)  # fmt: skip


def _wire_xy(studio: Studio, ui: SimpleNamespace) -> None:
    outputs = [ui.xy_grid, ui.xy_download, ui.xy_message]

    def on_xy(request: gr.Request, x_kind, x_values, y_kind, y_values, *values, progress=gr.Progress()):
        def step(done: int, total: int) -> None:
            progress(done / total, desc=f"cell {min(done + 1, total)} of {total}" if done < total else
                     f"{total} of {total} cells, drawing the grid")  # fmt: skip

        try:
            path, seconds = studio.xy_plot(_settings(*values), x_kind, x_values, None if y_kind == "none" else y_kind,
                                           y_values, step, session_of(request))  # fmt: skip
        except GenerationCancelled as stopped:
            return gr.update(), gr.update(), f"{stopped}: no plot was made"
        except USER_ERRORS as error:
            return gr.update(), gr.update(), problem(error)
        return str(path), str(path), f"{seconds:.1f} s in all"

    ui.xy_make.click(lambda: "", None, ui.xy_message, api_visibility="private", queue=False).then(
        on_xy, [ui.xy_x_kind, ui.xy_x_values, ui.xy_y_kind, ui.xy_y_values, *ui.inputs], outputs,
        api_visibility="private", concurrency_id="model", show_progress_on=ui.xy_grid)  # fmt: skip


def _wire_settings(studio: Studio, ui: SimpleNamespace) -> None:
    targets = [*ui.inputs, ui.randomize, ui.message, ui.tabs]

    def restore(png, message):
        """The Compose inputs of a PNG's settings (its seed, so no random seed), and the
        message; or no change and why not."""
        try:
            values, note = compose_values(studio, studio.settings_from_png(png))
        except USER_ERRORS as error:
            return [gr.update()] * (len(targets) - 2) + [problem(error), gr.update()]
        return [*values, False, f"{message}{note}", gr.Tabs(selected="compose")]

    def on_settings(png):
        if not png:
            return [gr.update()] * len(targets)
        return restore(png, f"settings of {md(Path(png).name)} loaded")

    ui.settings_png.upload(on_settings, ui.settings_png, targets, api_visibility="private")

    def on_png_info(png):
        if not png:
            return ""
        try:
            return studio.png_info_text(png)
        except USER_ERRORS as error:
            return problem(error)

    ui.png_info_file.upload(on_png_info, ui.png_info_file, ui.png_info, api_visibility="private")

    def send(png, where):
        if not png:
            return [gr.update()] * len(targets)
        return restore(png, f"settings from the {where} loaded")

    ui.png_send.click(lambda png: send(png, "PNG Info tab"), ui.png_info_file, targets, api_visibility="private")

    def on_pick(made, event: gr.SelectData):
        return made[event.index][2] if made and event.index < len(made) else None

    ui.gallery.select(on_pick, ui.history, ui.picked, api_visibility="private")
    ui.gallery_send.click(lambda png: send(png, "gallery"), ui.picked, targets, api_visibility="private")

    def on_reuse(png):
        if not png:
            return gr.update(), "no image yet"
        try:
            return studio.settings_from_png(png).seed, ""
        except USER_ERRORS as error:
            return gr.update(), problem(error)

    ui.reuse.click(on_reuse, ui.download, [ui.seed, ui.message], api_visibility="private")


def _wire_regions(studio: Studio, ui: SimpleNamespace) -> None:
    def on_set(request: gr.Request, lora_name, box, painting, prompt):
        try:
            return studio.set_region(lora_name, box or "", painting, session_of(request), prompt or "")
        except USER_ERRORS as error:
            return f"{studio.describe_regions(session_of(request))}\n\n{problem(error)}"

    ui.set_region.click(on_set, [ui.region_lora, ui.region_box, ui.region_paint, ui.region_prompt], ui.regions_info,
                        api_visibility="private")  # fmt: skip

    def on_clear(request: gr.Request):
        return studio.clear_regions(session_of(request))

    ui.clear_regions.click(on_clear, None, ui.regions_info, api_visibility="private")

    def on_switch(view):
        """A fresh canvas for the next LoRA: its strokes must not be another LoRA's."""
        return {"background": view, "layers": [], "composite": None}, "", ""

    ui.region_lora.change(on_switch, ui.view, [ui.region_paint, ui.region_box, ui.region_prompt],
                          api_visibility="private")  # fmt: skip


def _wire_library(studio: Studio, ui: SimpleNamespace) -> None:
    outputs = [ui.library_message, ui.library, ui.loras, ui.cards, ui.name, ui.region_lora]

    def guarded(action, message=None):
        message = message or ui.library_message

        def handler(*args):
            *values, previous = args
            try:
                text = action(*values)
            except USER_ERRORS as error:
                return [problem(error)] + [gr.update()] * (len(outputs) - 1)
            names = list(studio.composer.loras)
            return (text, studio.library_rows(), studio.compose_rows(_rows(previous)),
                    studio.cards(weights=_weights(previous)), gr.update(choices=names),
                    gr.update(choices=names))  # fmt: skip

        return handler

    def upload(*args):
        """An upload, then an empty upload box: a refused file must not look added."""
        return [*guarded(studio.add_upload)(*args), None]

    private = {"api_visibility": "private"}
    ui.name.change(lambda name: _editor_values(studio, name), ui.name, [ui.category, ui.triggers], **private)
    ui.upload.upload(upload, [ui.upload, ui.loras], [*outputs, ui.upload], **private)
    ui.add_folder.click(guarded(studio.load_folder), [ui.folder, ui.loras], outputs, **private)
    ui.save_edit.click(guarded(studio.edit), [ui.name, ui.category, ui.triggers, ui.clear_edit, ui.loras], outputs,
                       **private)  # fmt: skip
    ui.remove.click(guarded(studio.remove), [ui.name, ui.loras], outputs, **private)
    ui.profile.click(guarded(studio.frequency), [ui.name, ui.loras], outputs, concurrency_id="model", **private)
    model_outputs = [ui.model_message, *outputs[1:]]
    ui.load_model.click(guarded(studio.load_model), [ui.model, ui.loras], model_outputs, concurrency_id="model",
                        **private)  # fmt: skip


def _table_and_tags(settings: Settings) -> tuple[str, dict[str, float], str]:
    """The prompt, table weights (in order) and a status note for settings from a PNG. The
    table holds a plain number per LoRA; a LoRA with block weights or a weight schedule goes
    into the prompt as an A1111 tag ``<lora:NAME:WEIGHT:lbw=BLOCKS>`` (which keeps them).
    Tags follow the table in a run's LoRA order (Switch's), so from the first such LoRA on,
    every LoRA becomes a tag, put before the prompt's own tags: the order is kept."""
    tags, weights, moved = [], {}, []
    for name, weight, *blocks in settings.loras or []:
        block = blocks[0] if blocks else None
        if tags or block is not None or not isinstance(weight, int | float):
            tags.append(f"<lora:{name}:{weight}" + (f":lbw={block}>" if block is not None else ">"))
            moved.append(name)
        else:
            weights[name] = weight
    note = f" ({', '.join(md(n) for n in moved)} kept as prompt tags, in their order)" if moved else ""
    return " ".join([*tags, settings.prompt]), weights, note


def make_studio(model: str, library: Path, clip: str | None = None, allow_pickle: bool = False,
                max_upload_mb: float = 1024, operator: bool | None = None,
                limits: Limits | None = None) -> Studio:  # fmt: skip
    """A studio on ``model``; on a bundled model such as the demo world its LoRAs and its
    offline CLIP if it brings one (unless ``clip`` names another), on a tiny random model
    three random LoRAs to compose.
    ``operator``: see :class:`~compose.app.studio.Studio` (``None``: :func:`launch` decides)."""
    scorer = None
    if clip is None and model in BUNDLES and bundle_clip(model).is_dir():
        clip = str(bundle_clip(model))
    if clip:
        from ..evaluation.clipscore import CLIPScorer

        scorer = CLIPScorer.from_folder(clip) if Path(clip).is_dir() else CLIPScorer.from_open_clip(*clip.split(":"))
    studio = Studio(model, library, Composer.load, allow_pickle, max_upload_mb, scorer, operator, limits)
    if model.startswith("tiny:") and not studio.composer.loras:
        extras = Path(tempfile.mkdtemp(prefix="compose-random-loras-"))
        write_random_loras(studio.composer.pipeline, extras)
        studio.load_trusted_folder(extras)
    return studio


def make_previews(studio: Studio, stream: TextIO | None = None) -> int:
    """Make the LoRA previews not made yet, saying so with a bar on ``stream`` (stderr):
    the first start makes one picture per LoRA (the demo world's eleven took 95 s on two
    cores), and was silent meanwhile. Returns how many were made."""
    missing = studio.missing_previews()
    if not missing:
        return 0
    stream = stream or sys.stderr
    print(f"compose studio: making the previews of {len(missing)} LoRA(s), once: they are kept in {studio.previews}",
          file=stream, flush=True)  # fmt: skip
    with tqdm(total=len(missing), desc="LoRA previews", unit="LoRA", file=stream, mininterval=0) as bar:
        for name in missing:
            bar.set_postfix_str(name)
            studio.preview(name)
            bar.update()
    return len(missing)


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True) -> gr.Blocks:  # fmt: skip
    """Serve the studio; ``block=False`` returns at once (tests, notebooks). Operator
    actions follow :func:`operator_default` unless the studio was told."""
    if studio.operator is None:
        studio.operator = operator_default(host, share)
    make_previews(studio)
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                max_file_size=studio.max_upload_bytes, allowed_paths=[str(studio.outputs), str(studio.previews)],
                js=CTRL_ENTER, css=CSS)  # fmt: skip
    if block:
        public = f", public link {page.share_url}" if page.share_url else " (--share makes a public link)"
        print(f"compose studio: open {page.local_url}{public}; Ctrl+C stops it", flush=True)
        try:
            studio.model_thread.serve()  # the model computes on this thread (see model_thread.py)
        except KeyboardInterrupt:
            print("compose studio: stopped", flush=True)
        finally:
            page.close()
    return page
