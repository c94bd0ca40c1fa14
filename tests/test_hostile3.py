"""Hardening III (issue #39): the studio's API is a public surface.

No server file is opened on a visitor's word, no visitor changes the library for
everyone, every input is bounded, and names from files cannot forge lines of a PNG's
text. Each test provokes the fault for real: a studio served on loopback and driven by
two ``gradio_client`` sessions, FIFOs and forged files in a temporary folder, the CLI,
and PyPI's sd-parsers as a second reader. docs/faults.md lists every row.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE
from gradio_client import Client
from loras import peft_state_dict, write
from PIL import Image
from sd_parsers import ParserManager
from test_a1111 import parse_generation_parameters
from test_bench import bench_args, scores
from test_cli import TINY, run
from test_hostile import forge, made  # noqa: F401  (made is a fixture used here)
from test_studio import settings_kwargs

from compose import Composer, LoRAError, SamplingConfig, load_lora, save_png
from compose.a1111 import parse_parameters, settings_from_parameters
from compose.app.studio import Settings, Studio, StudioError
from compose.app.ui import build
from compose.checks import Limits
from compose.evaluation import claims
from compose.evaluation.bench import plan_items
from compose.evaluation.sets import ManifestError, load_manifest
from compose.files import OutputError
from compose.metadata import a1111_hash_name
from compose.methods.regional import region_mask
from compose.prompts import extract_lora_tags

# -- what the process opens ----------------------------------------------------------------

WATCHED: set[str] = set()
OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    """Record every ``open`` of a watched path by this process (the served studio runs here)."""
    if event == "open" and WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(w) for w in WATCHED):
            OPENED.append(path)


sys.addaudithook(_audit)


class watching:
    """Within the block, every ``open`` of a path under ``paths`` lands in ``self.opened``."""

    def __init__(self, *paths) -> None:
        self.paths = [str(p) for p in paths]
        self.opened: list[str] = []

    def __enter__(self) -> watching:
        OPENED.clear()
        WATCHED.update(self.paths)
        return self

    def __exit__(self, *_) -> None:
        WATCHED.difference_update(self.paths)
        self.opened = list(OPENED)


def _unblock(fifo: Path) -> bool:
    """Open the FIFO's write end without blocking: it succeeds only while some process has
    the read end open (so it detects a reader), and closing it lets that reader go."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False)


@pytest.fixture(scope="module")
def other(served) -> Client:
    """A second visitor: its own session."""
    return Client(served[1], verbose=False)


@pytest.fixture
def no_operator(served):
    """The served studio as it is beyond loopback: operator actions off."""
    studio = served[0]
    studio.operator = False
    yield studio
    studio.operator = True


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# -- 1. a request never names a server file -------------------------------------------------


def _regional(path: str) -> dict:
    return {**settings_kwargs("regional", steps=2), "method_params": {"regions": {"random-character": path}}}


def test_a_fifo_mask_never_blocks_another_client(served, client, other, no_operator, tmp_path):
    fifo = tmp_path / "mask.png"
    os.mkfifo(fifo)
    attack = other.submit(**_regional(str(fifo)), api_name="/generate")
    try:
        png, _ = client.predict(**settings_kwargs(steps=2, seed=7), api_name="/generate")  # within the same queue
        assert json.loads(Image.open(png).text["compose"])["seed"] == 7
        assert "random-character" in [row["name"] for row in client.predict(api_name="/library")]
        with pytest.raises(Exception, match="a mask is uploaded .*never named by a path on the server"):
            attack.result(timeout=60)
        assert not _unblock(fifo), "nothing may be reading the FIFO"
    finally:
        _unblock(fifo)


