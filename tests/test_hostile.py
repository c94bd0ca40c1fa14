"""What a hostile or careless user still broke (issue #18), one test per fault.

Each test provokes the fault for real (special files in a temporary folder, forged PNG
records, broken LoRA files, a studio served on loopback) and checks the exact message
and what must survive. docs/faults.md lists every row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AS_LATENTS, SIZE
from gradio_client import Client, handle_file
from loras import kohya_state_dict, peft_state_dict, write
from PIL import Image, PngImagePlugin
from test_cli import TINY, run
from test_studio import settings_kwargs

from compose import Composer, LoRAError, SamplingConfig, load_lora, read_record, save_png
from compose.app.studio import Studio, StudioError
from compose.app.ui import operator_default
from compose.checks import Limits, printable
from compose.evaluation.sets import ManifestError, load_manifest
from compose.files import OutputError, atomic_open
from compose.metadata import RecordError

# -- 1. --out never destroys what is at the path --------------------------------------


def _image() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 10, 10))


def test_out_writes_through_links_and_refuses_special_files(tmp_path, capsys):
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    save_png(_image(), link)
    assert link.is_symlink() and Image.open(real).size == (8, 8)  # written through; the link stays a link

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    to_folder = tmp_path / "to-folder.png"
    to_folder.symlink_to(folder)
    cases = [(fifo, "is a FIFO (named pipe); compose writes only a new file or over a regular file"),
             (folder, "is a folder"), (dangling, "which does not exist; compose does not create files through links"),
             (to_folder, "is a symbolic link to a folder")]  # fmt: skip
    if os.geteuid() == 0:  # a device node in the temporary folder (the kernel's null device numbers)
        device = tmp_path / "device.png"
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        cases.append((device, "is a character device"))
    for path, message in cases:
        with pytest.raises(OutputError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
            save_png(_image(), path)
        with pytest.raises(OutputError, match=re.escape(message)):
            with atomic_open(path, "w") as handle:
                handle.write("x")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and folder.is_dir() and dangling.is_symlink()
    assert not (tmp_path / "nowhere.png").exists() and not list(tmp_path.glob(".*.tmp"))
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--out", fifo)
    assert code == 2 and f"compose: error: {fifo}: is a FIFO" in err and "denoising" not in err


def test_out_keeps_the_umask_and_the_mode_of_a_replaced_file(tmp_path):
    previous = os.umask(0o027)
    try:
        fresh = save_png(_image(), tmp_path / "fresh.png")
        kept = tmp_path / "kept.png"
        kept.write_bytes(b"old")
        kept.chmod(0o604)
        save_png(_image(), kept)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and Image.open(kept).size == (8, 8)


def test_out_is_a_png_and_a_folder_gets_file_names(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--out", tmp_path / "a.jpg")
    assert code == 2 and "a.jpg: compose writes PNG images (the settings are kept in PNG text chunks)" in err
    with pytest.raises(OutputError, match="give a name ending in .png"):
        save_png(_image(), tmp_path / "b.jpg")
    code, out, err = run(capsys, "generate", "--prompt", "x", *TINY[:2], "--steps", "1", *TINY[4:], "--seed", "1",
                         "2", "--out", f"{tmp_path / 'dir'}/")  # fmt: skip
    assert code == 0, err
    assert out.split() == [str(tmp_path / "dir" / "compose-1.png"), str(tmp_path / "dir" / "compose-2.png")]
    code, out, err = run(capsys, "generate", "--prompt", "x", *TINY[:2], "--steps", "1", *TINY[4:],
                         "--out", tmp_path / "plain")  # fmt: skip
    assert code == 0 and out.strip() == str(tmp_path / "plain.png")


def test_out_is_checked_before_the_generation(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--out", blocker / "x.png")
    assert code == 2 and "x.png: cannot write there: a part of the path above it is a file" in err
    assert ".tmp" not in err and "denoising" not in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    chattr = shutil.which("chattr")
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: the immutable attribute binds it too
            if chattr is None or subprocess.run([chattr, "+i", str(locked)], capture_output=True).returncode:
                pytest.skip("cannot make a folder unwritable here (root, and no chattr +i)")
        code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--out", locked / "x.png")
        assert code == 2 and f"x.png: cannot write in {locked}" in err and ".tmp" not in err and "denoising" not in err
    finally:
        if chattr is not None:
            subprocess.run([chattr, "-i", str(locked)], capture_output=True)
        locked.chmod(0o700)


# -- 2. benchmark set ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["../../x"], r'sets\[0\] \("../../x"\): the id may hold only letters, digits and . _ \+ -'),
        (["/tmp/x"], r'sets\[0\] \("/tmp/x"\): the id may hold only'),
        (["a", "a/"], r'sets\[1\] \("a/"\): the id may hold only'),
        (["a", "./a"], r'sets\[1\] \("./a"\): the id may hold only'),
        (["a\x00b"], r'sets\[0\] \("a\\x00b"\): the id may hold only'),
        (["x" * 300], r"the id is 300 characters long; at most 128"),
        (["knight", "Knight"], r"set id differs only in case from sets\[0\]"),
    ],
)
def test_set_ids_cannot_escape_or_share_a_folder(bench_inputs, tmp_path, ids, message):
    data = json.loads(bench_inputs["sets"].read_text())
    data["sets"] = [{"id": set_id, "loras": ["character"], "prompt": "x"} for set_id in ids]
    manifest = tmp_path / "sets.json"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_manifest(manifest)


def test_a_bad_set_id_stops_the_benchmark_before_any_work(bench_inputs, tmp_path, capsys):
    from test_bench import bench_args

    data = json.loads(bench_inputs["sets"].read_text())
    data["sets"][1]["id"] = "../../escaped"
    manifest = tmp_path / "deep" / "sets.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps(data))
    code, _, err = run(capsys, *bench_args({**bench_inputs, "sets": manifest}, tmp_path / "deep" / "out"))
    assert code == 2 and 'sets.json: sets[1] ("../../escaped"): the id may hold only' in err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "out" / "items").exists()


# -- 3. forged PNG settings -------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory, lora_files) -> dict:
    """A tiny composer with one LoRA, and a PNG it made with block weights."""
    composer = Composer.tiny("sd1")
    composer.load_lora(lora_files["sd1", 0]["peft"], name="knight")
    image = composer.generate("a knight", [("knight", 1.0, "OUTALL")], method="composite", seed=5,
                              sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE))[0]  # fmt: skip
    path = save_png(image, tmp_path_factory.mktemp("made") / "knight.png")
    return {"composer": composer, "png": path, "lora": lora_files["sd1", 0]["peft"]}


def forge(source: Path, target: Path, change) -> Path:
    """``source``'s pixels with its record changed by ``change(record)`` (which may return raw text)."""
    with Image.open(source) as image:
        record = json.loads(image.text["compose"])
        pixels = image.copy()
    text = change(record)
    info = PngImagePlugin.PngInfo()
    info.add_text("compose", text if isinstance(text, str) else json.dumps(record))
    pixels.save(target, pnginfo=info)
    return target


