"""The studio never silently loses or misleads (issue #36's trust-breakers, and its
progress and feedback), in a real browser (Playwright + Debian's Chromium) on a real
server, and at the level of the :class:`~compose.app.studio.Studio` object.

The browser tests serve the model on its own thread, as ``compose studio`` does (the
``serving`` fixture), so what reaches the page from a run (its "step k of n") crosses the
same thread boundary as in use."""

from __future__ import annotations

import dataclasses
import io
import threading

import pytest
from conftest import run
from PIL import Image, PngImagePlugin
from test_studio_browser import (
    CELL,
    CHROMIUM,
    LONG,
    ROWS,
    browser,
    edit_cell,
    generate,
    open_tab,
    set_slider,
    shot,
    weights_of,
)

from compose import SamplingConfig
from compose.app.studio import Settings, StudioError, base_family
from compose.app.ui import _settings, compose_values, make_previews, score_parts
from compose.loading import preview_path
from compose.methods import METHODS

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium); CI installs it")
PNG_ORDER = ["random-style", "random-background", "random-character"]
"""Not the library's order (sorted by file name), so a table in library order runs another Switch."""
PARAMS = {"switch": {"tau": 1}, "wswitch": {"tau": 1, "hold": 0.3}, "patch": {"temperature": 0.1},
          "bands": {"levels": 1}, "cmlora": {"switch_at": 0.4, "ordering": "category"}, "routed": {"probe": 0.3},
          "klora": {"alpha": 1.2}, "regional": {"regions": {"random-style": [0, 0, 0.5, 1]}}}  # fmt: skip
"""A parameter off its default per method, where it has one, so that every setting must travel."""


@pytest.fixture
def serving(served):
    """The studio's model calls run on a thread of their own for the test, as under
    ``compose studio`` (:mod:`compose.app.model_thread`)."""
    stop = threading.Event()
    thread = threading.Thread(target=served[0].model_thread.serve, args=(stop,), daemon=True)
    thread.start()
    yield served
    stop.set()
    thread.join(10)


def opened(tab, url: str) -> None:
    """The studio at ``url`` in ``tab``, once its weights table has rows."""
    tab.goto(url)
    tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)


def pixels(path) -> list:
    with Image.open(path) as image:
        return list(image.convert("RGB").getdata())


def newest(studio, pattern: str = "0*.png"):
    return max((p for p in studio.outputs.glob(pattern) if ".view" not in p.name), key=lambda p: p.stat().st_mtime)


# -- 1. Library → Save keeps a LoRA's values --------------------------------------------


def test_a_blank_save_over_a_loras_values_is_refused_unless_confirmed(served):
    studio = served[0]
    lora = studio.composer.loras["random-style"]
    before = (lora.category, list(lora.triggers))
    with pytest.raises(StudioError, match="not saved: a blank category and triggers would erase random-style's"):
        studio.edit("random-style", "", "")
    assert (lora.category, lora.triggers) == before
    try:
        studio.edit("random-style", "", "", clear=True)
        assert (lora.category, lora.triggers) == (None, [])
        studio.edit("random-style", "", "")  # nothing left to lose: a blank save is a no-op, not refused
    finally:
        studio.edit("random-style", before[0], ", ".join(before[1]))


