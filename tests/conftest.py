"""Shared fixtures: tiny pipelines, LoRA files in every format, diffusers references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).parent))

from loras import kohya_state_dict, lora_parts, peft_state_dict, write  # noqa: E402

from compose import Composer, RunOptions, SamplingConfig  # noqa: E402
from compose.schedulers import make_scheduler  # noqa: E402
from compose.tiny import tiny_pipeline  # noqa: E402

FIXTURES = Path(
    os.environ.get("COMPOSE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "loras")
)
SIZE = 32
STEPS = 4
SAMPLING = SamplingConfig(steps=STEPS, width=SIZE, height=SIZE)
"""The tests' usual generation: :data:`STEPS` steps at :data:`SIZE` px."""
AS_LATENTS = RunOptions(output_type="latent")
"""A run that returns the final latents, which the exactness tests compare."""

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real LoRA fixtures not found at {FIXTURES} (../shared/fixtures/loras)")
    return FIXTURES


@pytest.fixture(scope="session", params=["sd1", "sdxl"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory) -> dict:
    """Per family, three random LoRAs (UNet attention + text encoders), each saved as
    diffusers/PEFT and as kohya (alpha != rank) files; plus their factors."""
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for fam in ("sd1", "sdxl"):
        pipe = tiny_pipeline(fam)
        for i in range(3):
            parts = lora_parts(pipe, seed=10 * i + 1)
            files[fam, i] = {
                "parts": parts,
                "peft": write(root / f"{fam}_{i}_peft.safetensors", peft_state_dict(parts)),
                "kohya": write(root / f"{fam}_{i}_kohya.safetensors", kohya_state_dict(parts, alpha=2.0)),
            }
    return files


def reference_pipeline(fam: str, loras: list[tuple[str, dict]]):
    """A diffusers pipeline with PEFT adapters ``name`` from each LoRA's parts."""
    pipe = tiny_pipeline(fam)
    for name, parts in loras:
        pipe.load_lora_weights(peft_state_dict(parts), adapter_name=name)
    pipe.scheduler = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_loop(
    pipe, prompt: str, passes, guidance: float = 7.5, seed: int = 3, mix=None, steps: int = STEPS
) -> torch.Tensor:
    """The references' sampling loop written out with diffusers parts: per step ``i``,
    for each setup in ``passes(i)`` run the setup (switch adapters, patch weights...),
    then one batch-2 UNet pass; the unconditional and conditional predictions are
    averaged over the passes (weighted by ``mix(i)`` if given) before guidance. The
    prompt is encoded with whatever the text encoder carries when this is called."""
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    ehs = torch.cat([uncond, cond])
    sched = make_scheduler("dpm++2m", dict(pipe.scheduler.config))
    sched.set_timesteps(steps)
    latents = randn_tensor((1, 4, SIZE // 2, SIZE // 2), generator=generator(seed)) * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            us, cs = [], []
            for setup in passes(i):
                setup()
                u, c = pipe.unet(x, t, encoder_hidden_states=ehs).sample.chunk(2)
                us.append(u)
                cs.append(c)
            w = torch.full((len(us),), 1 / len(us)) if mix is None else torch.tensor(mix(i))
            w = w.view(-1, 1, 1, 1, 1)
            u, c = (w * torch.stack(us)).sum(0), (w * torch.stack(cs)).sum(0)
            latents = sched.step(u + guidance * (c - u), t, latents).prev_sample
    return latents


@pytest.fixture
def composer_factory():
    def make(fam: str = "sd1") -> Composer:
        return Composer.tiny(fam)

    return make


@pytest.fixture(scope="session")
def bench_inputs(tmp_path_factory, lora_files) -> dict:
    """A manifest of three tiny LoRAs in two sets, and a tiny CLIP folder."""
    import json

    from test_clipscore import tiny_scorer

    root = tmp_path_factory.mktemp("bench")
    loras = [
        {"name": name, "file": str(lora_files["sd1", i]["peft"]), "category": name, "triggers": [f"zq{name}"]}
        for i, name in enumerate(("character", "style", "background"))
    ]
    sets = [
        {"id": "pair", "loras": ["character", "style"], "prompt": "a creature"},
        {"id": "trio", "loras": ["character", "style", "background"], "prompt": "a creature outside"},
    ]
    manifest = root / "sets.json"
    manifest.write_text(json.dumps({"loras": loras, "sets": sets, "prompt_prefix": "a picture"}))
    tiny_scorer(root / "clip").save(root / "clip")
    return {"sets": manifest, "clip": root / "clip"}


@pytest.fixture(scope="session")
def finished(bench_inputs, tmp_path_factory) -> tuple:
    """One uninterrupted benchmark run in-process: its folder and its scores."""
    from test_bench import bench_args, scores

    from compose.cli import main

    out = tmp_path_factory.mktemp("run") / "out"
    try:
        code = main(bench_args(bench_inputs, out))
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    return out, scores(out)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """The studio on the tiny model, served on a free loopback port: (studio, url, folder)."""
    import socket

    from test_clipscore import tiny_scorer

    from compose.app.ui import launch, make_studio

    root = tmp_path_factory.mktemp("studio")
    tiny_scorer(root / "clip").save(root / "clip")
    studio = make_studio("tiny:sd1", root / "library", clip=str(root / "clip"), max_upload_mb=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = launch(studio, port=port, block=False)
    yield studio, page.local_url, root
    page.close()


def run(capsys, *argv) -> tuple[int, str, str]:
    """The CLI in this process: ``(exit status, stdout, stderr)``."""
    from compose.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