def test_a_png_names_a_model_that_loads_only_when_asked(made, tmp_path, capsys):
    png = forge(made["png"], tmp_path / "f.png", lambda r: r.update(model=str(tmp_path / "their-model")))
    out = ["--lora", made["lora"], "--out", tmp_path / "o.png"]
    code, _, err = run(capsys, "generate", "--from-png", png, *out)
    assert code == 2 and f"the image was made with the model '{tmp_path / 'their-model'}'" in err
    assert "pass --model" in err and "--trust-png-model" in err and "LoRAs (from --lora" not in err
    code, _, err = run(capsys, "generate", "--from-png", png, "--trust-png-model", *out)
    assert code == 2 and f"model {tmp_path / 'their-model'}; LoRAs (from --lora, matched by sha256): knight" in err
    assert "their-model: no such file or folder" in err  # it was asked, so it tried
    code, _, err = run(capsys, "generate", "--from-png", png, "--model", "tiny:sd1", *out)
    assert code == 0, err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(steps=10**9), "'steps' must be at most 10000, got 1000000000"),
        (lambda r: r.update(width=100000), "'width' must be at most 16384, got 100000"),
        (lambda r: r.update(steps="25"), "'steps' must be an integer, got \"25\""),
        (lambda r: r.update(guidance_scale=float("nan")), "'guidance_scale' must be a finite number, got nan"),
        (lambda r: r.update(seed=2**70), "seed must be an integer in"),
        (lambda r: r.update(loras={"a": 1}), "'loras' must be a list"),
        (lambda r: r["loras"][0].update(weight=1e308), "the weight of 'knight' must be between -100 and 100"),
        (lambda r: r.pop("method"), "'method' must be an object, got null"),
        (lambda r: r["method"].update(name="nope"), "'name' must be one of merge"),
        (lambda r: r["method"]["parameters"].update(taux=2), "method 'composite' has no parameter 'taux'"),
        (lambda r: "[" * 100000 + "]" * 100000, "nested too deeply"),
        (lambda r: "[1, 2]", "the 'compose' record must be a JSON object, got \\[1, 2\\]"),
    ],
)
def test_forged_records_are_refused_before_anything_loads(made, tmp_path, capsys, change, message):
    png = forge(made["png"], tmp_path / "forged.png", change)
    with pytest.raises(RecordError, match=message):
        read_record(png)
    code, _, err = run(capsys, "generate", "--from-png", png, "--out", tmp_path / "o.png")
    assert code == 2 and "forged.png: " in err and "denoising" not in err and "internal error" not in err