@needs_chromium
def test_the_library_editor_shows_the_loras_values_and_save_keeps_them(served, tmp_path):
    studio = served[0]
    loras = studio.composer.loras
    before = {name: (lora.category, list(lora.triggers)) for name, lora in loras.items()}
    first, other = list(loras)[0], "random-style"
    with browser() as tab:
        tab.goto(served[1])
        tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        open_tab(tab, "Library")
        category, triggers = tab.locator("#edit-category input"), tab.locator("#edit-triggers textarea")
        assert tab.locator("#edit-name input").input_value() == first, "the editor opens on a LoRA"
        assert category.input_value() == loras[first].category, "and shows its category"
        assert triggers.input_value() == ", ".join(loras[first].triggers), "and its triggers"
        tab.locator("#save-edit").click()
        tab.locator("#library-message").get_by_text(f"{first}: category {loras[first].category}").wait_for(
            timeout=LONG)  # fmt: skip
        assert {n: (lora.category, lora.triggers) for n, lora in loras.items()} == before, "Save kept the values"

        tab.locator("#edit-name input").click()
        tab.get_by_role("option", name=other).click()
        tab.wait_for_function("(want) => document.querySelector('#edit-triggers textarea').value === want",
                              arg=", ".join(loras[other].triggers), timeout=LONG)  # fmt: skip
        assert category.input_value() == loras[other].category
        triggers.fill("")
        category.click()
        tab.get_by_role("option", name="", exact=True).click()
        tab.locator("#save-edit").click()
        tab.locator("#library-message").get_by_text("not saved").wait_for(timeout=LONG)
        shot(tab, tmp_path, "blank-save-refused")
    assert {n: (lora.category, lora.triggers) for n, lora in loras.items()} == before, "a blank save erased nothing"


# -- 2. Send to Compose reproduces a PNG -------------------------------------------------


def _made_by_the_engine(studio, method: str, path) -> Settings:
    """A PNG as ``compose generate`` makes it (the composer, no studio), its LoRAs in
    :data:`PNG_ORDER`; returns the settings asked for."""
    from compose.metadata import save_png

    loras = [(name, weight) for name, weight in zip(PNG_ORDER, (1.0, 0.6, 0.9), strict=True)]
    if method in ("klora", "regional", "routed"):
        loras = loras[:1] + loras[2:]  # K-LoRA: one content and one style; regions: two
    settings = Settings("a zq creature, zq style, zq place", "blurry", loras, method=method,
                        method_params=PARAMS.get(method, {}), steps=3, seed=7, lora_scale=1.0)  # fmt: skip
    image = studio.composer.generate(settings.prompt, settings.loras, method, negative_prompt=settings.negative_prompt,
                                     seed=settings.seed, lora_scale=settings.lora_scale,
                                     method_params=settings.method_params,
                                     sampling=SamplingConfig(steps=settings.steps))[0]  # fmt: skip
    save_png(image, path)
    return settings


@pytest.mark.parametrize("method", list(METHODS))
def test_a_pngs_settings_make_its_image_again_through_the_studio_and_the_compose_tab(served, tmp_path, method):
    """settings_from_png → generate gives the PNG's pixels, and so do the Compose tab's
    values for those settings (the table in the PNG's LoRA order, the method's parameters,
    the LoRA scale): what Send to Compose then Generate runs."""
    studio = served[0]
    png = tmp_path / f"{method}.png"
    asked = _made_by_the_engine(studio, method, png)
    restored = studio.settings_from_png(png)
    assert restored.loras == asked.loras and restored.lora_scale == 1.0
    again, _, _ = studio.generate(restored)
    assert pixels(again) == pixels(png), "the studio reproduces the PNG"
    values, _ = compose_values(studio, restored)
    assert [row[0] for row in values[2] if row[1]] == [name for name, *_ in restored.loras], "table in PNG order"
    via_page, _, _ = studio.generate(_settings(*values))
    assert pixels(via_page) == pixels(png), "the Compose tab's values reproduce the PNG"


def test_a_switch_in_library_order_is_another_image(served, tmp_path):
    """The order matters on this model, so the tests of order can fail."""
    studio = served[0]
    png = tmp_path / "switch.png"
    settings = _made_by_the_engine(studio, "switch", png)
    in_library_order = sorted(settings.loras, key=lambda lora: list(studio.composer.loras).index(lora[0]))
    other, _, _ = studio.generate(dataclasses.replace(settings, loras=in_library_order))
    assert pixels(other) != pixels(png)


