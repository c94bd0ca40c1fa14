"""The demo world's training script: every stage runs, resumes (between stages and
within one), never replaces another world silently, and its output is a pipeline,
LoRAs, a CLIP and a benchmark manifest that the rest of the project (and plain
diffusers) loads."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compose import Composer, SamplingConfig
from compose.composer import ModelLoadError
from compose.demo_world import CONCEPTS
from compose.demo_world import train as training
from compose.demo_world.train import STAGES, _PositionProbes, train
from compose.demo_world.world import CEILING, SETS, demo_world_clip, lora_path
from compose.evaluation.bench import plan_items
from compose.evaluation.clipscore import CLIPScorer
from compose.evaluation.sets import COMPOSLORA_COUNTS, load_manifest
from compose.loading import load_lora


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    seen = []
    record = train(out, "quick", progress=lambda stage, step, steps, loss: seen.append(stage), jobs=2)
    return out, record, seen


def test_every_stage_runs_in_order_with_finite_losses(quick):
    out, record, seen = quick
    assert [s for s in dict.fromkeys(seen) if ":" not in s] == ["vae", "base", "refine", "refine-2", "loras", "clip"]
    assert np.isfinite([record["stages"][s]["final_loss"] for s in STAGES]).all()
    assert json.loads((out / "training.json").read_text())["stages"].keys() == set(STAGES)
    assert np.isfinite(record["stages"]["base"]["probe_loss"])
    assert not (out / training.CHECKPOINTS).exists() or not any((out / training.CHECKPOINTS).iterdir())


def test_a_rerun_skips_finished_stages(quick):
    out, record, _ = quick
    calls = []
    assert train(out, "quick", progress=lambda *a: calls.append(a))["stages"] == record["stages"]
    assert calls == []


def test_a_world_of_another_preset_is_replaced_only_with_force(quick):
    out, _, _ = quick
    with pytest.raises(ValueError, match="holds a demo world trained with preset 'quick'.*--force"):
        train(out, "cpu")


class Interrupted(Exception):
    pass


def _interrupt_the_vae(out, monkeypatch) -> None:
    """Train ``out``'s vae stage and stop it at step 3, checkpointing every step."""
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)

    def stop_at_three(stage: str, step: int, steps: int, loss: float) -> None:
        if stage == "vae" and step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(out, "quick", ("vae",), stop_at_three)


def test_an_interrupted_stage_resumes_exactly_where_it_stopped(tmp_path, monkeypatch):
    _interrupt_the_vae(tmp_path / "resumed", monkeypatch)
    assert (tmp_path / "resumed" / training.CHECKPOINTS / "vae.pt").is_file()
    steps = []
    train(tmp_path / "resumed", "quick", ("vae",), lambda stage, step, n, loss: steps.append((stage, step)))
    assert [s for s in steps if s[0] == "vae"][0] == ("vae", 2)
    train(tmp_path / "straight", "quick", ("vae",))
    resumed, straight = (load_file(tmp_path / f / "vae" / "diffusion_pytorch_model.safetensors")
                         for f in ("resumed", "straight"))  # fmt: skip
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_a_checkpoint_of_other_settings_is_set_aside_not_continued(tmp_path, monkeypatch):
    """Editing a preset between two runs must not resume the old recipe's half-trained
    state under the new one: the checkpoint is kept aside and the stage starts at step 0."""
    _interrupt_the_vae(tmp_path, monkeypatch)
    edited = training.training_config()
    edited["presets"]["quick"]["vae"]["lr"] *= 2
    monkeypatch.setattr(training, "training_config", lambda: edited)
    steps = []
    with pytest.warns(UserWarning, match="saved under other settings"):
        train(tmp_path, "quick", ("vae",), lambda stage, step, n, loss: steps.append((stage, step)))
    assert [s for s in steps if s[0] == "vae"][0] == ("vae", 1)
    assert (tmp_path / training.CHECKPOINTS / "vae.stale.pt").is_file()


def _without_loras(out, world) -> None:
    shutil.copytree(out, world)
    record = json.loads((world / "training.json").read_text())
    del record["stages"]["loras"]
    (world / "training.json").write_text(json.dumps(record))


