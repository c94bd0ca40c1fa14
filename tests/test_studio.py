"""The studio, served for real on loopback and driven through gradio_client and a browser."""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from compose.app.studio import Settings, StudioError
from compose.methods import METHODS

WEIGHTS = {"headers": ["LoRA", "weight"], "data": [["random-character", 1.0], ["random-style", 0.8]]}


def settings_args(method="composite", seed=3, steps=3, prompt="a zq creature", weights=WEIGHTS, size=64):
    return [prompt, "blurry", weights, False, method, 2, 1.5, 0.5, "category", "nonuniform", steps, 7.5, size, size,
            seed, "dpm++2m"]  # fmt: skip


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False)


def record_of(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["compose"])


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_each_method(client, method):
    path, download, info, seed, gallery = client.predict(*settings_args(method), False, api_name="/generate")
    record = record_of(download)
    assert record["method"]["name"] == method and record["seed"] == 3 and seed == 3
    assert [lora["name"] for lora in record["loras"]] == ["random-character", "random-style"]
    assert f"**{method}**" in info and " s" in info
    assert gallery[0]["caption"] == f"{method} · seed 3"


def test_compare_renders_every_method(client):
    items, table, gallery = client.predict(*settings_args(seed=5), api_name="/compare")
    assert [item["caption"].split(" · ")[0] for item in items] == list(METHODS)
    assert all("CLIPScore" in item["caption"] for item in items)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [row[0].strip("| ") for row in rows] == list(METHODS)
    assert all(float(row[2]) >= 0 and row[3] == "n/a |" for row in rows)  # random LoRAs: no demo-world detectors
    assert {record_of(item["image"])["seed"] for item in items} == {5}


def test_load_settings_from_png(client):
    _, download, *_ = client.predict(*settings_args("switch", seed=11), False, api_name="/generate")
    values = client.predict(handle_file(download), api_name="/load_settings")
    prompt, negative, loras, _, method, tau, *_, steps, guidance, width, height, seed, scheduler, status = values
    assert (prompt, negative, method, tau, steps, seed, scheduler) == (
        "a zq creature", "blurry", "switch", 2, 3, 11, "dpm++2m")  # fmt: skip
    assert {row[0]: row[1] for row in loras["data"]}["random-style"] == 0.8
    assert "loaded" in status


def test_bad_upload_is_refused_and_changes_nothing(client, served, tmp_path):
    studio = served[0]
    before = studio.library_rows()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(Exception, match="not a valid safetensors file"):
        client.predict(handle_file(broken), WEIGHTS, api_name="/add_lora")
    pickle_file = tmp_path / "old.ckpt"
    pickle_file.write_bytes(b"\x80\x04N.")
    with pytest.raises(Exception, match="only .safetensors"):
        client.predict(handle_file(pickle_file), WEIGHTS, api_name="/add_lora")
    assert studio.library_rows() == before
    assert not (studio.library / "broken.safetensors").exists()


def test_upload_edit_remove(client, served, lora_files):
    studio = served[0]
    source = served[2] / "knight.safetensors"
    shutil.copyfile(lora_files["sd1", 0]["peft"], source)
    status, rows, loras, *_ = client.predict(handle_file(source), WEIGHTS, api_name="/add_lora")
    assert status.startswith("added knight") and (studio.library / "knight.safetensors").exists()
    assert "knight" in [row[0] for row in loras["data"]]
    status, rows, *_ = client.predict("knight", "character", "sks knight, armor", WEIGHTS, api_name="/edit_lora")
    assert ["knight", "character", "sks knight, armor"] == next(r for r in rows["data"] if r[0] == "knight")[:3]
    assert json.loads((studio.library / "knight.json").read_text())["triggers"] == ["sks knight", "armor"]
    status, rows, *_ = client.predict("knight", WEIGHTS, api_name="/remove_lora")
    assert "knight" not in [r[0] for r in rows["data"]]


def test_untrusted_names_and_sizes(served, tmp_path):
    studio = served[0]
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2**20 + 1))
    with pytest.raises(StudioError, match="over the 1 MB limit"):
        studio.add_upload(big)
    sneaky = tmp_path / "..evil.safetensors"
    sneaky.write_bytes(b"\0")
    with pytest.raises(StudioError, match="not an acceptable file name"):
        studio.add_upload(sneaky)


def test_stop_really_stops(client, served):
    job = client.submit(*settings_args(steps=100, size=192), False, api_name="/generate")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not served[0].lock.locked():
        time.sleep(0.05)
    time.sleep(0.3)
    client.predict(api_name="/stop")
    with pytest.raises(Exception, match="cancelled after step"):
        job.result(timeout=60)
    assert not served[0].lock.locked()