@needs_chromium
def test_send_to_compose_reproduces_a_cli_switch_png(serving, tmp_path, capsys):
    """A PNG from the CLI (Switch, three LoRAs out of library order, LoRA scale 1, τ 1):
    PNG Info → Send to Compose → Generate makes the same pixels; the table shows the PNG's
    order, and the slider of the picked card shows the table's weight."""
    studio = serving[0]
    files = [f"{studio.composer.loras[name].path}:{weight}" for name, weight in zip(PNG_ORDER, (1, 0.6, 0.9),
                                                                                     strict=True)]  # fmt: skip
    png = tmp_path / "cli-switch.png"
    args = ["generate", "--model", "tiny:sd1", "--method", "switch", "--tau", "1", "--steps", "4", "--seed", "5",
            "--lora-scale", "1", "--prompt", "a zq creature", "--out", png]  # fmt: skip
    code, _, err = run(capsys, *args, *[arg for file in files for arg in ("--lora", file)])
    assert code == 0, err
    with browser() as tab:
        opened(tab, serving[1])
        tab.locator("#cards .thumbnail-item").nth(1).click()  # random-character, picked (weight 0: off)
        tab.locator("#compose-message").get_by_text("picked random-character").wait_for(timeout=LONG)
        open_tab(tab, "PNG Info")
        tab.locator("#png-info-file input[type=file]").set_input_files(str(png))
        tab.locator("#png-info").get_by_text("switch").first.wait_for(timeout=LONG)
        tab.locator("#png-send").click()
        tab.locator("#compose-message").get_by_text("settings from the PNG Info tab loaded").wait_for(timeout=LONG)
        tab.wait_for_function("() => document.querySelector('#card-weight input[type=number]').value === '0.9'",
                              timeout=LONG)  # fmt: skip
        table = [(name, weight) for name, weight in weights_of(tab).items() if float(weight)]  # other tests' LoRAs: off
        assert table == [("random-style", "1"), ("random-background", "0.6"), ("random-character", "0.9")], "order"
        generate(tab)
        shot(tab, tmp_path, "sent-and-generated")
    made = newest(studio, "0*-switch-5.png")
    assert pixels(made) == pixels(png), "the studio's image is the CLI's, pixel for pixel"


# -- 3. A card click picks; its state shows; the slider follows the table ----------------


def card_states(tab) -> list[tuple[str, str]]:
    """Per card: its caption and the picture it shows (``...-on.png`` / ``...-off.png``)."""
    cards = tab.locator("#cards .thumbnail-item")
    return [(cards.nth(i).inner_text().strip(), cards.nth(i).locator("img").get_attribute("src") or "")
            for i in range(cards.count())]  # fmt: skip


def wait_caption(tab, index: int, text: str) -> None:
    tab.locator("#cards .thumbnail-item").nth(index).get_by_text(text).wait_for(timeout=LONG)


def test_the_weights_that_act_come_first_in_switch_order(served):
    """The table's rows that are on lead, in their order (Switch's), so they are in view;
    a LoRA switched on joins their end, one switched off leaves them."""
    studio = served[0]
    a, b, c = list(studio.composer.loras)[:3]
    rows = studio.compose_rows([[c, 1.0], [a, 0.0], [b, 0.5]])
    assert [name for name, weight in rows if weight] == [c, b] and [name for name, _ in rows[:2]] == [c, b]
    rows[[name for name, _ in rows].index(a)][1] = 1.0
    rows = studio.compose_rows(rows)
    assert [name for name, _ in rows[:3]] == [c, b, a], "switched on last, so last in the Switch order"
    rows[0][1] = 0.0
    assert [name for name, _ in studio.compose_rows(rows)[:2]] == [b, a]


