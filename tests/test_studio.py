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

WEIGHTS = {"random-character": 1.0, "random-style": 0.8}


def settings_kwargs(method="composite", seed=3, steps=3, prompt="a zq creature", weights=WEIGHTS, size=64) -> dict:
    """The named parameters of ``/generate`` (as a script calls it)."""
    params = {"switch": {"tau": 2}, "cmlora": {"ordering": "category"}}.get(method)
    return {"prompt": prompt, "negative_prompt": "blurry", "loras": weights, "method": method, "method_params": params,
            "steps": steps, "width": size, "height": size, "seed": seed, "scheduler": "dpm++2m"}  # fmt: skip


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False)


def record_of(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["compose"])


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_each_method(client, method):
    png, info = client.predict(**settings_kwargs(method), api_name="/generate")
    record = record_of(png)
    assert record == info["record"] and info["seconds"] > 0 and info["clipscore"] is not None
    assert record["method"]["name"] == method and record["seed"] == 3
    assert [lora["name"] for lora in record["loras"]] == ["random-character", "random-style"]


def test_compare_renders_every_method(client):
    kwargs = {k: v for k, v in settings_kwargs(seed=5).items() if k not in ("method", "method_params", "width",
                                                                           "height")}  # fmt: skip
    pngs, rows = client.predict(**kwargs, api_name="/compare")
    assert [row["method"] for row in rows] == list(METHODS)
    assert all(row["clipscore"] >= 0 and row["presence"] is None for row in rows)  # random LoRAs: no detectors
    assert [record_of(png)["method"]["name"] for png in pngs] == list(METHODS)
    assert {record_of(png)["seed"] for png in pngs} == {5}


def test_load_settings_from_png(client):
    png, _ = client.predict(**settings_kwargs("switch", seed=11), api_name="/generate")
    info = client.predict(handle_file(png), api_name="/png_info")
    settings = info["settings"]
    assert info["source"] == "compose"
    assert (settings["prompt"], settings["negative_prompt"], settings["method"], settings["method_params"]["tau"],
            settings["steps"], settings["seed"], settings["scheduler"]) == (
        "a zq creature", "blurry", "switch", 2, 3, 11, "dpm++2m")  # fmt: skip
    assert dict(settings["loras"])["random-style"] == 0.8


def test_a_broken_png_is_named_without_the_servers_temporary_path(client, tmp_path):
    broken = tmp_path / "not-really.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(Exception, match="not-really.png") as refused:
        client.predict(handle_file(broken), api_name="/png_info")
    assert "/" not in str(refused.value), "the server's temporary folder stays on the server"


def test_bad_upload_is_refused_and_changes_nothing(client, served, tmp_path):
    studio = served[0]
    before = studio.library_rows()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(Exception, match="not a valid safetensors file"):
        client.predict(handle_file(broken), api_name="/add_lora")
    pickle_file = tmp_path / "old.ckpt"
    pickle_file.write_bytes(b"\x80\x04N.")
    with pytest.raises(Exception, match="only .safetensors"):
        client.predict(handle_file(pickle_file), api_name="/add_lora")
    assert studio.library_rows() == before
    assert not (studio.library / "broken.safetensors").exists()