def test_two_users_are_queued_and_keep_their_own_gallery(served):
    url = served[1]
    results = {}

    def user(name: str, seed: int) -> None:
        results[name] = Client(url, verbose=False).predict(*settings_args(seed=seed), False, api_name="/generate")

    threads = [threading.Thread(target=user, args=(n, s)) for n, s in (("ann", 21), ("bob", 22))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [len(results[n][4]) for n in ("ann", "bob")] == [1, 1]
    assert record_of(results["ann"][1])["seed"] == 21 and record_of(results["bob"][1])["seed"] == 22


def test_settings_round_trip_without_server(served):
    studio = served[0]
    path, record, _ = studio.generate(Settings("a zq creature", loras=[("random-style", 0.5)], steps=2, seed=9))
    restored = studio.settings_from_png(path)
    assert restored.loras == [("random-style", 0.5)] and restored.seed == 9 and record["steps"] == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def browser_page(url: str):
    """A headless Chromium page on ``url``."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        yield page
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium); CI installs it")
def test_browser_generates_and_screenshots(served, tmp_path):
    shot = tmp_path / "studio.png"
    with browser_page(served[1]) as page:
        page.locator("#prompt textarea").fill("a zq creature")
        page.locator("#generate").click()
        page.locator("#result img").wait_for(timeout=60000)
        page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1400
    assert Path(shot).stat().st_size > 20000


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium); CI installs it")
def test_browser_paints_a_region(served):
    studio = served[0]
    studio.clear_regions()
    with browser_page(served[1]) as page:
        page.get_by_text("regions (regional method)").click()
        page.locator("#region-paint button[aria-label='Brush']").first.click()
        box = page.locator("#region-paint canvas").first.bounding_box()
        x = box["x"] + box["width"] / 2 - 0.25 * box["height"]  # the square canvas sits in the middle
        page.mouse.move(x, box["y"] + 0.25 * box["height"])
        page.mouse.down()
        for t in range(1, 11):
            page.mouse.move(x, box["y"] + (0.25 + 0.05 * t) * box["height"], steps=2)
        page.mouse.up()
        page.locator("#set-region").click()
        page.locator("#regions-info").get_by_text("painted mask").wait_for(timeout=30000)
    name = next(iter(studio.regions))
    mask = np.asarray(Image.open(studio.regions[name]))
    assert mask[:, : mask.shape[1] // 3].max() == 255 and mask[:, mask.shape[1] // 2 :].max() == 0


def test_settings_keep_prompt_tags(served):
    studio = served[0]
    prompt = "a zq creature <lora:random-style:0@0,1@0.5:lbw=OUTALL>"
    path, record, _ = studio.generate(Settings(prompt, loras=[("random-character", 0.7)], steps=2, seed=4))
    assert record["loras"][1] | {"weight": "0@0,1@0.5", "blocks": "OUTALL"} == record["loras"][1]
    restored = studio.settings_from_png(path)
    assert restored.prompt == prompt and restored.loras == [("random-character", 0.7)]
    again, _, _ = studio.generate(restored)
    assert list(Image.open(again).getdata()) == list(Image.open(path).getdata())


def test_regions_from_a_box_and_from_a_painting(client, served):
    studio = served[0]
    info = client.predict("random-character", "0, 0, 0.5, 1", None, api_name="/set_region")
    assert "random-character: box [0.0, 0.0, 0.5, 1.0]" in info
    _, download, *_ = client.predict(*settings_args("regional"), False, api_name="/generate")
    regions = record_of(download)["method"]["parameters"]["regions"]
    assert regions == {"random-character": [0.0, 0.0, 0.5, 1.0]}
    strokes = np.zeros((64, 64, 4), dtype=np.uint8)
    strokes[:, 32:, 3] = 255
    studio.set_region("random-style", painting={"background": None, "layers": [strokes], "composite": None})
    mask = np.asarray(Image.open(studio.regions["random-style"]))
    assert mask[:, 40:].min() == 255 and mask[:, :24].max() == 0
    path, record, _ = studio.generate(Settings("a zq creature", loras=[("random-style", 1.0)], method="regional",
                                               steps=2))  # fmt: skip
    assert record["method"]["parameters"]["regions"] == {"random-style": studio.regions["random-style"]}
    with pytest.raises(StudioError, match="paint a region"):
        studio.set_region("random-style", "", {"layers": [np.zeros((8, 8, 4), dtype=np.uint8)]})
    assert client.predict(api_name="/clear_regions").startswith("no regions")