def test_the_loras_resume_inside_one_lora_and_skip_the_finished_ones(quick, tmp_path, monkeypatch):
    """Each LoRA trains alone with its own checkpoint: a run stopped inside the second
    LoRA keeps the first, continues the second from its last checkpoint (written every
    step here), and every file comes out byte for byte as in the uninterrupted run, and
    as in the fixture's run of two processes (on as many threads each as here)."""
    out, _, _ = quick
    world, straight = tmp_path / "world", tmp_path / "straight"
    _without_loras(out, world)
    _without_loras(out, straight)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    steps = training.training_config()["presets"]["quick"]["loras"]["steps"]

    def stop_inside_the_second(stage: str, step: int, total: int, loss: float) -> None:
        if stage == "loras" and step == steps + 2:
            raise Interrupted

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        with pytest.raises(Interrupted):
            train(world, "quick", ("loras",), stop_inside_the_second, jobs=1)
        seen = []
        train(world, "quick", ("loras",), lambda stage, step, total, loss: seen.append((stage, step, total)), jobs=1)
        train(straight, "quick", ("loras",), jobs=1)
    finally:
        torch.set_num_threads(threads)
    names = [*CONCEPTS, CEILING]
    assert [s for s in seen if s[0] == "loras"][0] == ("loras", steps + 1, len(names) * steps)
    for name in names:
        resumed, alone, in_two = (load_file(lora_path(w, name)) for w in (world, straight, out))
        assert resumed.keys() == alone.keys() == in_two.keys()
        assert all(torch.equal(resumed[k], alone[k]) and torch.equal(in_two[k], alone[k]) for k in alone), name
    assert not (world / training.CHECKPOINTS / "loras").exists()


def test_refining_the_base_continues_it_and_makes_the_loras_stale(quick, tmp_path):
    """``refine`` runs its segments one after another, each continuing the saved base (from
    its weights, not from scratch); a world with fewer segments than its preset asks for
    (such as one shipped before the preset grew) trains only the missing ones, and that
    discards the LoRAs trained on the old base, so a later run trains them again."""
    out, _, _ = quick
    world = tmp_path / "world"
    shutil.copytree(out, world)
    record = json.loads((world / "training.json").read_text())
    first, second = record["stages"]["refine"]["segments"]
    assert record["stages"]["refine"]["seconds"] == pytest.approx(first["seconds"] + second["seconds"], abs=0.11)
    record["stages"]["refine"] = first
    (world / "training.json").write_text(json.dumps(record))
    before = load_file(world / "unet" / "diffusion_pytorch_model.safetensors")
    seen = []
    after = train(world, "quick", ("refine",), lambda stage, step, steps, loss: seen.append(stage))
    assert [s for s in dict.fromkeys(seen) if ":" not in s] == ["refine-2"]
    assert "loras" not in after["stages"] and "clip" in after["stages"]
    assert [s["final_loss"] for s in after["stages"]["refine"]["segments"]][0] == first["final_loss"]
    assert len(after["stages"]["refine"]["segments"]) == 2
    refined = load_file(world / "unet" / "diffusion_pytorch_model.safetensors")
    change = max((refined[k].float() - before[k].float()).abs().max().item() for k in before)
    scale = max(before[k].float().abs().max().item() for k in before)
    assert 0 < change < scale, "refined weights must move, from the saved ones"
    seen.clear()
    train(world, "quick", progress=lambda stage, step, steps, loss: seen.append(stage))
    assert [s for s in dict.fromkeys(seen) if ":" not in s] == ["loras"]


def test_a_new_world_version_trains_the_clip_again(quick, tmp_path):
    """A CLIP trained on another world version's renders is trained again, and only it."""
    out, _, _ = quick
    world = tmp_path / "world"
    shutil.copytree(out, world)
    record = json.loads((world / "training.json").read_text())
    assert record["stages"]["clip"]["world"] == training.WORLD_VERSION
    record["stages"]["clip"]["world"] = training.WORLD_VERSION - 1
    (world / "training.json").write_text(json.dumps(record))
    seen = []
    after = train(world, "quick", progress=lambda stage, step, steps, loss: seen.append(stage))
    assert [s for s in dict.fromkeys(seen) if ":" not in s] == ["clip"]
    assert after["stages"]["clip"]["world"] == training.WORLD_VERSION