def test_block_weights_are_reproduced(made, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--from-png", made["png"], "--lora", made["lora"],
                       "--out", tmp_path / "again.png")  # fmt: skip
    assert code == 0, err
    assert "compose: " in err and "model tiny:sd1; LoRAs (from --lora, matched by sha256): knight" in err
    assert read_record(tmp_path / "again.png")["loras"][0]["blocks"] == "OUTALL"
    again, first = (np.asarray(Image.open(p).convert("RGB")) for p in (tmp_path / "again.png", made["png"]))
    assert np.array_equal(again, first)
    plain = made["composer"].generate("a knight", [("knight", 1.0)], method="composite", seed=5,
                                      sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE))[0]  # fmt: skip
    assert not np.array_equal(np.asarray(plain), first)  # the block weights matter


def test_the_studio_refuses_forged_records_and_masks(made, tmp_path, lora_files):
    studio = Studio("tiny:sd1", tmp_path / "library", Composer.load, operator=False)
    studio.composer.load_lora(made["lora"], name="knight")
    forged = forge(made["png"], tmp_path / "f.png", lambda r: r.update(steps=10**9))
    with pytest.raises(StudioError, match="f.png: .*'steps' must be at most 10000"):
        studio.settings_from_png(forged)

    def mask(record):
        record["method"] = {"name": "regional", "parameters": {"regions": {"knight": str(tmp_path / "theirs.png")}}}

    with pytest.raises(StudioError, match="names the mask file '.*theirs.png', which this studio did not paint"):
        studio.settings_from_png(forge(made["png"], tmp_path / "m.png", mask))
    assert studio.settings_from_png(made["png"]).loras == [("knight", 1.0, "OUTALL")]


# -- 4. the studio is shared by everyone who reaches it ---------------------------------


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False)


