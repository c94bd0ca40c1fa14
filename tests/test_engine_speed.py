"""Engine speed without timing: folding is exact and restored bit for bit, active-only
factors give the dense form's images, the compiled UNet neither breaks its graph nor
recompiles across LoRA swaps, the NaN check names the first bad step without a
per-step read, start-up imports no torch, and the speed benchmark's rows."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import AS_LATENTS, SIZE, STEPS
from loras import lora_parts, peft_state_dict, write
from torch._dynamo.utils import counters

from compose import Composer, NonFiniteLatentsError, SamplingConfig
from compose.layers import ComposableLayer
from compose.methods import METHODS, KLoRA, Switch
from compose.speed import SHALLOW, run_speed_benchmark, summary_markdown, to_markdown, world_speed
from compose.tiny import tiny_pipeline

CATEGORIES = ("character", "style", "background")
PROMPT = "a cat wearing a hat"


def load_trio(lora_files, compile=False) -> Composer:
    composer = Composer.tiny("sd1", compile=compile)
    for i, category in enumerate(CATEGORIES):
        composer.load_lora(lora_files["sd1", i]["peft"], name=category, category=category)
    return composer


@pytest.fixture(scope="module")
def trio(lora_files) -> Composer:
    return load_trio(lora_files)


def gen(composer: Composer, loras, method="merge", steps=STEPS, run=AS_LATENTS, **kwargs) -> torch.Tensor:
    sampling = SamplingConfig(steps=steps, width=SIZE, height=SIZE)
    return composer.generate(PROMPT, loras=loras, method=method, seed=3, sampling=sampling, run=run, **kwargs)


@torch.no_grad()
def pixels(composer: Composer, latents: torch.Tensor) -> torch.Tensor:
    """The decoded image in [0, 1], before quantisation to 8 bits."""
    vae = composer.pipeline.vae
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return composer.pipeline.image_processor.postprocess(image, output_type="pt")


def modes(composer: Composer, sliced: bool, fold: bool) -> None:
    for registry in composer.registries.values():
        registry.state.sliced, registry.state.fold = sliced, fold


def unet_layers(composer: Composer) -> list[ComposableLayer]:
    return list(composer.registries["unet"].layers.values())


METHOD_CASES = [
    ("merge", None),
    ("switch", {"tau": 1}),
    ("composite", None),
    ("klora", None),
    ("cmlora", {"ordering": "category"}),
    ("patch", None),
]


@pytest.mark.parametrize(("method", "params"), METHOD_CASES)
def test_active_only_and_folded_forms_equal_the_dense_one(trio, method, params):
    names = list(CATEGORIES)
    try:
        modes(trio, sliced=False, fold=False)
        dense = gen(trio, names, method, method_params=params)
        modes(trio, sliced=True, fold=False)
        sliced = gen(trio, names, method, method_params=params)
        modes(trio, sliced=True, fold=True)
        folded = gen(trio, names, method, method_params=params)
    finally:
        modes(trio, sliced=True, fold=True)
    assert (dense - gen(trio, [], "merge")).abs().max() > 0.05, "the LoRAs must change the result"
    # the same sums in another order round differently in float32 (latents reach about 18)
    torch.testing.assert_close(sliced, dense, atol=1e-4, rtol=0)
    torch.testing.assert_close(folded, dense, atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels(trio, sliced), pixels(trio, dense), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels(trio, folded), pixels(trio, dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "params", "most"), [("switch", {"tau": 1}, 1), ("klora", None, 1),
                                                          ("composite", None, 1), ("merge", None, 3)])  # fmt: skip
def test_a_layer_computes_only_the_active_loras(trio, method, params, most):
    """With folding off, every layer's stacked factors are sliced to the LoRAs whose weight
    is non-zero there: Switch, K-LoRA and Composite's branches one LoRA each, at N = 3."""
    seen: set[tuple[int, ...]] = set()

    def spy(step, steps, latents):
        for layer in unet_layers(trio):
            seen.update(columns for columns, selected in layer._slices.values() if selected is not None)

    try:
        modes(trio, sliced=True, fold=False)
        gen(trio, list(CATEGORIES), method, method_params=params, run=replace(AS_LATENTS, callback=spy))
    finally:
        modes(trio, sliced=True, fold=True)
    assert seen and max(len(columns) for columns in seen) == most
    if method == "switch":
        assert seen == {(0,), (1,), (2,)}