def test_no_server_path_is_opened_from_a_request(served, client, other, no_operator, tmp_path):
    secret = tmp_path / "server-only.png"
    Image.new("L", (64, 64), 255).save(secret)
    targets = [str(secret), "/etc/passwd", str(tmp_path)]
    with watching(tmp_path) as check:
        Image.open(secret).close()
    assert check.opened == [str(secret)]  # the watch sees an open by this process, where the studio runs
    with watching(tmp_path, "/etc/passwd") as seen:
        for target in targets:
            with pytest.raises(Exception, match="the region of 'random-character' is a box") as info:
                other.predict(**_regional(target), api_name="/generate")
            assert "UnidentifiedImageError" not in str(info.value)
            file = {"path": target, "meta": {"_type": "gradio.FileData"}}  # a path, not an upload
            for endpoint, data in (("set_region", ["random-character", "", file, ""]), ("png_info", [file]),
                                   ("add_lora", [file])):  # fmt: skip
                assert "event: error" in _raw_call(served[1], endpoint, data)  # Gradio refuses what it did not receive
        with pytest.raises(Exception, match="must be a box of four numbers"):
            other.predict(**_regional([0, 0, 1]), api_name="/generate")  # type: ignore[arg-type]
    assert seen.opened == []
    box = {**settings_kwargs("regional", steps=2), "method_params": {"regions": {"random-character": [0, 0, 0.5, 1]}}}
    png, _ = other.predict(**box, api_name="/generate")  # a box still works
    assert json.loads(Image.open(png).text["compose"])["method"]["parameters"]["regions"] == {
        "random-character": [0.0, 0.0, 0.5, 1.0]}  # fmt: skip


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """A call as a hostile script makes it, without gradio_client (which would upload a
    local file it is handed): the JSON goes as it is, and the answer's event stream comes back."""
    base = f"{url.rstrip('/')}/gradio_api/call/{endpoint}"
    request = urllib.request.Request(base, json.dumps({"data": data}).encode(), {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    return urllib.request.urlopen(f"{base}/{event}", timeout=60).read().decode()


def test_the_engine_reads_a_mask_only_from_a_regular_image_file(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(_error(region_mask, str(fifo), 8, 8)), daemon=True)
    reader.start()
    reader.join(10)
    _unblock(fifo)
    assert result and "is not a regular file (a folder, FIFO, device or socket)" in result[0]
    assert f"region mask {fifo}:" in result[0]
    assert "is not an image (PNG, JPEG, ...) that compose can read" in _error(region_mask, "/etc/passwd", 8, 8)
    assert "is not a regular file" in _error(region_mask, str(tmp_path), 8, 8)
    assert "cannot be opened (No such file or directory)" in _error(region_mask, str(tmp_path / "none.png"), 8, 8)


def _error(function, *args) -> str:
    try:
        function(*args)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/etc/passwd", "--region klinko=/etc/passwd: region mask /etc/passwd: is not an image (PNG, JPEG, ...)"),
        ("{fifo}", "is not a regular file (a folder, FIFO, device or socket)"),
        ("{tmp}", "is not a regular file"),
        ("0.1,0.2,0.3", "a region box is [x0, y0, x1, y1]"),
    ],
)
def test_the_cli_reads_a_mask_path_only_as_an_image_file(tmp_path, capsys, value, message):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    value = value.format(fifo=fifo, tmp=tmp_path)
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--method", "regional", "--lora", "random-x",
                       "--region", f"klinko={value}", "--out", tmp_path / "o.png")  # fmt: skip
    assert code == 2 and message in err and "could not convert" not in err and "denoising" not in err
    _unblock(fifo)


# -- 2. no visitor changes the library for everyone ---------------------------------------


def test_one_visitor_cannot_remove_or_edit_a_lora_for_another(served, client, other, no_operator):
    studio = no_operator
    lora = studio.composer.loras["random-character"]
    sidecar = Path(lora.path).with_suffix(".json")
    before = (studio.library_rows(), sidecar.read_text(), lora.triggers[:])
    first, _ = client.predict(**settings_kwargs(steps=2, seed=5), api_name="/generate")
    edit = {"category": "style", "triggers": "x"}
    for endpoint, extra in (("/remove_lora", {}), ("/edit_lora", edit)):
        with pytest.raises(Exception, match="is an operator action: it changes the studio for everyone"):
            other.predict(name="random-character", **extra, api_name=endpoint)
    again, _ = client.predict(**settings_kwargs(steps=2, seed=5), api_name="/generate")
    assert np.array_equal(_pixels(first), _pixels(again))
    assert (studio.library_rows(), sidecar.read_text(), lora.triggers) == before


def test_an_operator_removal_says_it_reaches_every_session(tmp_path, lora_files):
    studio = Studio("tiny:sd1", tmp_path / "library", Composer.load, operator=True)
    write(studio.library / "knight.safetensors", peft_state_dict(lora_files["sd1", 0]["parts"]))
    studio.load_trusted_folder(studio.library)
    assert "(for every session)" in studio.edit("knight", "character", "sks knight")
    assert json.loads((studio.library / "knight.json").read_text())["triggers"] == ["sks knight"]
    message = studio.remove("knight")
    assert message.startswith("removed knight for every session") and "knight" not in studio.composer.loras
    studio.operator = False
    with pytest.raises(StudioError, match="removing a LoRA from the library is an operator action"):
        studio.remove("knight")
    buttons = {c["props"]["value"]: c["props"]["interactive"] for c in build(studio).get_config_file()["components"]
               if c["type"] == "button"}  # fmt: skip
    assert buttons["Remove (operator only)"] is False and buttons["Save category and triggers (operator only)"] is False