def _wait_locked(studio, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not studio.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert studio.lock.locked(), "the run must have started"


def test_stop_ends_only_your_own_run(served, client):
    studio, url, _ = served
    other = Client(url, verbose=False)
    job = client.submit(**settings_kwargs(steps=12, size=64, seed=41), api_name="/generate")
    _wait_locked(studio)
    assert other.predict(api_name="/stop") == "nothing of yours is running"
    png, _ = job.result(timeout=120)
    assert json.loads(Image.open(png).text["compose"])["seed"] == 41  # it finished
    job = client.submit(**settings_kwargs(steps=100, size=64), api_name="/generate")
    _wait_locked(studio)
    assert client.predict(api_name="/stop").startswith("stopping after the current step")
    with pytest.raises(Exception, match="cancelled after step"):
        job.result(timeout=60)


def test_model_and_folder_changes_are_operator_actions(served, client, tmp_path):
    assert operator_default("127.0.0.1", share=False) and not operator_default("127.0.0.1", share=True)
    assert not operator_default("0.0.0.0", share=False) and not operator_default("192.168.1.5", share=False)
    studio = served[0]
    before = (studio.composer, studio.library_rows())
    studio.operator = False  # as launch sets it for a studio served beyond loopback
    try:
        for endpoint, value in (("/load_model", "tiny:sdxl"), ("/add_folder", str(tmp_path)),
                                ("/add_folder", str(tmp_path / "missing"))):  # fmt: skip
            with pytest.raises(Exception, match="is an operator action: it changes the studio for everyone") as info:
                client.predict(value, api_name=endpoint)
            assert "no such folder" not in str(info.value)  # it reveals nothing about the server's folders
    finally:
        studio.operator = True
    assert (studio.composer, studio.library_rows()) == before


def test_loading_a_folder_waits_for_the_run(served, client, tmp_path, lora_files):
    studio = served[0]
    folder = tmp_path / "more"
    folder.mkdir()
    write(folder / "latecomer.safetensors", peft_state_dict(lora_files["sd1", 1]["parts"]))
    deadline = time.monotonic() + 120
    while studio.lock.locked() and time.monotonic() < deadline:  # an earlier test's run may still be ending
        time.sleep(0.05)
    job = client.submit(**settings_kwargs("klora", steps=60, size=64), api_name="/generate")
    _wait_locked(studio)
    loader = threading.Thread(target=studio.load_folder, args=(folder,))
    loader.start()
    time.sleep(0.2)
    assert studio.lock.locked() and "latecomer" not in studio.composer.loras  # it waits for the run
    job.result(timeout=120)  # the K-LoRA run finished on the layers it started with
    loader.join(60)
    assert "latecomer" in studio.composer.loras
    studio.composer.unload_lora("latecomer")


def test_messages_show_user_text_as_text(served, client, made, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    png = forge(made["png"], tmp_path / "evil.png", lambda r: r["loras"][0].update(name=evil, sha256="0" * 64))
    with pytest.raises(Exception) as info:
        client.predict(handle_file(png), api_name="/png_info")
    assert f"the image uses LoRA {evil}" in str(info.value)  # a script gets the text as it is
    from compose.app.studio import md
    from compose.app.ui import problem

    shown = problem(StudioError(str(info.value)))  # the page shows it as text, never as markup
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown and evil not in shown

    assert md("a_b [x](http://e) <b>") == r"a\_b \[x\](http://e) &lt;b&gt;"


def test_a_weight_that_is_not_a_number_is_a_message(client):
    with pytest.raises(Exception, match="the weight of random-character must be a number, got 'abc'"):
        client.predict(**settings_kwargs(weights={"random-character": "abc"}), api_name="/generate")
    with pytest.raises(Exception, match="the weight of 'random-character' must be between -100 and 100, got 1e"):
        client.predict(**settings_kwargs(weights={"random-character": 1e308}), api_name="/generate")


# -- 5. bombs -----------------------------------------------------------------------------


def test_size_and_steps_are_bounded_by_the_model(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY[:4], "--width", "4096", "--height", "4096",
                       "--out", tmp_path / "x.png")  # fmt: skip
    assert code == 2 and "width 4096 is over this model's limit of 256 px (8 x its native 32 px)" in err
    assert "--max-side" in err and "denoising" not in err
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY[:4], "--width", "64", "--height", "64",
                       "--max-side", "48", "--out", tmp_path / "x.png")  # fmt: skip
    assert code == 2 and "width 64 is over this model's limit of 48 px (--max-side)" in err
    # the note comes before the first step: here composite without a LoRA then stops the run at once
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY[:2], "--steps", "8", "--width", "256",
                       "--height", "256", "--method", "composite", "--out", tmp_path / "long.png")  # fmt: skip
    assert "note: this request costs about 20 times an ordinary image of this model (1 x 256x256, 8 steps" in err
    assert code == 2 and err.index("note: ") < err.index("needs at least one LoRA") and "denoising" not in err
    composer = Composer.tiny("sd1")
    with pytest.raises(ValueError, match="17 images in one call is over the limit of 16"):
        composer.generate("x", seed=list(range(17)), sampling=SamplingConfig(steps=1))
    composer.limits = Limits(max_steps=3)
    with pytest.raises(ValueError, match="steps 4 is over the limit of 3"):
        composer.generate("x", sampling=SamplingConfig(steps=4))