def test_folding_is_used_and_the_base_weights_come_back_bit_for_bit(trio):
    layers = unet_layers(trio)
    originals = [(layer.base.weight, layer.base.weight.detach().clone()) for layer in layers]
    folded_at: list[int] = []

    def spy(step, steps, latents):
        folded_at.append(sum(layer._fold_weight is not None for layer in layers))

    gen(trio, [("character", 0.7), ("style", "0@0,1@1")], "merge", run=replace(AS_LATENTS, callback=spy))
    assert min(folded_at) > 0, "merge's steps must run on folded weights"
    for layer, (tensor, copy) in zip(layers, originals, strict=True):
        assert layer.base.weight is tensor and torch.equal(layer.base.weight, copy)
        assert layer._fold_weight is None and not layer._slices
    for registry in trio.registries.values():
        assert registry.state.weights is None


def test_a_constant_merge_folds_each_layer_once_per_generation(trio):
    layers = unet_layers(trio)
    held: list[bool] = []

    def spy(step, steps, latents):
        held.extend(layer._fold_weight is not None and layer._run == step + 1 for layer in layers)

    gen(trio, ["character", "style"], "merge", steps=6, run=replace(AS_LATENTS, callback=spy))
    assert all(held), "folded at the first step, kept for every later one"


def test_nan_names_the_first_bad_step_though_read_later(lora_files):
    composer = Composer.tiny("sd1")
    lora = composer.load_lora(lora_files["sd1", 0]["peft"], name="a")
    for f in lora.factors["unet"].values():
        f.up.mul_(1e30)
    steps_run: list[int] = []
    with pytest.raises(NonFiniteLatentsError, match="at step 4 of 8"):
        run = replace(AS_LATENTS, callback=lambda i, n, x: steps_run.append(i))
        gen(composer, [("a", "0@0,0@0.3,1@0.31")], steps=8, run=run)
    assert steps_run == [0, 1, 2, 3], "the on-device flag is read every 5 steps, not at every step"
    for layer in unet_layers(composer):
        assert layer._fold_weight is None