# -- 3. prompts are bounded ---------------------------------------------------------------


MEGABYTE = "a zq creature in a red hat, " * 37450
CHUNKY = "a, " * 1500  # 4,500 characters, 3,000 tokens: 40 chunks of 75


@pytest.mark.parametrize(
    ("prompt", "message"),
    [(MEGABYTE, "the prompt is 1,048,600 characters long, over the limit of 38,400 (16 chunks of 75 tokens)"),
     (CHUNKY, "the prompt needs 40 chunks of 75 tokens, over the limit of 16 (1,200 tokens)")],
)  # fmt: skip
def test_a_long_prompt_is_refused_within_a_second_by_the_api(served, client, prompt, message):
    studio = served[0]
    made_before = studio.made
    start = time.perf_counter()
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        client.predict(**{**settings_kwargs(steps=2), "prompt": prompt}, api_name="/generate")
    assert time.perf_counter() - start < 1.0 and studio.made == made_before


def test_a_long_prompt_is_refused_within_a_second_by_the_studio(served):
    studio = served[0]
    config = json.loads(urllib.request.urlopen(f"{served[1].rstrip('/')}/config", timeout=30).read())
    boxes = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["type"] == "textbox"}
    assert boxes["prompt"]["max_length"] == Limits().prompt_characters() == 38_400  # the page stops typing there
    for prompt, negative in ((MEGABYTE, ""), ("a zq creature", CHUNKY)):
        start = time.perf_counter()
        with pytest.raises(ValueError, match="over the limit of"):
            studio.generate(Settings(prompt, negative, loras=[("random-character", 1.0)], steps=2))
        assert time.perf_counter() - start < 1.0


def test_the_cli_and_the_python_api_bound_prompts_too(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--prompt", MEGABYTE, *TINY, "--out", tmp_path / "o.png")
    assert code == 2 and "the prompt is 1,048,600 characters long" in err and "--max-prompt-chunks" in err
    two = "a zq creature, " * 30  # 90 tokens: two chunks
    code, _, err = run(capsys, "generate", "--prompt", two, *TINY, "--max-prompt-chunks", "1",
                       "--out", tmp_path / "o.png")  # fmt: skip
    assert code == 2 and "the prompt needs 2 chunks of 75 tokens, over the limit of 1 (75 tokens)" in err
    assert not (tmp_path / "o.png").exists()
    composer = Composer.tiny("sd1")
    one_step = SamplingConfig(steps=1, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="the negative prompt needs 40 chunks"):
        composer.generate("a cat", negative_prompt=CHUNKY, sampling=one_step)
    composer.limits = Limits(max_prompt_chunks=64)  # a genuine long prompt: raise the limit
    assert composer.generate("a cat", negative_prompt=CHUNKY, sampling=one_step)[0].size == (SIZE,) * 2


# -- 4. LoRA names from file names ----------------------------------------------------------


NEWLINE = "zz\nNegative prompt: INJECTED"
BIDI = "evil\u202egnp.exe"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, lora_files) -> dict:
    """Two LoRA files with hostile names, loaded by file name, and an image using both."""
    folder = tmp_path_factory.mktemp("hostile")
    composer = Composer.tiny("sd1")
    paths = {}
    for i, name in enumerate((NEWLINE, BIDI)):
        paths[name] = write(folder / f"{name}.safetensors", peft_state_dict(lora_files["sd1", i]["parts"]))
        composer.load_lora(paths[name])
    image = composer.generate("a zq creature", list(composer.loras), negative_prompt="blurry", seed=3,
                              sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE))[0]  # fmt: skip
    return {"composer": composer, "paths": paths, "png": save_png(image, folder / "made.png")}


def test_a_name_is_made_safe_where_the_lora_gets_it(hostile):
    assert list(hostile["composer"].loras) == ["zz[U+000A]Negative prompt: INJECTED", "evil[U+202E]gnp.exe"]
    record = json.loads(Image.open(hostile["png"]).text["compose"])
    assert [e["name"] for e in record["loras"]] == list(hostile["composer"].loras)
    text = Image.open(hostile["png"]).text["parameters"]
    assert "\u202e" not in text and text.count("\n") == 2  # prompt, negative prompt, settings: three lines
    assert text.splitlines()[1] == "Negative prompt: blurry"


