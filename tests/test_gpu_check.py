"""The GPU check (scripts/gpu_check.sh) as a bare GPU machine would run it, on the CPU.

The dry run goes through the same script, sections and files as the GPU run, in a
Python that sees only what that machine has (torch, transformers, peft, accelerate,
safetensors and their dependencies) plus the wheels of scripts/gpu-wheels.txt: the run
passing shows that the list is enough, and the distributions it imported show that
every wheel is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ON_THE_GPU_MACHINE = ("torch", "transformers", "peft", "accelerate", "safetensors")
"""What the lent GPU machine has installed (with their dependencies)."""


def wheels() -> dict[str, str]:
    """scripts/gpu-wheels.txt: canonical distribution name -> module."""
    lines = (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines()
    entries = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(Requirement(req).name): module for req, module in entries}


def closure(names) -> set[str]:
    """The installed distributions ``names`` need, with theirs, recursively (no extras)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        seen.add(name)
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def bare_site(folder: Path, names: set[str]) -> Path:
    """A site folder of links to the installed files of the distributions ``names`` only."""
    folder.mkdir()
    for name in sorted(names):
        dist = distribution(name)
        for top in {f.parts[0] for f in dist.files or []}:
            target = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and target.exists():
                link = folder / top
                if not link.exists():
                    link.symlink_to(target)
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, float, str]:
    """``bash scripts/gpu_check.sh --dry-run`` in a Python without its site-packages
    (``-S``) on a site of the GPU machine's distributions and the wheel list's: the
    report, the wall time and the output. The budget is raised so that a loaded machine
    runs every section."""
    root = tmp_path_factory.mktemp("gpu-check")
    site = bare_site(root / "site", closure(ON_THE_GPU_MACHINE) | set(wheels()))
    python = root / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHON": str(python), "PYTHONPATH": str(site), "GPU_CHECK_SITE": str(root / "installed")}
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "600", "--out", str(root)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((root / "speed-gpu.json").read_text()), seconds, done.stdout


def test_the_dry_run_runs_every_section_and_finds_the_engine_exact(dry_run):
    report, seconds, output = dry_run
    sections = report["sections"]
    assert list(sections) == ["exactness", "sd15-512", "sdxl-1024", "memory", "generation", "compiled",
                              "sd15-512-r64", "sdxl-512", "sd15-1024"]  # fmt: skip
    assert all(s["status"] == "done" for s in sections.values()), {k: s.get("reason") for k, s in sections.items()}
    checks = sections["exactness"]["result"]["checks"]
    assert len(checks) == 13 and all(c["ok"] for c in checks)
    agreement = sections["sdxl-1024"]["result"]["agreement"]
    assert {a["method"] for a in agreement} == {"merge", "composite"} and max(a["relative"] for a in agreement) < 1e-4
    assert any(r["config"] == "compiled composite" for r in sections["compiled"]["result"]["rows"])
    assert [r["max_batch"] for r in sections["memory"]["result"]["rows"]][-1] == 2
    assert "| composite vs diffusers' sequential passes | 3 |" in output and "one LoRA vs diffusers" in output
    print(f"dry run: {seconds:.0f} s")


def test_the_wheels_are_exactly_what_the_check_imports_beyond_the_gpu_machine(dry_run):
    report, _, _ = dry_run
    imported = {canonicalize_name(name) for name in report["environment"]["imported"]}
    project = "compose-lora"  # the source tree itself (its egg-info lies beside it)
    assert imported - closure(ON_THE_GPU_MACHINE) - {project} == set(wheels())
    assert not {"open-clip-torch", "gradio", "torchvision"} & imported


def test_the_check_reaches_neither_the_studio_nor_the_evaluation(dry_run):
    """So the source tree on PYTHONPATH is enough: no package-dir mapping (compose.app ->
    app/, compose.evaluation -> evaluation/) is needed."""
    report, _, _ = dry_run
    assert {"composer", "speed", "full_size"} <= set(report["environment"]["compose"])
    assert not {"app", "evaluation"} & set(report["environment"]["compose"])


def test_the_wheel_list_names_each_module_it_provides():
    for name, module in wheels().items():
        assert importlib.util.find_spec(module) is not None, (name, module)
    fetch = (ROOT / "scripts" / "fetch_wheels.sh").read_text()
    assert "gpu-wheels.txt" in fetch and "--python-version 3.12" in fetch and "manylinux2014_x86_64" in fetch


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_section_is_skipped_when_the_budget_cannot_cover_it(tmp_path, capsys):
    gpu_check = _module()
    ran = []
    section = gpu_check.Section("s", "A section", lambda run: ran.append(run) or {}, gpu_s=100, dry_s=5)
    run = gpu_check.Run(torch.device("cpu"), gpu_check.DRY, time.perf_counter() + 3, tmp_path)
    entry = gpu_check._run_section(run, section, dry=True)
    assert entry["status"] == "skipped" and "about 5 s needed" in entry["reason"] and not ran
    assert "A section: skipped" in capsys.readouterr().out
    run.end = time.perf_counter() + 10
    assert gpu_check._run_section(run, section, dry=True)["status"] == "done" and ran
