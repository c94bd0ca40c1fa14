"""Regenerate the README's studio screenshots, and time the studio: ``python docs/make_screenshots.py``.

Serves the studio on loopback with the embedded demo world and drives it in headless
Chromium (Debian's, through Playwright) at 1440×900, as an artist would: generates the
example composition (its LoRAs are on when the page opens), compares every method,
makes a 2×3 X/Y plot (method × seed); on the Compose tab it first picks the card of the
example's first LoRA for the weight slider, so the picture shows a picked card among the others.
Saves docs/studio-compose.png, studio-compare.png and studio-xy.png, and prints each wall
time measured in the browser: click to image, Compare (every method), the X/Y plot. Run
it on an idle machine for numbers to report.
``--compose-only`` stops after the first screenshot (a look at the layout in a minute).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from compose.app.ui import launch, make_studio
from compose.demo_world.evaluate import EXAMPLE_SET

DOCS = Path(__file__).parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
LONG = 600_000


def main(compose_only: bool = False) -> None:
    studio = make_studio("demo-world", Path(tempfile.mkdtemp(prefix="compose-library-")))
    page = launch(studio, port=7870, block=False)
    done = threading.Event()
    card = list(studio.composer.loras).index(EXAMPLE_SET[0])
    walker = threading.Thread(target=walk, args=(page.local_url, done, card, compose_only))
    walker.start()
    studio.model_thread.serve(done)  # as `compose studio` serves: the model computes on this thread
    walker.join()
    page.close()


def walk(url: str, done: threading.Event, card: int, compose_only: bool = False) -> None:
    """The artist's clicks, timed; ``card`` is the index of the card to pick; ``done`` is
    set at the end, whatever happens."""
    try:
        _walk(url, card, compose_only)
    finally:
        done.set()


def _walk(url: str, card: int, compose_only: bool) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=ARGS)
        tab = browser.new_page(viewport={"width": 1440, "height": 900})
        tab.goto(url)
        tab.locator("#cards img").first.wait_for(timeout=LONG)
        tab.locator("#cards .thumbnail-item").nth(card).dispatch_event("click")  # picked in place (no scroll)
        tab.locator("#compose-message").get_by_text("picked").wait_for(timeout=LONG)
        start = time.perf_counter()
        tab.locator("#generate").click()
        tab.locator("#result img").wait_for(timeout=LONG)
        print(f"click to image: {time.perf_counter() - start:.2f} s")
        tab.wait_for_timeout(500)
        tab.screenshot(path=str(DOCS / "studio-compose.png"))
        if compose_only:
            browser.close()
            return
        tab.get_by_role("tab", name="Compare").click()
        start = time.perf_counter()
        tab.locator("#compare").click()
        tab.locator("#compare-message").get_by_text("every method done").wait_for(timeout=LONG)
        print(f"compare, every method: {time.perf_counter() - start:.2f} s")
        tab.wait_for_timeout(500)
        tab.screenshot(path=str(DOCS / "studio-compare.png"))
        tab.get_by_role("tab", name="X/Y plot").click()
        tab.locator("#xy-x-values textarea, #xy-x-values input").first.fill("merge, composite")
        tab.locator("#xy-y-values textarea, #xy-y-values input").first.fill("1, 2, 3")
        start = time.perf_counter()
        tab.locator("#xy-make").click()
        tab.locator("#xy-grid img").wait_for(timeout=LONG)
        print(f"X/Y plot, 2 x 3: {time.perf_counter() - start:.2f} s")
        tab.wait_for_timeout(500)
        tab.screenshot(path=str(DOCS / "studio-xy.png"))
        browser.close()


if __name__ == "__main__":
    main("--compose-only" in sys.argv[1:])