def test_the_text_reads_back_through_our_a1111_reader_and_sd_parsers(hostile):
    text = Image.open(hostile["png"]).text["parameters"]
    fields = parse_parameters(text)
    tags = "<lora:zz[U+000A]Negative prompt INJECTED:0.8> <lora:evil[U+202E]gnp.exe:0.8>"
    assert (fields["prompt"], fields["negative_prompt"]) == (f"a zq creature {tags}", "blurry")
    assert (fields["Steps"], fields["Seed"], fields["Size"]) == ("2", "3", f"{SIZE}x{SIZE}")
    hashes = [part.split(": ")[0] for part in fields["Lora hashes"].split(", ")]
    assert hashes == [a1111_hash_name(n) for n in hostile["composer"].loras]
    names = settings_from_parameters(text)["loras"]
    assert names == ["zz[U+000A]Negative prompt INJECTED", "evil[U+202E]gnp.exe"]  # A1111 drops ':' from tags
    a1111 = parse_generation_parameters(text)  # A1111's own reader, as test_a1111 transcribes it
    assert (a1111["Prompt"], a1111["Negative prompt"], a1111["Steps"]) == (f"a zq creature {tags}", "blurry", "2")
    info = ParserManager().parse(hostile["png"])
    (sampler,) = info.samplers
    assert sampler.prompts[0].value == f"a zq creature {tags}"
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]
    assert (sampler.parameters["steps"], sampler.parameters["seed"]) == ("2", "3")


