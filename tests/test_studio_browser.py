"""The studio in a real browser (Playwright + Debian's Chromium), as an artist meets it.

``COMPOSE_SCREENSHOTS=DIR`` keeps the walk's screenshots in ``DIR`` (the README's come
from ``docs/make_screenshots.py`` on the demo world)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client
from PIL import Image

from compose.methods import METHODS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium); CI installs it")
LONG = 120_000


@contextmanager
def browser(size=(1440, 900), pages: int = 1):
    """``pages`` headless Chromium pages, each its own browser context (its own session)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        tabs = [chromium.new_context(viewport={"width": size[0], "height": size[1]}).new_page() for _ in range(pages)]
        yield tabs if pages > 1 else tabs[0]
        chromium.close()


def shot(tab, folder: Path, name: str) -> Path:
    keep = os.environ.get("COMPOSE_SCREENSHOTS")
    path = (Path(keep) if keep else folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(path))
    return path


ROWS = ".virtual-row"
CELL = "[role=gridcell]"


def weights_of(tab) -> dict[str, str]:
    """The Compose table as the page shows it: LoRA name -> weight text."""
    rows = tab.locator(f"#loras {ROWS}")
    out = {}
    for i in range(rows.count()):
        name, weight = rows.nth(i).locator(CELL).all_inner_texts()[:2]
        out[name.strip()] = weight.strip()
    return out


def set_slider(tab, elem_id: str, value: float) -> None:
    """Type ``value`` into a slider's number box, and wait until the page's state holds it
    (its range input follows the state), so that the next click sends it; typed again
    where a busy page's update wrote over it."""
    field = tab.locator(f"#{elem_id} input[type=number]")
    for _ in range(5):
        field.fill(str(value))
        field.press("Enter")
        try:
            tab.wait_for_function(
                "([id, v]) => Number(document.querySelector(`#${id} input[type=range]`).value) === v",
                arg=[elem_id, value], timeout=10_000)  # fmt: skip
            return
        except Exception:  # noqa: BLE001 - the page wrote over it: type it again
            continue
    shown = tab.locator(f"#{elem_id} input[type=range]").input_value()
    raise AssertionError(f"the slider {elem_id} holds {shown}, not {value}")


def edit_cell(tab, cell, text: str) -> None:
    """Type ``text`` into a table ``cell`` and wait until the table shows it (on a busy
    page a double click may not open the editor at once, so it is tried again)."""
    for _ in range(5):
        cell.dblclick()
        editor = cell.locator("input, textarea").first
        try:
            editor.wait_for(timeout=5_000)
            editor.fill(text)  # replaces what the editor opened with, unlike typing after Control+A
            editor.press("Enter")
            tab.wait_for_function(
                "([cell, text]) => cell.innerText.split('\\n')[0].trim() === text"
                " && !cell.querySelector('input, textarea')",
                arg=[cell.element_handle(), text], timeout=10_000)  # fmt: skip
            return
        except Exception:  # noqa: BLE001 - the editor did not take it: try again
            continue
    raise AssertionError(f"the cell shows {cell.inner_text().splitlines()[0]!r}, not {text!r}")


def open_tab(tab, name: str) -> None:
    tab.get_by_role("tab", name=name).click()


def switch_on(tab, index: int, name: str) -> None:
    """Pick card ``index`` (LoRA ``name``), then tick its *on* box."""
    tab.locator("#cards .thumbnail-item").nth(index).click()
    tab.locator("#compose-message").get_by_text(f"picked {name}").wait_for(timeout=LONG)
    tab.locator("#card-on input").check()
    tab.locator("#compose-message").get_by_text(f"{name} on, weight 1").wait_for(timeout=LONG)


def generate(tab) -> None:
    """Click Generate and wait for a new image; a failure says what the page said."""
    before = tab.locator("#result img").get_attribute("src") if tab.locator("#result img").count() else None
    tab.locator("#generate").click()
    try:
        tab.wait_for_function(
            "(before) => { const img = document.querySelector('#result img'); return img && img.src !== before"
            " && img.complete && img.naturalWidth > 0; }", arg=before, timeout=LONG)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - re-raised with the page's own words
        said = tab.locator("#compose-message").inner_text().strip()
        raise AssertionError(f"no new image; the page says {said!r}") from error