def test_upload_edit_remove(client, served, lora_files):
    studio = served[0]
    source = served[2] / "knight.safetensors"
    shutil.copyfile(lora_files["sd1", 0]["peft"], source)
    status = client.predict(file=handle_file(source), api_name="/add_lora")
    assert status.startswith("added knight") and (studio.library / "knight.safetensors").exists()
    assert "knight" in [row["name"] for row in client.predict(api_name="/library")]
    client.predict(name="knight", category="character", triggers="sks knight, armor", api_name="/edit_lora")
    row = next(r for r in client.predict(api_name="/library") if r["name"] == "knight")
    assert (row["category"], row["triggers"]) == ("character", "sks knight, armor")
    assert json.loads((studio.library / "knight.json").read_text())["triggers"] == ["sks knight", "armor"]
    client.predict(name="knight", api_name="/remove_lora")
    assert "knight" not in [r["name"] for r in client.predict(api_name="/library")]


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
    job = client.submit(**settings_kwargs(steps=100, size=192), api_name="/generate")
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
        results[name] = Client(url, verbose=False).predict(**settings_kwargs(seed=seed), api_name="/generate")

    threads = [threading.Thread(target=user, args=(n, s)) for n, s in (("ann", 21), ("bob", 22))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert record_of(results["ann"][0])["seed"] == 21 and record_of(results["bob"][0])["seed"] == 22


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
    studio.regions.clear()
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
    (regions,) = studio.regions.values()  # the browser's session, and only it
    name = next(iter(regions))
    mask = np.asarray(Image.open(regions[name]))
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
    info = client.predict(name="random-character", box="0, 0, 0.5, 1", api_name="/set_region")
    assert "random-character: box [0.0, 0.0, 0.5, 1.0]" in info
    png, _ = client.predict(**settings_kwargs("regional"), api_name="/generate")
    regions = record_of(png)["method"]["parameters"]["regions"]
    assert regions == {"random-character": [0.0, 0.0, 0.5, 1.0]}
    info = client.predict(name="random-character", box="0, 0, 0.5, 1", prompt="a tall creature", api_name="/set_region")
    assert "prompt “a tall creature”" in info
    prompted, _ = client.predict(**settings_kwargs("regional"), api_name="/generate")
    assert record_of(prompted)["method"]["parameters"]["prompts"] == {"random-character": "a tall creature"}
    assert list(Image.open(prompted).getdata()) != list(Image.open(png).getdata())
    strokes = np.zeros((64, 64, 4), dtype=np.uint8)
    strokes[:, 32:, 3] = 255
    studio.set_region("random-style", painting={"background": None, "layers": [strokes], "composite": None})
    mask = np.asarray(Image.open(studio.regions[""]["random-style"]))
    assert mask[:, 40:].min() == 255 and mask[:, :24].max() == 0
    path, record, _ = studio.generate(Settings("a zq creature", loras=[("random-style", 1.0)], method="regional",
                                               steps=2))  # fmt: skip
    assert record["method"]["parameters"]["regions"] == {"random-style": studio.regions[""]["random-style"]}
    with pytest.raises(StudioError, match="paint a region"):
        studio.set_region("random-style", "", {"layers": [np.zeros((8, 8, 4), dtype=np.uint8)]})
    assert client.predict(api_name="/clear_regions").startswith("no regions")


def test_the_model_thread_runs_calls_on_the_serving_thread():
    """While the studio is served, model calls from Gradio's workers run on the serving
    thread (one OpenMP team: a small model is 3x slower on a second thread); a call's
    exception reaches its caller; before serving, a call runs where it is made."""
    from compose.app.model_thread import ModelThread

    runner, stop, seen = ModelThread(), threading.Event(), {}
    assert runner.run(threading.get_ident) == threading.get_ident()

    def worker():
        while runner.serving is None:
            time.sleep(0.01)
        seen["thread"] = runner.run(threading.get_ident)
        try:
            runner.run(int, "not a number")
        except ValueError as error:
            seen["error"] = str(error)
        stop.set()

    threading.Thread(target=worker).start()
    runner.serve(stop)
    assert seen == {"thread": threading.get_ident(), "error": "invalid literal for int() with base 10: 'not a number'"}
    assert runner.serving is None


def test_settings_from_an_automatic1111_png(served, tmp_path):
    """A PNG with only A1111's ``parameters`` text loads: prompt with its tags, sampler and
    schedule, CFG, seed, size; a tag naming a LoRA the library lacks is refused by name."""
    from PIL.PngImagePlugin import PngInfo

    studio = served[0]
    text = ("a zq creature <lora:random-style:0.6>\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 6, Seed: 12, Size: 64x64, Model hash: 0123456789")  # fmt: skip
    info = PngInfo()
    info.add_text("parameters", text)
    png = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    s = studio.settings_from_png(png)
    assert (s.prompt, s.negative_prompt, s.steps, s.scheduler, s.guidance_scale, s.seed, s.width) == (
        "a zq creature <lora:random-style:0.6>", "blurry", 3, "dpm++2m-karras", 6.0, 12, 64)  # fmt: skip
    assert studio.png_info(png)["source"] == "a1111" and "AUTOMATIC1111" in studio.png_info_text(png)
    path, record, _ = studio.generate(s)
    assert record["loras"][0]["name"] == "random-style" and record["loras"][0]["weight"] == 0.6
    info = PngInfo()
    info.add_text("parameters", text.replace("random-style", "nowhere"))
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    with pytest.raises(StudioError, match="its prompt uses LoRA nowhere, which is not in the library"):
        studio.settings_from_png(png)


def test_two_names_for_the_same_bytes_keep_their_names(served):
    studio = served[0]
    source = next(p for p in studio.composer.loras.values() if p.name == "random-style").path
    twin = studio.library / "twin-style.safetensors"
    shutil.copyfile(source, twin)
    studio.load_trusted_folder(studio.library)
    try:
        path, _, _ = studio.generate(Settings("a zq creature", loras=[("twin-style", 0.5)], steps=2))
        assert studio.settings_from_png(path).loras == [("twin-style", 0.5)]
        path, _, _ = studio.generate(Settings("a zq creature", loras=[("random-style", 0.5)], steps=2))
        assert studio.settings_from_png(path).loras == [("random-style", 0.5)]
    finally:
        studio.remove("twin-style")
        twin.unlink()


def test_cards_are_found_by_name_category_or_trigger_and_captioned_with_the_category(served):
    studio = served[0]
    assert studio.card_names() == list(studio.composer.loras)
    assert studio.card_names("zq STYLE") == studio.card_names("style") == ["random-style"]
    assert studio.card_names("nothing like it") == []
    captions = [caption for _, caption in studio.cards("random-", {"random-style": 0.5})]
    loras = studio.composer.loras
    state = {name: "● on 0.5" if name == "random-style" else "○ off" for name in loras}
    assert captions == [f"{state[name]} · {name} · {loras[name].category}" for name in loras
                        if name.startswith("random-")]  # fmt: skip


ROUTED = Settings("a zq creature on the left, zq place background", method="routed", steps=3, seed=2,
                  loras=[("random-character", 1.0), ("random-background", 1.0)])  # fmt: skip


def test_routed_shows_where_each_lora_acted(served):
    studio = served[0]
    path, record, _ = studio.generate(ROUTED)
    view, caption = studio.regions_of(path)
    with Image.open(view) as image:
        assert image.size == (256, 256) and len(set(image.convert("RGB").getdata())) > 2
    assert "random-character" in caption and "random-background" in caption and "rgb(230, 25, 75)" in caption
    merged, _, _ = studio.generate(Settings(ROUTED.prompt, loras=ROUTED.loras, steps=2))
    assert studio.regions_of(merged) is None


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium); CI installs it")
def test_browser_shows_the_regions_of_a_routed_image(served):
    studio = served[0]
    path, _, _ = studio.generate(ROUTED)
    with browser_page(served[1]) as page:
        page.locator("#settings-png input[type=file]").set_input_files(str(path))
        playwright = pytest.importorskip("playwright.sync_api")
        playwright.expect(page.locator("#method input")).to_have_value("routed", timeout=30000)
        assert not page.locator("#result-regions").is_visible()
        page.locator("#generate").click()
        page.locator("#result-regions img").wait_for(timeout=60000)
        assert "random-background" in page.locator("#result-regions-legend").inner_text()