def _many_tensors(path: Path, count: int) -> Path:
    entries = ",".join(f'"unet.m{i}.lora_A.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
                       for i in range(count))  # fmt: skip
    header = ("{" + entries + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * count))
    return path


def test_a_lora_of_300k_tensors_is_refused_at_its_header(served, tmp_path):
    path = _many_tensors(tmp_path / "many.safetensors", 300_000)
    start = time.monotonic()
    with pytest.raises(LoRAError, match="many.safetensors: holds 300000 tensors, over the limit of 20000"):
        load_lora(path)
    assert time.monotonic() - start < 10
    studio = served[0]
    studio.max_upload_bytes, before = 2**30, studio.max_upload_bytes
    try:
        with pytest.raises(StudioError, match="many.safetensors: holds 300000 tensors"):
            studio.add_upload(path)
    finally:
        studio.max_upload_bytes = before
    assert not studio.lock.locked() and "many" not in studio.composer.loras


def test_a_sparse_6_gb_lora_is_refused_by_its_size(tmp_path, lora_files):
    path = tmp_path / "sparse.safetensors"
    path.write_bytes(lora_files["sd1", 0]["peft"].read_bytes())
    try:
        os.truncate(path, 6 * 2**30)
    except OSError as error:
        pytest.skip(f"no sparse files here: {error}")
    with pytest.raises(LoRAError, match="sparse.safetensors: 6144 MB is over the 2048 MB limit for a LoRA file"):
        load_lora(path)
    with pytest.raises(LoRAError, match="not a valid safetensors file"):  # raised, it reads the (broken) file
        load_lora(path, limits=Limits(max_lora_mb=8192))


# -- 6. oddly broken LoRA files -----------------------------------------------------------


def _peft(lora_files) -> dict:
    return peft_state_dict(lora_files["sd1", 0]["parts"])


def _first(state: dict) -> str:
    return sorted(k for k in state if k.endswith(".lora_A.weight"))[0]


def _rank0(state):
    key = _first(state)
    state[key] = torch.zeros(0, state[key].shape[1])
    state[key.replace("lora_A", "lora_B")] = torch.zeros(state[key.replace("lora_A", "lora_B")].shape[0], 0)


def _dims(n: int):
    def change(state):
        state[_first(state)] = torch.ones(()) if n == 0 else torch.ones(4)

    return change


def _meta(value: dict | list) -> dict:
    return {"lora_adapter_metadata": json.dumps(value)}