@needs_chromium
def test_a_card_click_picks_without_toggling_and_its_state_shows(served, tmp_path):
    studio = served[0]
    names = list(studio.composer.loras)
    with browser() as tab:
        tab.goto(served[1])
        tab.locator("#cards img").first.wait_for(timeout=LONG)
        assert all(caption.startswith("○ off") and src.endswith("-off.png") for caption, src in card_states(tab))
        cards = tab.locator("#cards .thumbnail-item")
        cards.nth(0).click()
        tab.locator("#compose-message").get_by_text(f"picked {names[0]}: off").wait_for(timeout=LONG)
        assert float(weights_of(tab)[names[0]]) == 0, "picking a card does not switch it on"
        tab.locator("#card-on input").check()
        wait_caption(tab, 0, "● on 1")
        assert float(weights_of(tab)[names[0]]) == 1 and card_states(tab)[0][1].endswith("-on.png")
        cards.nth(0).click()
        tab.locator("#compose-message").get_by_text(f"picked {names[0]}: on, weight 1").wait_for(timeout=LONG)
        assert float(weights_of(tab)[names[0]]) == 1, "picking it again does not switch it off"
        set_slider(tab, "card-weight", 0.6)
        wait_caption(tab, 0, "● on 0.6")
        shot(tab, tmp_path, "card-on-and-picked")
        marks = [caption[0] for caption, _ in card_states(tab)]
        assert marks == ["●"] + ["○"] * (len(marks) - 1) and len(marks) >= 3, "on and off at a glance"
        _edit_weight(tab, names[0], "0.3")
        tab.wait_for_function("() => document.querySelector('#card-weight input[type=number]').value === '0.3'",
                              timeout=LONG)  # fmt: skip
        wait_caption(tab, 0, "● on 0.3")
        tab.locator("#card-on input").uncheck()
        wait_caption(tab, 0, "○ off")
        assert float(weights_of(tab)[names[0]]) == 0


def _edit_weight(tab, name: str, weight: str) -> None:
    """Type ``weight`` into the table's cell for LoRA ``name``."""
    rows = tab.locator(f"#loras {ROWS}")
    for i in range(rows.count()):
        if rows.nth(i).locator(CELL).first.inner_text().strip() == name:
            edit_cell(tab, rows.nth(i).locator(CELL).nth(1), weight)
            return
    raise AssertionError(f"no row {name}")


# -- 4. Scores that mean something -------------------------------------------------------


def test_a_score_states_its_scale_and_a_negative_cosine_is_shown(served):
    studio = served[0]
    path, record, _ = studio.generate(Settings("a zq creature", loras=[("random-style", 1.0)], steps=2))
    judged = studio.judge(path, record)
    assert judged["clipscore"] == pytest.approx(100 * max(judged["cosine"], 0), abs=1e-4)
    assert judged["clipscore"] == pytest.approx(studio.clipscore(path, record), abs=1e-4)
    assert judged["text"] == "zq style" and judged["presence"] is None  # random LoRAs: no detectors
    below = {**judged, "cosine": -0.24, "clipscore": 0.0}
    assert score_parts(below) == ["CLIPScore 0 of 100: cos -0.24 < 0, CLIP finds no match with “zq style”"]
    above = {**judged, "cosine": 0.512, "clipscore": 51.2, "presence": {"concepts_present": 0.75,
                                                                         "missing": ["vosh"]}}  # fmt: skip
    assert score_parts(above) == ["concepts present 75% (missing vosh)",
                                  "CLIPScore 51.2 of 100 (100·max(cos, 0) against “zq style”)"]  # fmt: skip
    assert studio.judge(path, {**record, "loras": []})["cosine"] is None, "no LoRA, no score"


# -- Progress and feedback ---------------------------------------------------------------


@needs_chromium
def test_a_run_shows_its_step_and_a_new_run_clears_the_last_warning(serving, tmp_path):
    with browser() as tab:
        opened(tab, serving[1])
        tab.get_by_text("method parameters").click()
        tab.locator("#method-extra textarea").fill("{not json")
        tab.locator("#generate").click()
        message = tab.locator("#compose-message")
        message.get_by_text("not JSON").wait_for(timeout=LONG)
        tab.locator("#method-extra textarea").fill("")
        tab.get_by_text("prompt and sampling").click()
        set_slider(tab, "steps", 100)
        set_slider(tab, "width", 192)  # a run long enough to stop
        tab.locator("#generate").click()
        tab.locator("#result .progress-level-inner").get_by_text("step").first.wait_for(timeout=LONG)
        assert "of 100" in tab.locator("#result .progress-level-inner").first.inner_text()
        assert not message.inner_text().strip(), "the last run's warning went when this one started"
        shot(tab, tmp_path, "step-k-of-n")
        tab.locator("#stop").click()
        message.get_by_text("stopped").wait_for(timeout=LONG)


