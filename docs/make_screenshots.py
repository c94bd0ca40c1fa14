"""Regenerate the README's studio screenshots: ``python docs/make_screenshots.py``.

Serves the studio on loopback with the embedded demo world, drives it in headless
Chromium (Debian's, through Playwright): loads the settings of an earlier PNG, generates,
compares every method and opens the library, saving docs/studio-*.png; prints the time
from the Generate click to the image.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from compose.app.studio import Settings
from compose.app.ui import launch, make_studio
from compose.demo_world.evaluate import EXAMPLE_PROMPT, EXAMPLE_SET

DOCS = Path(__file__).parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    studio = make_studio("demo-world", Path(tempfile.mkdtemp(prefix="compose-library-")))
    page = launch(studio, port=7870, block=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1100})
        tab.goto(page.local_url)
        weights = [(name, 1.0) for name in EXAMPLE_SET]
        earlier, _, _ = studio.generate(Settings(EXAMPLE_PROMPT, loras=weights, method="composite", seed=7))
        tab.locator("#settings-png input[type=file]").set_input_files(str(earlier))
        tab.get_by_text("settings of").wait_for(timeout=60000)
        start = time.perf_counter()
        tab.locator("#generate").click()
        tab.locator("#result img").wait_for(timeout=120000)
        print(f"click to image: {time.perf_counter() - start:.2f} s")
        tab.screenshot(path=str(DOCS / "studio-compose.png"), full_page=True)
        tab.get_by_role("tab", name="Compare").click()
        tab.get_by_role("button", name="Compare every method").click()
        tab.get_by_text("CLIPScore").first.wait_for(timeout=120000)
        tab.wait_for_timeout(1000)
        tab.screenshot(path=str(DOCS / "studio-compare.png"), full_page=True)
        tab.get_by_role("tab", name="Library").click()
        tab.wait_for_timeout(500)
        tab.screenshot(path=str(DOCS / "studio-library.png"), full_page=True)
        browser.close()
    page.close()


if __name__ == "__main__":
    main()