def test_a_safe_name_reproduces_from_the_text(hostile):
    composer = hostile["composer"]
    image = composer.generate(
        "a zq creature", ["evil[U+202E]gnp.exe"], seed=4, sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE)
    )[0]
    settings = settings_from_parameters(image.info["parameters"])
    assert settings.pop("loras") == ["evil[U+202E]gnp.exe"]
    again = composer.generate(**settings)[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_inspect_and_the_library_show_the_escaped_name(hostile, capsys, served, tmp_path):
    code, out, _ = run(capsys, "inspect", hostile["paths"][BIDI])
    assert code == 0 and "evil[U+202E]gnp.exe" in out and "\u202e" not in out
    lora = load_lora(hostile["paths"][BIDI])
    lora.name = BIDI  # a record built by hand
    with pytest.raises(LoRAError, match="holds control, line or bidi characters"):
        hostile["composer"].add_lora(lora)
    upload = tmp_path / f"{BIDI}.safetensors"
    upload.write_bytes(hostile["paths"][BIDI].read_bytes())
    served[0].add_upload(upload)
    try:
        names = [row["name"] for row in Client(served[1], verbose=False).predict(api_name="/library")]
        assert "evil[U+202E]gnp.exe" in names and not any("\u202e" in n for n in names)
    finally:
        served[0].composer.unload_lora("evil[U+202E]gnp.exe")
        (served[0].library / upload.name).unlink()


def test_a_manifest_lora_name_is_refused_before_it_could_differ(bench_inputs, tmp_path):
    manifest = json.loads(bench_inputs["sets"].read_text())
    manifest["loras"][0]["file"] = str(bench_inputs["sets"].parent / manifest["loras"][0]["file"])
    manifest["loras"][0]["name"] = BIDI
    (tmp_path / "sets.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"the name holds control, line or bidi characters; name it 'evil\[U"):
        load_manifest(tmp_path / "sets.json")


# -- 5. a tag names a LoRA, never a path ------------------------------------------------------


def test_a_tag_never_reads_outside_the_lora_folder(tmp_path, capsys, lora_files):
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    write(outside / "f16.safetensors", peft_state_dict(lora_files["sd1", 0]["parts"]))
    for tag, bad in (("<lora:../elsewhere/f16:1>", "'..'"), (f"<lora:{outside}/f16:1>", "'/'"),
                     ("<lora:a\\b:1>", "'\\\\'")):  # fmt: skip
        with watching(outside) as seen:
            code, _, err = run(capsys, "generate", "--prompt", f"a cat {tag}", *TINY, "--lora-dir", folder,
                               "--out", tmp_path / "o.png")  # fmt: skip
        assert code == 2 and f"{tag}: a <lora:NAME> tag names a LoRA, never a path" in err and bad in err, err
        assert seen.opened == [] and "is not loaded" not in err
    with pytest.raises(ValueError, match="never a path"):
        extract_lora_tags("<lora:../x:1>")


# -- misleading or silent ---------------------------------------------------------------------


def test_from_png_names_the_local_file_it_uses(made, tmp_path, capsys):  # noqa: F811
    png = forge(made["png"], tmp_path / "f.png", lambda r: r["loras"][0].update(file="/etc/passwd"))
    code, _, err = run(capsys, "generate", "--from-png", png, "--lora", made["lora"], "--out", tmp_path / "o.png")
    assert code == 0, err
    assert f"LoRAs (from --lora, matched by sha256): knight ({made['lora']}, sha256 " in err
    assert "/etc/passwd" not in err
    code, _, err = run(capsys, "generate", "--from-png", png, "--out", tmp_path / "o.png")
    assert code == 2 and "knight (no --lora file has it, sha256 " in err


def test_bench_refuses_zero_sets_per_n_and_a_size_up_front(bench_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, *bench_args(bench_inputs, out), "--sets-per-n", "0")
    assert code == 2 and "argument --sets-per-n: 0 is not an integer of at least 1" in err
    with pytest.raises(ValueError, match="must be an integer of at least 1, got 0"):
        plan_items(load_manifest(bench_inputs["sets"]), ["merge"], 1, per_n=0)
    args = bench_args(bench_inputs, out)
    args[args.index("--size") + 1] = "4096"
    code, _, err = run(capsys, *args)
    assert code == 2 and "width 4096 is over this model's limit" in err
    assert "benchmark [" not in err and not out.exists()  # no bar started, no empty folder left


def test_a_pickle_named_safetensors_is_named_and_never_run(tmp_path):
    torch.save({"a.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "zipped.safetensors")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    (tmp_path / "raw.safetensors").write_bytes(pickle.dumps(Payload(), protocol=2))
    for name in ("zipped", "raw"):
        with pytest.raises(LoRAError, match="is a pickle file .* named .safetensors, not a safetensors file; compose "
                                            "never unpickles"):  # fmt: skip
            load_lora(tmp_path / f"{name}.safetensors")
    assert not (tmp_path / "ran").exists()


def test_a_lora_listed_twice_is_named(lora_files):
    composer = Composer.tiny("sd1")
    composer.load_lora(lora_files["sd1", 0]["peft"], name="knight")
    cases = [("a <lora:knight:1>", ["knight"], "LoRA 'knight' is listed in loras= and as a <lora:...> tag"),
             ("a <lora:knight:1> <lora:knight:0.5>", [], "LoRA 'knight' is listed twice as a <lora:...> tag"),
             ("a", ["knight", ("knight", 0.5)], "LoRA 'knight' is listed twice in loras=")]  # fmt: skip
    for prompt, loras, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
            composer.generate(prompt, loras, sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))


def test_out_at_an_existing_folder_and_the_size_multiple(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    code, out, err = run(capsys, "generate", "--prompt", "x", *TINY[:2], "--steps", "1", *TINY[4:], "--out", folder)
    assert code == 0 and out.strip() == str(folder / "compose.png"), err  # as with a trailing /, per --help
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(OutputError, match="folder.png: is a folder"):  # the API writes only the path it is given
        save_png(Image.new("RGB", (8, 8)), tmp_path / "folder.png")
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY[:4], "--width", "63", "--out", tmp_path / "w.png")
    assert code == 2 and "multiples of 2 (this model's VAE scale factor: 8 for Stable Diffusion" in err


# -- two benchmarks on one folder split the work ------------------------------------------------


def test_claims_are_taken_once_and_retaken_from_a_dead_process(tmp_path):
    path = tmp_path / "item.claim"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": claims.HOST, "nonce": "x"}))
        assert not claims.claim(path)  # a live process holds it
        sleeper.kill()
        deadline = time.monotonic() + 10
        while not claims.claim(path) and time.monotonic() < deadline:  # killed, not yet reaped (a zombie)
            time.sleep(0.05)
        assert json.loads(path.read_text())["pid"] == os.getpid() and not claims.claim(path)
        claims.release(path)
        assert not path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    path.write_text("")  # a process killed between creating the claim and writing it
    assert not claims.claim(path)
    os.utime(path, (time.time() - 120,) * 2)
    assert claims.claim(path)
    claims.release(path)


@pytest.mark.soak
def test_two_benchmarks_started_by_hand_split_the_items(bench_inputs, finished, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "compose", *bench_args(bench_inputs, out)]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    ran = [int(o.split("this process ran ")[1].split()[0]) if "this process ran" in o else 0 for o in outputs]
    assert sum(ran) == 12 and min(ran) > 0, outputs  # split, none computed twice
    assert scores(out) == pytest.approx(finished[1], abs=0.02)
    assert len(list((out / "items").glob("*/*.json"))) == 12 and not list(out.rglob("*.claim"))