@needs_chromium
def test_the_xy_plot_shows_its_cell_and_stops(serving, tmp_path):
    with browser() as tab:
        opened(tab, serving[1])
        tab.get_by_text("prompt and sampling").click()
        set_slider(tab, "steps", 40)
        open_tab(tab, "X/Y plot")
        tab.locator("#xy-x-values textarea, #xy-x-values input").first.fill("merge, composite, switch")
        tab.locator("#xy-y-values textarea, #xy-y-values input").first.fill("1, 2, 3")
        tab.locator("#xy-make").click()
        tab.locator("#xy-grid .progress-level-inner").get_by_text("of 9").first.wait_for(timeout=LONG)
        assert "cell" in tab.locator("#xy-grid .progress-level-inner").first.inner_text()
        shot(tab, tmp_path, "xy-cell-k-of-n")
        tab.locator("#xy-stop").click()
        tab.locator("#xy-message").get_by_text("no plot was made").wait_for(timeout=LONG)
        said = tab.locator("#xy-message").inner_text()
        assert "stopped in cell" in said and "of 9, cancelled after step" in said, "Stop acts within the cell"


def test_the_first_start_says_it_makes_the_previews_with_a_bar(served):
    studio = served[0]
    (studio.previews / f"{studio.composer.loras['random-style'].sha256}.png").unlink()
    stream = io.StringIO()
    assert make_previews(studio, stream) == 1 and make_previews(studio, io.StringIO()) == 0
    text = stream.getvalue()
    assert "making the previews of 1 LoRA(s), once" in text and "1/1" in text and "random-style" in text


def test_a_lora_that_brings_its_picture_shows_it_on_its_card_and_a_broken_one_is_drawn_instead(served):
    """A1111 and ComfyUI look for ``name.preview.png`` beside ``name.safetensors``: the
    studio shows that picture, with its PNG text, rather than drawing one; a file there
    that is no image costs nothing but the drawing."""
    studio = served[0]
    lora = studio.composer.loras["random-style"]
    cached, brought = studio.previews / f"{lora.sha256}.png", preview_path(lora.path)
    card = Image.new("RGB", (64, 64), (200, 30, 90))
    text = PngImagePlugin.PngInfo()
    text.add_text("parameters", "a card, Steps: 25, Seed: 3")
    try:
        card.save(brought, pnginfo=text)
        cached.unlink()
        assert make_previews(studio, io.StringIO()) == 1
        with Image.open(cached) as shown:
            assert shown.info["parameters"] == "a card, Steps: 25, Seed: 3"
            assert shown.convert("RGB").tobytes() == card.tobytes()
        brought.write_bytes(b"not a picture")
        cached.unlink()
        assert make_previews(studio, io.StringIO()) == 1
        with Image.open(cached) as drawn:
            assert drawn.convert("RGB").tobytes() != card.tobytes() and "random-style" in drawn.info["parameters"]
    finally:
        brought.unlink(missing_ok=True)


def test_the_library_names_a_base_family_from_the_metadata_when_the_shapes_know_none(served):
    lora = served[0].composer.loras["random-style"]
    assert lora.family.startswith("unknown") and base_family(lora) == lora.family  # nothing declared
    declared = dataclasses.replace(lora, metadata={"ss_base_model_version": "sd_v1"})
    assert base_family(declared) == "sd_v1 (its metadata)"
    spec = dataclasses.replace(lora, metadata={"modelspec.architecture": "stable-diffusion-v1/lora",
                                               "ss_base_model_version": "sd_v1"})  # fmt: skip
    assert base_family(spec) == "stable-diffusion-v1 (its metadata)"
    assert base_family(dataclasses.replace(spec, family="sd1")) == "sd1", "shapes decide where they can"


def test_a_model_call_sees_its_callers_context():
    """Gradio finds where a ``gr.Progress`` reports through context variables; a model call
    runs on the serving thread, so it must carry its caller's, or "step k of n" never shows."""
    import contextvars

    from compose.app.model_thread import ModelThread

    event = contextvars.ContextVar("event", default=None)
    model, stop = ModelThread(), threading.Event()
    thread = threading.Thread(target=model.serve, args=(stop,), daemon=True)
    thread.start()
    while model.serving is None:
        stop.wait(0.01)
    try:
        event.set("the caller's event")
        assert model.run(lambda: (threading.get_ident(), event.get())) == (thread.ident, "the caller's event")
    finally:
        stop.set()
        thread.join(10)