def test_an_artists_first_ten_minutes(served, tmp_path, lora_files):
    """Open, pick two LoRAs from cards, generate, compare (streaming), a 2×3 X/Y plot, a
    LoRA of another base model refused, settings from a PNG, Stop: every step works and
    says what it did, and every step leaves a screenshot."""
    studio = served[0]
    with browser() as tab:
        tab.goto(served[1])
        tab.locator("#cards img").first.wait_for(timeout=LONG)
        shot(tab, tmp_path, "1-open")
        assert tab.locator("#generate").bounding_box()["y"] < 450, "Generate is on the first screen"

        cards = tab.locator("#cards .thumbnail-item")
        for i, name in enumerate(list(studio.composer.loras)[:2]):
            switch_on(tab, i, name)
        picked = [name for name, weight in weights_of(tab).items() if float(weight) == 1]
        assert picked == list(studio.composer.loras)[:2]
        assert studio.composer.loras[picked[0]].category in cards.nth(0).inner_text(), "a card names its category"
        weight = tab.locator("#card-weight input[type=number]")
        weight.fill("0.6")
        weight.press("Enter")
        tab.locator("#compose-message").get_by_text(f"{picked[1]} on, weight 0.6").wait_for(timeout=LONG)
        assert float(weights_of(tab)[picked[1]]) == 0.6, "the slider sets the last picked card's weight"
        weight.fill("1")
        weight.press("Enter")
        tab.locator("#compose-message").get_by_text(f"{picked[1]} on, weight 1").wait_for(timeout=LONG)
        shot(tab, tmp_path, "2-picked")

        generate(tab)
        shown = tab.locator("#result img").evaluate("img => [img.naturalWidth, img.getBoundingClientRect().width]")
        assert shown[0] >= 256 and shown[1] >= 256, "a small model's image is enlarged for the eye"
        assert "seed 0" in tab.locator("#result-info").inner_text()
        shot(tab, tmp_path, "3-generated")

        open_tab(tab, "Compare")
        tab.locator("#compare").click()
        tab.locator("#compare-message").get_by_text(f"1 of {len(METHODS)} methods done").wait_for(timeout=LONG)
        assert tab.locator("#comparison img").count() >= 1, "the first method shows before the others finish"
        tab.locator("#compare-message").get_by_text("every method done").wait_for(timeout=5 * LONG)
        assert tab.locator(f"#compare-table {ROWS}").count() == len(METHODS)
        tab.evaluate("window.scrollTo(0, 0)")
        bottoms = tab.locator("#comparison .thumbnail-item").evaluate_all(
            "tiles => tiles.map(tile => tile.getBoundingClientRect().bottom)")  # fmt: skip
        assert len(bottoms) == len(METHODS) and max(bottoms) <= 900, "every method's tile on one 1440×900 screen"
        shot(tab, tmp_path, "4-compare")

        open_tab(tab, "X/Y plot")
        tab.locator("#xy-x-values textarea, #xy-x-values input").first.fill("merge, composite")
        tab.locator("#xy-y-values textarea, #xy-y-values input").first.fill("1, 2, 3")
        tab.locator("#xy-make").click()
        tab.locator("#xy-grid img").wait_for(timeout=3 * LONG)
        assert "s in all" in tab.locator("#xy-message").inner_text()
        shot(tab, tmp_path, "5-xy")

        open_tab(tab, "Library")
        other = tmp_path / "for-sdxl.safetensors"
        shutil.copyfile(lora_files["sdxl", 0]["peft"], other)
        tab.locator("#upload input[type=file]").set_input_files(str(other))
        tab.locator("#library-message").get_by_text("⚠").wait_for(timeout=LONG)
        assert "for-sdxl" in tab.locator("#library-message").inner_text()
        tab.locator("#upload").get_by_text("for-sdxl").wait_for(state="detached", timeout=LONG)  # not left as if added
        shot(tab, tmp_path, "6-refused")

        open_tab(tab, "Compose")
        made = sorted(studio.outputs.glob("0*-merge-0.png"))[0]
        tab.locator("#settings-png input[type=file]").set_input_files(str(made))
        tab.locator("#compose-message").get_by_text("loaded").wait_for(timeout=LONG)
        shot(tab, tmp_path, "7-settings")

        tab.get_by_text("prompt and sampling").click()
        set_slider(tab, "steps", 100)
        set_slider(tab, "width", 128)
        tab.locator("#generate").click()
        # Gradio shows its pending bar before the run starts; Stop acts on a run's steps
        tab.locator("#result .progress-level-inner").get_by_text("step").first.wait_for(timeout=LONG)
        tab.locator("#stop").click()
        message = tab.locator("#compose-message")
        try:
            message.get_by_text("stopped").wait_for(timeout=LONG)
        except Exception as error:  # noqa: BLE001 - re-raised with what the page and the studio said
            said = message.inner_text().strip()
            bar = tab.locator("#result .progress-level-inner").all_inner_texts()
            runs = f"runs {list(studio.cancels)}, reached {studio.reached}, locked {studio.lock.locked()}"
            raise AssertionError(f"Stop did not end the run: the page says {said!r}, bar {bar!r}, {runs}") from error
        shot(tab, tmp_path, "8-stopped")
        assert tab.locator("#generate").is_enabled()


