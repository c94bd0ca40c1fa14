"""The fault matrix rows that no other test file provokes (docs/faults.md lists every row).

Each test provokes one fault, checks the exact message, and checks what must survive.
``-m soak`` selects the long ones (load); they also run in the ordinary suite.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, SIZE
from loras import peft_state_dict, write
from PIL import Image
from test_bench import bench_args, scores
from test_cli import run
from test_studio import settings_kwargs

from compose import Composer, LoRAError, SamplingConfig, load_lora
from compose.loop import OutOfMemory


def test_header_that_lies_about_shapes(tmp_path):
    header = json.dumps({"unet.x.lora_A.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}})
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    with pytest.raises(LoRAError, match="liar.safetensors: is not a valid safetensors file"):
        load_lora(path)


def test_integer_factors_are_refused(tmp_path, lora_files):
    state = peft_state_dict(lora_files["sd1", 0]["parts"])
    key = sorted(state)[0]
    state[key] = (state[key] * 100).to(torch.int8)
    with pytest.raises(LoRAError, match=f"tensor {key.replace('.', '[.]')} has dtype int8"):
        load_lora(write(tmp_path / "ints.safetensors", state))


def test_empty_and_overlong_prompts(capsys, tmp_path):
    composer = Composer.tiny("sd1")
    image = composer.generate("", sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))[0]
    assert json.loads(image.info["compose"])["prompt"] == ""
    long = "a cat " + "very " * 80 + "tail words"
    record = json.loads(
        composer.generate(long, sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE))[0].info["compose"]
    )
    assert record["prompt"] == long and record["prompt_chunks"] == 2 and "prompt_dropped" not in record
    code, _, err = run(capsys, "generate", "--prompt", long, "--steps", "1", "--width", "32", "--height", "32",
                       "--out", tmp_path / "long.png")  # fmt: skip
    assert code == 0 and "ignored" not in err


def test_out_of_memory_retries_in_smaller_chunks(lora_files, monkeypatch):
    composer = Composer.tiny("sd1")
    for i in range(3):
        composer.load_lora(lora_files["sd1", i]["peft"], name=f"l{i}")
    kwargs = dict(seed=2, method="composite", sampling=SAMPLING, run=AS_LATENTS)
    expected = composer.generate("a cat", list(composer.loras), **kwargs)
    unet = composer.pipeline.unet
    forward = unet.forward
    seen = []

    def small_memory(sample, *args, **kw):
        seen.append(sample.shape[0])
        if sample.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(sample, *args, **kw)

    monkeypatch.setattr(unet, "forward", small_memory)
    got = composer.generate("a cat", list(composer.loras), **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert seen[:4] == [6, 2, 2, 2]  # three branches, then halved to one per call

    def no_memory(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(unet, "forward", no_memory)
    with pytest.raises(OutOfMemory, match="even with one LoRA branch per UNet call"):
        composer.generate("a cat", list(composer.loras), **kwargs)


def test_unexpected_errors_are_one_line(capsys, monkeypatch):
    from compose import cli

    def boom(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(cli, "_inspect", boom)
    code, _, err = run(capsys, "inspect", "x.safetensors")
    assert code == 1 and err.count("\n") == 1 and "internal error: RuntimeError: something nobody expected" in err


@pytest.mark.soak
def test_two_benchmarks_writing_one_folder(bench_inputs, finished, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = [
        subprocess.Popen([sys.executable, "-m", "compose", *bench_args(bench_inputs, out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    assert scores(out) == pytest.approx(finished[1], abs=0.02)
    assert len(list((out / "items").glob("*/*.json"))) == 12 and not list(out.rglob("*.tmp"))


@pytest.mark.soak
def test_client_that_disconnects_mid_run(served):
    from gradio_client import Client

    studio, url, _ = served
    client = Client(url, verbose=False)
    client.submit(**settings_kwargs(steps=12, size=192), api_name="/generate")
    deadline = time.monotonic() + 30
    while not studio.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    client.close()
    deadline = time.monotonic() + 120
    while studio.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not studio.lock.locked(), "the run must finish or stop, and release the model"
    after = Client(url, verbose=False).predict(**settings_kwargs(seed=31), api_name="/generate")
    assert json.loads(Image.open(after[0]).text["compose"])["seed"] == 31


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


@pytest.mark.soak
def test_a_hundred_requests_in_a_row(served, capsys):
    from gradio_client import Client

    client = Client(served[1], verbose=False, download_files=False)
    failures, samples = 0, []
    for i in range(100):
        try:
            client.predict(**settings_kwargs(seed=1000 + i, steps=1, size=32), api_name="/generate")
        except Exception:
            failures += 1
        if i in (9, 99):
            samples.append(_rss_mib())
    growth = samples[1] - samples[0]
    with capsys.disabled():
        print(f"\n100 requests: {failures} failures, RSS after 10 {samples[0]:.0f} MiB, after 100 "
              f"{samples[1]:.0f} MiB (growth {growth:.0f} MiB)")  # fmt: skip
    assert failures == 0 and growth < 150


def test_lora_file_missing_when_a_run_resumes(bench_inputs, finished, tmp_path, capsys):
    """A LoRA file that disappears between two runs stops the resume before any work,
    naming the manifest entry; every finished item stays."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    for path in (out / "items" / "trio").glob("*.json"):
        path.unlink()
    data = json.loads(bench_inputs["sets"].read_text())
    data["loras"][2]["file"] = str(tmp_path / "gone.safetensors")
    manifest = tmp_path / "sets.json"
    manifest.write_text(json.dumps(data))
    code, _, err = run(capsys, *bench_args({**bench_inputs, "sets": manifest}, out))
    assert code == 2 and "sets.json" in err and "gone.safetensors" in err and "Traceback" not in err
    assert len(list((out / "items").glob("*/*.json"))) == 6