# -- Stop, Compare's seconds, the layout (issue #36's remaining items) --------------------


def test_stop_ends_a_long_run_within_two_steps(served):
    """Through the real server: Stop answers with the step the run had reached, and the
    run ends within two steps of it (it once went on for seconds)."""
    import re

    from gradio_client import Client
    from test_hostile import _wait_locked
    from test_studio import settings_kwargs

    studio, url, _ = served
    client = Client(url, verbose=False)
    job = client.submit(**settings_kwargs(steps=400, size=64), api_name="/generate")
    _wait_locked(studio)
    while not any(re.search(r"step ([3-9]|\d\d+) of", v) for v in list(studio.reached.values())):
        threading.Event().wait(0.05)  # a few steps in: the run is well under way
    answer = client.predict(api_name="/stop")
    at_stop = int(re.search(r"stopping after the current step \(step (\d+) of 400\)", answer).group(1))
    with pytest.raises(Exception, match="cancelled after step") as ended:
        job.result(timeout=120)
    at_end = int(re.search(r"cancelled after step (\d+) of 400", str(ended.value)).group(1))
    assert at_stop <= at_end <= at_stop + 2, (at_stop, at_end)


def test_a_stop_that_waits_leaves_the_last_word_to_the_run(served):
    """The page's Stop waits for the run to end and then says nothing, so the run's own
    "stopped" is the tab's last message whichever answer arrives last (a late "stopping"
    once overwrote it); a run still going when the wait ends gets "stopping" as before."""
    from compose.loop import GenerationCancelled

    studio = served[0]
    ended = {}

    def run() -> None:
        try:
            studio.generate(Settings("a zq creature", steps=400, width=64, height=64), session="waits")
        except GenerationCancelled as error:
            ended["said"] = str(error)

    worker = threading.Thread(target=run)
    worker.start()
    while "waits" not in studio.reached:
        threading.Event().wait(0.02)
    assert studio.stop("waits", wait=60) == ""
    assert "waits" not in studio.cancels
    worker.join(60)
    assert "cancelled after step" in ended["said"]
    assert studio.stop("waits", wait=60) == "nothing of yours is running"


def test_compare_times_every_method_warm(served):
    """Every method's seconds are its run alone: a method not run yet on this model is
    warmed up first (untimed, reported apart); a second Compare warms up none."""
    studio = served[0]
    settings = Settings("a zq creature", loras=[("random-style", 1.0)], steps=3, width=64, height=64)
    cold = {m for m in METHODS if not studio.warmed_up(m)}
    first = list(studio.compare(settings))
    assert {r["method"] for r in first if r["warm_up"] is not None} == cold
    assert all(r["warm_up"] is None or r["warm_up"] > 0 for r in first)
    assert all(r["seconds"] > 0 for r in first) and all(studio.warmed_up(m) for m in METHODS)
    assert all(r["warm_up"] is None for r in studio.compare(settings)), "warm methods are not warmed again"


@needs_chromium
def test_the_status_line_does_not_move_the_cards_and_the_weights_are_in_view(served):
    top = "(sel) => document.querySelector(sel).getBoundingClientRect().top + window.scrollY"
    with browser() as tab:
        tab.goto(served[1])
        tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        tab.locator("#cards img").first.wait_for(timeout=LONG)
        before = tab.evaluate(top, "#cards")
        rows = tab.locator(f"#loras {ROWS}")
        last = rows.nth(min(rows.count(), 3) - 1).bounding_box()
        assert last["y"] + last["height"] <= 900, "three rows of the weights table are on the first screen at 1440×900"
        assert tab.locator("#compose-message").bounding_box()["y"] < tab.locator("#cards").bounding_box()["y"]
        tab.locator("#cards .thumbnail-item").first.click()
        tab.locator("#compose-message").get_by_text("picked").wait_for(timeout=LONG)
        assert tab.evaluate(top, "#cards") == before, "the status line appeared and the cards stayed put"