BROKEN = {
    "rank0": (_rank0, None, "has rank 0 \\(shape \\(0, 32\\)\\); a LoRA factor needs rank 1 or more"),
    "zero-d": (_dims(0), None, "has shape \\(\\); LoRA factors are 2-D \\(linear\\) or 4-D \\(convolution\\)"),
    "one-d": (_dims(1), None, "has shape \\(4,\\); LoRA factors are 2-D"),
    "alpha-string": (None, _meta({"unet.lora_alpha": "abc"}), "unet.lora_alpha must be a number, got 'abc'"),
    "pattern-list": (None, _meta({"unet.alpha_pattern": ["x"]}), "unet.alpha_pattern must be an object of module"),
    "pattern-regex": (None, _meta({"unet.alpha_pattern": {"(": 2}}), "'\\(' is not a valid pattern"),
    "metadata-list": (None, _meta([1, 2]), "metadata lora_adapter_metadata must be a JSON object, got list"),
    "tags-list": (
        None,
        {"ss_tag_frequency": "[1, 2]"},
        "metadata ss_tag_frequency must be a JSON object, got list; "
        "give the trigger words with triggers= or a sidecar JSON",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_oddly_broken_lora_files_name_the_file(tmp_path, lora_files, capsys, case):
    change, metadata, message = BROKEN[case]
    state = _peft(lora_files)
    if change is not None:
        change(state)
    path = write(tmp_path / f"{case}.safetensors", state, metadata)
    with pytest.raises(LoRAError, match=f"{case}.safetensors: .*{message}"):
        load_lora(path)
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--lora", path, "--out", tmp_path / "x.png")
    assert code == 2 and f"{case}.safetensors: " in err and "internal error" not in err


def test_kohya_alpha_that_is_not_one_number(tmp_path, lora_files):
    state = kohya_state_dict(lora_files["sd1", 0]["parts"], alpha=2.0)
    key = next(k for k in state if k.endswith(".alpha"))
    state[key] = torch.ones(3)
    with pytest.raises(LoRAError, match=f"kalpha.safetensors: tensor {key.replace('.', '[.]')} has shape \\(3,\\); "
                       "an alpha is one number"):  # fmt: skip
        load_lora(write(tmp_path / "kalpha.safetensors", state))


def test_sidecars_of_the_wrong_shape(tmp_path, lora_files):
    path = write(tmp_path / "side.safetensors", _peft(lora_files))
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({"triggers": "zorbo creature, blue fur"}))
    assert load_lora(path).triggers == ["zorbo creature", "blue fur"]  # not one trigger per letter
    assert load_lora(path, triggers="a knight").triggers == ["a knight"]
    wrong = [(["a"], "side.json: the sidecar must be a JSON object, got list"),
             ({"triggers": [1, 2]}, "side.json: 'triggers' must be a list of strings or a comma-separ"),
             ({"category": ["hat"]}, "side.json: 'category' must be a string, got \\['hat'\\]")]  # fmt: skip
    for data, message in wrong:
        sidecar.write_text(json.dumps(data))
        with pytest.raises(LoRAError, match=message):
            load_lora(path)
    sidecar.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(LoRAError, match="side.json: sidecar is nested too deeply"):
        load_lora(path)


def test_fp8_factors_are_upcast(tmp_path, lora_files):
    state = {k: v.to(torch.float8_e4m3fn) for k, v in _peft(lora_files).items()}
    lora = load_lora(write(tmp_path / "fp8.safetensors", state))
    module, factors = next(iter(lora.factors["unet"].items()))
    assert factors.down.dtype == torch.float32
    expected = state[f"unet.{module}.lora_A.weight"].float()
    torch.testing.assert_close(factors.down, expected)
    composer = Composer.tiny("sd1")
    composer.add_lora(lora)
    assert torch.isfinite(
        composer.generate("x", ["fp8"], sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE), run=AS_LATENTS)
    ).all()