def test_a_mistake_is_a_message_beside_its_control_and_the_page_stays_usable(served, tmp_path):
    with browser() as tab:
        tab.goto(served[1])
        tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        cell = tab.locator(f"#loras {ROWS}").first.locator(CELL).nth(1)
        edit_cell(tab, cell, "abc")
        tab.locator("#generate").click()
        message = tab.locator("#compose-message")
        message.get_by_text("must be a number, got 'abc'").wait_for(timeout=LONG)
        assert tab.locator(".error").count() == 0 or not tab.locator("#loras .error").count(), "no red badge"
        edit_cell(tab, cell, "1")
        plain = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(plain)
        tab.locator("#settings-png input[type=file]").set_input_files(str(plain))
        message.get_by_text("no 'compose' metadata").wait_for(timeout=LONG)
        generate(tab)  # the page still works after both mistakes
        assert not message.inner_text().strip()


def test_ctrl_enter_generates(served):
    with browser() as tab:
        tab.goto(served[1])
        tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)  # the page's handlers are bound
        tab.locator("#prompt textarea").fill("a zq creature")
        tab.locator("#prompt textarea").press("Control+Enter")
        tab.locator("#result img").wait_for(timeout=LONG)


def test_two_sessions_keep_their_own_gallery_regions_and_stop(served):
    studio = served[0]
    with browser(pages=2) as (ann, bob):
        for tab in (ann, bob):
            tab.goto(served[1])
            tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        generate(ann)
        open_tab(bob, "Gallery")
        assert bob.locator("#gallery img").count() == 0
        open_tab(ann, "Gallery")
        ann.locator("#gallery img").first.wait_for(timeout=LONG)
        open_tab(ann, "Compose")
        ann.get_by_text("regions (regional method)").click()
        ann.locator("#region-paint").scroll_into_view_if_needed()
        box = ann.get_by_label("box x0, y0, x1, y1 (fractions), or paint on the last result below")
        box.fill("0, 0, 0.5, 1")
        ann.locator("#region-prompt textarea").fill("a tall creature")
        ann.locator("#set-region").click()
        ann.locator("#regions-info").get_by_text("box [0.0, 0.0, 0.5, 1.0] · prompt “a tall creature”").wait_for(
            timeout=LONG)  # fmt: skip
        bob.reload()
        bob.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        bob.get_by_text("regions (regional method)").click()
        bob.locator("#regions-info").get_by_text("no regions").wait_for(timeout=LONG)  # after the page's load event
        ann.reload()  # a reload is a new session: its regions start empty too
        ann.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        ann.get_by_text("regions (regional method)").click()
        ann.locator("#regions-info").get_by_text("no regions").wait_for(timeout=LONG)
    assert all(set(r) <= set(studio.composer.loras) for r in studio.regions.values())


def test_the_library_is_read_again_on_every_page_load(served, lora_files, tmp_path):
    studio = served[0]
    source = tmp_path / "latecomer.safetensors"
    shutil.copyfile(lora_files["sd1", 2]["peft"], source)
    with browser() as tab:
        tab.goto(served[1])
        tab.locator(f"#loras {CELL}").first.wait_for(timeout=LONG)
        from gradio_client import handle_file

        Client(served[1], verbose=False).predict(file=handle_file(source), api_name="/add_lora")
        tab.reload()
        tab.locator("#loras").get_by_text("latecomer").wait_for(timeout=LONG)
        assert tab.locator("#cards").get_by_text("latecomer").count() == 1
    studio.remove("latecomer")
