"""The demo world's training script: every stage runs, resumes, and its output is a
pipeline, LoRAs, a CLIP and a benchmark manifest that the rest of the project loads."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from compose import Composer
from compose.composer import ModelLoadError
from compose.demo_world import CONCEPTS
from compose.demo_world.evaluate import demo_world_clip, load_demo_world
from compose.demo_world.train import SETS, STAGES, _PositionProbes, train
from compose.evaluation.bench import plan_items
from compose.evaluation.clipscore import CLIPScorer
from compose.evaluation.sets import COMPOSLORA_COUNTS, load_manifest


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    seen = []
    record = train(out, "quick", progress=lambda stage, step, steps, loss: seen.append(stage))
    return out, record, seen


def test_every_stage_runs_in_order_with_finite_losses(quick):
    out, record, seen = quick
    assert list(dict.fromkeys(seen)) == list(STAGES)
    assert np.isfinite([record["stages"][s]["final_loss"] for s in STAGES]).all()
    assert json.loads((out / "training.json").read_text())["stages"].keys() == set(STAGES)
    assert np.isfinite(record["stages"]["base"]["probe_loss"])


def test_a_rerun_skips_finished_stages(quick):
    out, record, _ = quick
    calls = []
    assert train(out, "quick", progress=lambda *a: calls.append(a))["stages"] == record["stages"]
    assert calls == []


def test_outputs_load_as_pipeline_loras_and_clip(quick):
    out, _, _ = quick
    composer = load_demo_world(out)
    assert set(composer.loras) == set(CONCEPTS)
    assert composer.generate("a red circle on the left", ["zorbo", "vosh"], steps=2)[0].size == (64, 64)
    scorer = CLIPScorer.from_folder(demo_world_clip(out), device="cpu")
    assert scorer.text_embeddings(["zorbo creature"]).shape == (1, 128)


def test_the_manifest_holds_the_240_composlora_sets(quick):
    out, _, _ = quick
    manifest = load_manifest(out / SETS)
    assert [sum(s.n == n for s in manifest.sets) for n in COMPOSLORA_COUNTS] == list(COMPOSLORA_COUNTS.values())
    first = manifest.sets[0]
    assert all(word in manifest.prompt_for(first) for word in manifest.triggers(first))


def test_unknown_preset_and_stage_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'gpu-xl'"):
        train(tmp_path, "gpu-xl")
    with pytest.raises(ValueError, match="unknown stage"):
        train(tmp_path, "quick", stages=("unet",))


def test_a_missing_demo_world_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSE_DEMO_WORLD", str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="compose demo-world train"):
        Composer.load("demo-world")


def test_a_quick_benchmark_keeps_every_lora_count(quick):
    out, _, _ = quick
    items = plan_items(load_manifest(out / SETS), ["merge", "composite"], seeds=1, per_n=3)
    assert sorted(Counter(item.set.n for item in items).items()) == [(n, 6) for n in COMPOSLORA_COUNTS]
    assert len({item.set.id for item in items}) == 12


def test_position_probes_read_every_cross_attention_input():
    from compose.tiny import tiny_pipeline

    unet = tiny_pipeline("sd1").unet
    probes = _PositionProbes(unet)
    layers = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert len(probes.probes) == len(layers) > 0
    latents = torch.randn(2, unet.config.in_channels, 16, 16)
    context = torch.randn(2, 5, unet.config.cross_attention_dim)
    unet(latents, 10, context)
    assert len(probes.features) == len(layers)
    loss = probes.loss()
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and probes.features == []
    assert all(p.weight.grad is not None for p in probes.probes.values())