def _compiles() -> tuple[int, int]:
    """Frames dynamo compiled (a recompilation, on a failed guard, counts as one more) and
    distinct graphs."""
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def test_compiled_unet_has_one_graph_and_does_not_recompile_across_lora_swaps(lora_files, trio, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    composer = load_trio(lora_files, compile="eager")
    names = list(CATEGORIES)
    torch.testing.assert_close(gen(composer, names[:2]), gen(trio, names[:2]), atol=1e-4, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    after_first = _compiles()
    assert after_first[1] == 1, "the UNet is one graph"
    runs = [
        (names, "merge", None),
        ([("style", 0.3)], "merge", None),
        ([("background", 1.2), ("character", "0@0,1@1")], "merge", None),
        (names, "switch", {"tau": 1}),
        (names[:2], "klora", None),
    ]
    for loras, method, params in runs:
        got = gen(composer, loras, method, method_params=params)
        torch.testing.assert_close(got, gen(trio, loras, method, method_params=params), atol=1e-4, rtol=0)
    composer.unload_lora("background")
    composer.load_lora(lora_files["sd1", 2]["kohya"], name="other", category="background")
    gen(composer, ["other", "character"], "switch", method_params={"tau": 2})
    assert _compiles() == after_first, "swapping, re-weighting, N and method within the folded graph recompile nothing"
    gen(composer, names[:2], "composite")
    stacked = _compiles()
    assert stacked[1] == after_first[1] + 1, "per-row weights compile the stacked graph once"
    cmlora = {"ordering": "category"}
    later = [(["character", "style", "other"], "composite", None), (["character", "other"], "cmlora", cmlora),
             (["other"], "composite", None)]  # fmt: skip
    for loras, method, params in later:
        swapped = [n if n != "other" else "background" for n in loras]
        torch.testing.assert_close(gen(composer, loras, method, method_params=params),
                                   gen(trio, swapped, method, method_params=params), atol=1e-4, rtol=0)  # fmt: skip
    assert _compiles() == stacked, "N and LoRAs change within the stacked graph without recompiling"
    composer.unload_lora("other")
    smaller = lora_parts(tiny_pipeline("sd1"), seed=99, rank=2, text=False)
    composer.load_lora(write(tmp_path / "small.safetensors", peft_state_dict(smaller)), name="small")
    without = [gen(composer, ["character"], method) for method in ("merge", "composite")]
    for method, alone in zip(("merge", "composite"), without, strict=True):
        assert (gen(composer, ["character", "small"], method) - alone).abs().max() > 1e-3, method
    assert _compiles() == stacked, "a LoRA of another rank swapped in within capacity recompiles neither graph"
    assert not counters["graph_break"]


@pytest.mark.soak
def test_inductor_compiled_generation_equals_eager(lora_files, trio):
    composer = load_trio(lora_files, compile=True)
    for method in ("merge", "composite"):
        got = gen(composer, list(CATEGORIES), method)
        torch.testing.assert_close(got, gen(trio, list(CATEGORIES), method), atol=1e-4, rtol=0)


def test_compiled_capacity_grows_when_a_generation_needs_more(lora_files, trio):
    composer = load_trio(lora_files, compile="eager")
    composer.capacity = 2
    gen(composer, ["character"], "composite")
    state = composer.registries["unet"].state
    assert state.static[0] == 2
    got = gen(composer, list(CATEGORIES), "composite")
    assert state.static[0] == 3
    torch.testing.assert_close(got, gen(trio, list(CATEGORIES), "composite"), atol=1e-4, rtol=0)


def test_cmlora_says_it_profiles_and_that_the_profile_is_cached(trio, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSE_CACHE", str(tmp_path))
    for lora in trio.loras.values():
        lora.derived.pop(next((k for k in lora.derived if k[0] == "frequency"), None), None)
    gen(trio, ["character", "style"], "cmlora", run=replace(AS_LATENTS, progress=True))
    err = capsys.readouterr().err
    assert "profiling LoRA 'character' for CMLoRA's frequency ordering" in err and "cached in" in err
    gen(trio, ["character", "style"], "cmlora", run=replace(AS_LATENTS, progress=True))
    assert "profiling" not in capsys.readouterr().err


def test_help_imports_neither_torch_nor_diffusers():
    code = "import sys, compose.cli; compose.cli._parser(); print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_method_table_names_every_class():
    assert list(METHODS)[:5] == ["merge", "switch", "composite", "klora", "cmlora"]
    assert all(METHODS[name].name == name for name in METHODS)
    assert METHODS["switch"] is Switch and METHODS["klora"] is KLoRA


def test_speed_benchmark_rows_memory_and_compiled(tmp_path):
    result = run_speed_benchmark(preset="tiny", max_loras=2, rank=4, warmup=0, repeats=1, compiled=True,
                                 compile_backend="eager")  # fmt: skip
    rows = {(r["config"], r["n"]): r for r in result["rows"]}
    for n in (1, 2):
        for config in ("merge", "merge (folding step)", "merge (25-step average)", "switch (25-step average)",
                       "klora (25-step average)", "cmlora (25-step average)", "compiled merge", "compiled composite",
                       "composite", "diffusers composite (sequential)", "routed probe step", "routed step",
                       "routed (25-step average)"):  # fmt: skip
            assert rows[(config, n)]["median_ms"] > 0 and rows[(config, n)]["vs_floor"] > 0, config
        assert rows[("composite", n)]["peak_mib"] > 0 and rows[("merge (folding step)", n)]["peak_mib"] > 0
        assert rows[("compiled merge", n)]["peak_mib"] is None
    summary = summary_markdown(result)
    assert "| N | merge | switch | klora | composite | cmlora | routed |" in summary and "compiled merge" in summary
    assert "Peak tensor memory" in summary and "\n| 2 |" in summary and "cmlora cached ÷ (full + shallow" in summary
    assert 0 < rows[(SHALLOW, 0)]["vs_floor"]
    assert to_markdown(result).count("\n| composite | ") == 2


def test_demo_world_images_per_second():
    rows = world_speed(torch.device("cpu"), steps=2, batches=(1, 2), repeats=1, compile_backend="eager",
                       methods=("merge",))  # fmt: skip
    assert {(r["mode"], r["batch"]) for r in rows} == {("eager", 1), ("eager", 2), ("compiled", 1), ("compiled", 2)}
    assert all(r["images_per_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert "images per second" in summary_markdown(
        {
            "rows": [
                {"config": "no LoRA (floor)", "n": 0, "median_ms": 1.0, "vs_floor": 1.0, "peak_mib": None},
                {"config": "composite", "n": 1, "median_ms": 1.0, "vs_floor": 1.0, "peak_mib": None},
            ],
            "world": rows,
        }
    )
