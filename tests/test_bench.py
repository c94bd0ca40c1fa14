"""``compose bench --sets``: a small run, resume, kill and resume, two processes, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_cli import run

from compose.evaluation.report import GRID_TILE

METHODS = "merge,composite,klora"


def bench_args(inputs: dict, out, seeds: int = 2, methods: str = METHODS) -> list[str]:
    return [
        "bench", "--sets", str(inputs["sets"]), "--methods", methods, "--seeds", str(seeds), "--model", "tiny:sd1",
        "--clip", str(inputs["clip"]), "--steps", "2", "--size", "32", "--out", str(out),
    ]  # fmt: skip


def scores(out) -> dict[str, float]:
    return {
        f"{r['set']}/{r['method']}-{r['seed']}": r["clipscore"]
        for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
    }


def test_a_small_run_writes_everything(finished):
    out, results = finished
    assert len(results) == 2 * 2 * 3
    records = [json.loads(p.read_text()) for p in (out / "items").glob("*/*.json")]
    assert len(records) == 12
    for record in records:
        assert {"set", "method", "seed", "n", "clipscore", "seconds", "image"} <= record.keys()
        assert 0 <= record["clipscore"] <= 100 and record["seconds"] > 0
        with Image.open(out / record["image"]) as image:
            meta = json.loads(image.text["compose"])
        assert meta["method"]["name"] == record["method"] and meta["seed"] == record["seed"]
        assert meta["prompt"].startswith("a picture, a creature")
    summary = (out / "summary.md").read_text()
    assert "| klora |" in summary and "N=2" in summary and "N=3" in summary
    assert "Win rate against merge on CLIPScore" in summary
    assert len((out / "results.csv").read_text().splitlines()) == 13
    for name in ("clipscore.png", "seconds.png"):
        assert Image.open(out / "plots" / name).size[0] > 300
    with Image.open(out / "grids" / "trio.png") as grid:
        assert grid.size[0] == 3 * GRID_TILE and 2 * GRID_TILE < grid.size[1] < 3 * GRID_TILE
        header = np.asarray(grid.convert("L"))[:20]
        assert (header < 128).any(), "the set's prompt is written above the images"


def test_rerun_skips_finished_work(bench_inputs, finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    removed = sorted((out / "items" / "pair").glob("composite-*.json"))
    for path in removed:
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "items").glob("*/*.json")}
    code, _, err = run(capsys, *bench_args(bench_inputs, out))
    assert code == 0, err
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert all(p.exists() for p in removed)
    assert scores(out) == finished[1]


def _subprocess_bench(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.soak
def test_kill_halfway_then_resume(bench_inputs, finished, tmp_path):
    out = tmp_path / "out"
    process = _subprocess_bench([sys.executable, "-m", "compose", *bench_args(bench_inputs, out)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "items").glob("*/*.json"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((out / "items").glob("*/*.json")))
    assert 3 <= done < 12, "the kill must land in the middle of the run"
    resumed = _subprocess_bench([sys.executable, "-m", "compose", *bench_args(bench_inputs, out)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert scores(out) == finished[1]
    assert not list(out.rglob("*.tmp"))


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29518"],
}  # fmt: skip


@pytest.mark.soak
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_give_the_same_records(bench_inputs, finished, tmp_path, launcher):
    """The README's sharding commands, as written there, on this GPU-less machine: two
    processes that each take half of the items (the bars name process 1/2 and 2/2)."""
    out = tmp_path / "out"
    process = _subprocess_bench([*LAUNCHERS[launcher], "-m", "compose", *bench_args(bench_inputs, out)])
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert "[1/2]" in output and "[2/2]" in output
    # torchrun gives each process one thread, so float sums run in another order
    assert scores(out) == pytest.approx(finished[1], abs=0.02)


def test_grid_rebuilds(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "grids")
    (out / "summary.md").unlink()
    code, stdout, err = run(capsys, "grid", out)
    assert code == 0, err
    assert (out / "grids" / "pair.png").exists() and (out / "summary.md").exists()


def test_bad_input_gets_a_clear_message(bench_inputs, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"loras": [')
    code, _, err = run(capsys, *bench_args({**bench_inputs, "sets": broken}, tmp_path / "o"))
    assert code == 2 and "broken.json" in err and "line 1" in err and "Traceback" not in err

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run(capsys, *bench_args(bench_inputs, blocker / "out"))
    assert code == 2 and "not writable" in err

    code, _, err = run(capsys, *bench_args(bench_inputs, tmp_path / "o", methods="merge,nonsense"))
    assert code == 2 and "unknown method nonsense" in err


def test_disk_full_keeps_what_was_finished(bench_inputs, finished, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run(capsys, *bench_args(bench_inputs, out))
    assert code == 2 and "No space left on device" in err
    finished_records = list((out / "items").glob("*/*.json"))
    assert 1 <= len(finished_records) < 12 and not list(out.rglob("*.tmp"))
    for path in finished_records:
        json.loads(path.read_text())
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, _, err = run(capsys, *bench_args(bench_inputs, out))
    assert code == 0, err
    assert scores(out) == finished[1]


def test_a_routed_item_keeps_a_picture_of_its_regions(bench_inputs, tmp_path, capsys):
    from compose.cli import main

    manifest = json.loads(bench_inputs["sets"].read_text())
    for entry in manifest["sets"]:
        entry["prompt"] = "a zqcharacter creature in zqbackground, zqstyle"
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps(manifest))
    out = tmp_path / "routed"
    assert main(bench_args({**bench_inputs, "sets": sets}, out, seeds=1, methods="routed,merge")) == 0
    records = {(r["set"], r["method"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    routed = records["trio", "routed"]
    assert "regions" not in records["trio", "merge"]
    with Image.open(out / routed["regions"]) as regions, Image.open(out / routed["image"]) as image:
        assert regions.size == image.size
        inset = np.asarray(regions.convert("RGB").resize((GRID_TILE // 3,) * 2, Image.Resampling.NEAREST))
    with Image.open(out / "grids" / "trio.png") as grid:
        assert grid.size[0] == 2 * GRID_TILE
        sheet = np.asarray(grid.convert("RGB"))
    side, right = inset.shape[0], GRID_TILE - 1  # routed is the first column
    corner = sheet[:, right - side : right]
    found = [y for y in range(sheet.shape[0] - side) if np.array_equal(corner[y : y + side], inset)]
    assert found, "the regions sit in the top-right corner of routed's tile"


def test_a_method_variant_runs_beside_its_method(bench_inputs, tmp_path, capsys):
    """``klora+reference`` is K-LoRA as released (its rules and its LoRA weight 1) and
    ``klora+scale=s*`` one of its options, each under its own name beside ``klora`` at the
    default 0.8; a misspelt option or a bad value is named before any work."""
    from compose.cli import main

    out = tmp_path / "variants"
    methods = "klora,klora+reference,klora+scale=s*"
    assert main(bench_args(bench_inputs, out, seeds=1, methods=methods)) == 0
    records = {(r["set"], r["method"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert {m for _, m in records} == set(methods.split(","))
    assert ("trio", "klora+reference") not in records, "the released K-LoRA composes one content and one style LoRA"
    assert "klora+reference skips 1 set(s): K-LoRA reference=True composes exactly one" in capsys.readouterr().err
    meta = {}
    for method in methods.split(","):
        with Image.open(out / records["pair", method]["image"]) as image:
            meta[method] = json.loads(image.text["compose"])
    assert records["pair", "klora+scale=s*"]["image"].endswith("klora+scale=s~-0.png")
    assert all(m["method"]["name"] == "klora" for m in meta.values())
    assert meta["klora+reference"]["method"]["parameters"]["reference"] is True
    assert meta["klora+scale=s*"]["method"]["parameters"]["scale"] == "s*"
    assert meta["klora"]["method"]["parameters"]["scale"] == "s"
    assert [meta[m]["lora_scale"] for m in methods.split(",")] == [0.8, 1.0, 0.8]
    assert "| klora+reference |" in (out / "summary.md").read_text()

    for bad, says in (("klora+refrence", "no option 'refrence'"), ("klora+scale=q", "scale must be one of"),
                      ("klora+top_k=many", "top_k takes int | None, not 'many'")):  # fmt: skip
        code, _, err = run(capsys, *bench_args(bench_inputs, tmp_path / "o", methods=bad))
        assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