def test_outputs_load_as_pipeline_loras_and_clip(quick):
    out, _, _ = quick
    composer = Composer.bundled("demo-world", out)
    assert list(composer.loras) == list(CONCEPTS), "a trained world's LoRAs load in the concepts' order"
    image = composer.generate("a red circle on the left", ["zorbo", "vosh"], sampling=SamplingConfig(steps=2))[0]
    assert image.size == (64, 64)
    scorer = CLIPScorer.from_folder(demo_world_clip(out), device="cpu")
    assert scorer.text_embeddings(["zorbo creature"]).shape == (1, 128)
    ceiling = load_lora(lora_path(out, CEILING))
    assert all(c.trigger in ceiling.triggers[0] for c in CONCEPTS.values())


def test_loras_carry_the_metadata_other_tools_read(quick):
    out, _, _ = quick
    from safetensors import safe_open

    with safe_open(lora_path(out, "flimbo"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.trigger_phrase"] == "flimbo hat" and len(metadata["sshs_model_hash"]) == 64


def test_a_bare_diffusers_call_loads_the_world_in_one_dtype(quick):
    from diffusers import StableDiffusionPipeline

    out, _, _ = quick
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    assert {pipeline.unet.dtype, pipeline.text_encoder.dtype, pipeline.vae.dtype} == {torch.float32}
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle on the left, white background", num_inference_steps=2, height=64, width=64)
    assert image.images[0].size == (64, 64)


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


def test_the_slot_maps_cover_the_other_slots_and_never_the_concepts_own():
    from compose.demo_world import render_layers, sample_concept_scene

    for name in ("zorbo", "wuzzle", "brakka", "vosh", "dottix"):
        scenes = [sample_concept_scene(name, seed) for seed in range(4)]
        others = training._other_slots(scenes, name)
        assert others.shape == (4, 1, 16, 16) and set(others.unique().tolist()) <= {0.0, 1.0}
        for scene, cells in zip(scenes, others[:, 0], strict=True):
            _, masks = render_layers(scene)
            own = CONCEPTS[name].slot
            if own == "style":
                assert not cells.any()  # a style is everywhere: no cell is another slot's
                continue
            drawn = {slot: torch.from_numpy(m).float()[None, None] for slot, m in masks.items()}
            pool = torch.nn.functional.max_pool2d
            edge = pool(pool(drawn[own], 4), 3, stride=1, padding=1)[0, 0] if own in drawn else None
            for slot, mask in drawn.items():
                covered = torch.nn.functional.avg_pool2d(mask, 4)[0, 0]
                if slot == own:
                    assert not cells[covered > 0].any()  # every cell of the concept learns from the picture
                elif own != "background":
                    assert cells[(covered == 1) & (edge == 0)].all()  # another slot's, beyond the concept's edge
            if own == "background":
                union = sum(drawn.values()).clamp(max=1)
                assert cells[torch.nn.functional.avg_pool2d(union, 4)[0, 0] == 1].all()
                assert not cells[torch.nn.functional.avg_pool2d(union, 4)[0, 0] == 0].any()


def test_where_keep_is_one_the_target_is_the_teachers_prediction():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    models = training.training_config()["models"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**models["unet"]).eval()
    scheduler = DDPMScheduler.from_config(models["scheduler"])
    latents, context = torch.randn(2, 12, 16, 16), torch.randn(2, 77, 128)
    keep = torch.ones(2, 1, 16, 16)

    def teacher(noisy, t):
        return unet(noisy, t, context).sample

    def loss(weight=None, keep_below=1.0):
        torch.manual_seed(1)  # the same noise and timesteps for every call
        with torch.no_grad():
            return training._diffusion_loss(unet, scheduler, latents, context, 0.0, keep, teacher, weight, keep_below)

    taught = loss()
    keep[:, :, :8] = 0  # the upper half learns from the picture again
    half = loss()
    assert taught.abs().max() < 1e-6 and (half > 1e-3).all()
    # the lower half (no error: the teacher's own prediction) weighs 2, the weights average 1.5
    assert torch.allclose(loss(1 + keep), half / 1.5, rtol=1e-5)
    # above keep_below of the schedule the picture is the target everywhere
    torch.manual_seed(1)
    torch.randn_like(latents)  # the loss draws its noise, then its timesteps
    t = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
    plain = loss(keep_below=0.0)
    below = loss(keep_below=(t.max().item() + 1) / scheduler.config.num_train_timesteps)
    assert torch.allclose(below, half) and (plain > half).all()