# -- 7. non-finite and degenerate numbers ---------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--guidance", "nan"], "argument --guidance: nan is not a finite number between 0 and 100"),
        (["--lora-scale", "nan"], "argument --lora-scale: nan is not a finite number between -100 and 100"),
        (["--temperature", "0"], "argument --temperature: 0 is not a temperature (a number above 0; inf gives"),
        (["--seed", str(2**70)], f"argument --seed: {2**70} is not a seed (an integer in [0, 2**64))"),
        (["--top-k", "0"], "argument --top-k: 0 is not an integer of at least 1"),
        (["--lora", "x.safetensors:nan"], "x.safetensors:nan: the weight nan must be a finite number"),
        (["--lora", "x.safetensors:1e308"], "the weight 1e308 must be a finite number between -100 and 100"),
    ],
)
def test_the_command_line_refuses_degenerate_numbers(capsys, tmp_path, options, message):
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, *options, "--out", tmp_path / "x.png")
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling": SamplingConfig(steps=1, guidance_scale=float("nan"))}, "guidance_scale must be a finite number"),
        ({"lora_scale": float("inf")}, "lora_scale must be a finite number, got inf"),
        ({"loras": [("a", float("nan"))]}, "the weight of 'a' must be a finite number, got nan"),
        ({"loras": [("a", 1e308)]}, "the weight of 'a' must be between -100 and 100, got 1e"),
        ({"loras": [("a", "nan@0,1@1")]}, "weight nan is not a finite number"),
        ({"prompt": "x <lora:a:inf>"}, "<lora:a:inf>: the weight must be a finite number"),
        ({"loras": [("a", 1.0, "nan,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1")]}, "block weight BASE of 'a' must be a finite"),
        ({"sampling": SamplingConfig(steps=10000)}, "steps 10000 is over the limit of 1000"),
        ({"seed": 2**70}, "seed must be an integer in \\[0, 2\\*\\*64\\)"),
        ({"method": "patch", "method_params": {"temperature": 0}}, "patch temperature must be above 0"),
        ({"method": "klora", "method_params": {"top_k": 0}}, "klora top_k must be at least 1, got 0"),
        ({"method": "bands", "method_params": {"levels": 9}}, "bands levels 9 would halve a 16x16 latent below one"),
        ({"method": "switch", "method_params": {"tau": 2.5}}, "switch tau must be an integer, got 2.5"),
    ],
)
def test_the_api_refuses_degenerate_numbers(lora_files, kwargs, message):
    composer = Composer.tiny("sd1")
    composer.load_lora(lora_files["sd1", 0]["peft"], name="a")
    settings = {"prompt": "x", "loras": ["a"], "sampling": SamplingConfig(steps=1, width=SIZE, height=SIZE), **kwargs}
    with pytest.raises(ValueError, match=message):
        composer.generate(settings.pop("prompt"), **settings)


def test_levels_within_the_latent_still_run(capsys, tmp_path, lora_files):
    a, b = lora_files["sd1", 0]["peft"], lora_files["sd1", 1]["peft"]
    code, _, err = run(capsys, "generate", "--prompt", "x", *TINY, "--lora", a, "--lora", b, "--method", "bands",
                       "--levels", "9", "--out", tmp_path / "x.png")  # fmt: skip
    assert code == 2 and "bands levels 9 would halve a 16x16 latent below one pixel: at most 4" in err


# -- 8. smaller ----------------------------------------------------------------------------


def test_escape_sequences_never_reach_the_terminal(tmp_path, lora_files, made, capsys):
    hostile = "\x1b[2J\x1b]0;pwned\x07red"
    path = write(tmp_path / "esc.safetensors", _peft(lora_files), {"ss_output_name": hostile})
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and "\x1b" not in out and "\\x1b[2J\\x1b]0;pwned\\x07red" in out
    code, out, _ = run(capsys, "inspect", path, "--json")
    assert code == 0 and "\x1b" not in out and json.loads(out)["metadata"]["ss_output_name"] == hostile
    png = forge(made["png"], tmp_path / "e.png", lambda r: r["loras"][0].update(name=hostile, sha256="0" * 64))
    code, _, err = run(capsys, "generate", "--from-png", png, "--model", "tiny:sd1", "--out", tmp_path / "o.png")
    assert code == 2 and "\x1b" not in err and "\x07" not in err and "pass that file with --lora" in err
    assert err.count("\n") == 2  # the announcement and the error, no forged lines
    assert printable("a\nb\x00c\u2028") == "a\\nb\\x00c\\u2028"


def test_sigterm_stops_with_a_message(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "compose", "generate", "--prompt", "x", *TINY[:2], "--steps",
                                "900", "--width", "64", "--height", "64", "--out", str(tmp_path / "x.png")],
                               env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = ""
    while "denoising" not in seen:
        char = process.stderr.read(1)
        assert char, f"the run ended before it started: {seen}"
        seen += char
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 143
    assert "compose: terminated (SIGTERM); images already written are complete" in rest
    assert not list(tmp_path.iterdir())  # no image, no temporary file


def test_a_deeply_nested_manifest(tmp_path):
    manifest = tmp_path / "sets.json"
    manifest.write_text('{"loras": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ManifestError, match="sets.json: the JSON is nested too deeply to be a manifest"):
        load_manifest(manifest)
