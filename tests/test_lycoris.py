"""LyCORIS files (LoHa, LoKr, full diff, LoCon with Tucker cores, DoRA ``dora_scale``) in
every method, against lycoris-lora's own ΔW.

The files are made by lycoris-lora's module classes on the tiny pipelines' layers, saved
with kohya names as LyCORIS saves them; the reference update of every module comes from
lycoris-lora's functional API (``diff_weight``, ``kron_weight``, ``weight_decompose``).
For one LoRA every method reduces to ``W + s·ΔW``: the reference is the same pipeline
with its weights patched so, as A1111 and ComfyUI apply a LyCORIS file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import AS_LATENTS, SAMPLING, reference_loop
from loras import lora_parts, peft_state_dict, write
from lycoris.functional import locon as locon_fn
from lycoris.functional import loha as loha_fn
from lycoris.functional import lokr as lokr_fn
from lycoris.functional.general import weight_decompose
from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from compose import Composer, LoRAError, load_lora
from compose.methods import METHODS
from compose.tiny import tiny_pipeline

ATOL = 1e-4
"""Latents after 4 steps, float32: what the existing exactness tests allow."""
DELTA_ATOL = 1e-5
"""One module's update against lycoris-lora's, float32."""
PROMPT = "a cat wearing a hat"
SCALE = 0.8
UNET_TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|resnets\.\d\.conv1|proj_in)$")
TEXT_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1)$")
KINDS = {
    "loha": lambda name, layer: LohaModule(name, layer, lora_dim=3, alpha=2),
    "loha-tucker": lambda name, layer: LohaModule(name, layer, lora_dim=2, alpha=3, use_tucker=True),
    "lokr": lambda name, layer: LokrModule(name, layer, lora_dim=2, alpha=1, factor=4, decompose_both=True),
    "lokr-tucker": lambda name, layer: LokrModule(name, layer, lora_dim=2, alpha=3, factor=4, use_tucker=True),
    "lokr-full": lambda name, layer: LokrModule(name, layer, lora_dim=2, alpha=1, factor=4, full_matrix=True),
    "diff": lambda name, layer: FullModule(name, layer),
    "locon-tucker": lambda name, layer: LoConModule(name, layer, lora_dim=4, alpha=2, use_tucker=True),
    "dora-out": lambda name, layer: LoConModule(name, layer, lora_dim=4, alpha=8, weight_decompose=True),
    "dora-in": lambda name, layer: LoConModule(
        name, layer, lora_dim=4, alpha=8, weight_decompose=True, wd_on_out=False
    ),
    "doha": lambda name, layer: LohaModule(name, layer, lora_dim=2, alpha=2, weight_decompose=True, wd_on_out=False),
}
ALGORITHMS = {"loha": "LoHa", "loha-tucker": "LoHa", "lokr": "LoKr", "lokr-tucker": "LoKr", "lokr-full": "LoKr",
              "diff": "diff", "locon-tucker": "LoCon", "dora-out": "LoCon + DoRA", "dora-in": "LoCon + DoRA",
              "doha": "LoHa + DoRA"}  # fmt: skip
EVERY_METHOD = ("loha", "lokr", "diff", "dora-in")
"""The kinds run under every method; every kind runs under Merge and Composite."""


def text_models(pipe) -> list[tuple[str, str, nn.Module]]:
    """``(component, kohya prefix, model)`` for the text encoders, as kohya names them."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return [("text_encoder", "lora_te_", pipe.text_encoder)]
    return [("text_encoder", "lora_te1_", pipe.text_encoder), ("text_encoder_2", "lora_te2_", pipe.text_encoder_2)]


def targets(pipe) -> list[tuple[str, str, str, nn.Module]]:
    """``(component, module name, kohya name, layer)`` for every layer the files adapt."""
    found = []
    models = [("unet", "lora_unet_", pipe.unet, UNET_TARGETS)]
    models += [(c, prefix, model, TEXT_TARGETS) for c, prefix, model in text_models(pipe)]
    for component, prefix, model, pattern in models:
        for name, layer in model.named_modules():
            if pattern.search(name) and isinstance(layer, (nn.Linear, nn.Conv2d)):
                kohya = name if component == "unet" else f"text_model.{name}"
                found.append((component, name, prefix + kohya.replace(".", "_"), layer))
    return found


@torch.no_grad()
def reference_delta(module: nn.Module, layer: nn.Module, dora: bool = True) -> torch.Tensor:
    """The module's update by lycoris-lora's functional API, at its own alpha / dim, DoRA
    normalised as lycoris' ``weight_decompose`` (unless ``dora`` is off): the layer's weight
    becomes ``W + ΔW``."""
    shape = layer.weight.shape
    scale = torch.tensor(getattr(module, "scale", 1.0))
    if isinstance(module, LohaModule):
        t1, t2 = getattr(module, "hada_t1", None), getattr(module, "hada_t2", None)
        weights = (module.hada_w1_b, module.hada_w1_a, module.hada_w2_b, module.hada_w2_a, t1, t2)
        delta = loha_fn.diff_weight(*weights, gamma=scale).reshape(shape)
    elif isinstance(module, LokrModule):
        get = lambda key, used: getattr(module, key) if used else None  # noqa: E731
        delta = lokr_fn.kron_weight(
            get("lokr_w1", module.use_w1), get("lokr_w1_a", not module.use_w1), get("lokr_w1_b", not module.use_w1),
            get("lokr_w2", module.use_w2), get("lokr_w2_a", not module.use_w2), get("lokr_w2_b", not module.use_w2),
            get("lokr_t2", module.tucker and not module.use_w2), scale=float(scale),
        ).reshape(shape)  # fmt: skip
    elif isinstance(module, LoConModule):
        mid = module.lora_mid.weight if module.tucker else None
        delta = locon_fn.diff_weight(module.lora_down.weight, module.lora_up.weight, mid, gamma=float(scale))
        delta = delta.reshape(shape)
    else:
        delta = module.custom_state_dict()["diff"]
    if dora and getattr(module, "wd", False):
        base = layer.weight.float()
        delta = weight_decompose(base + delta, module.dora_scale, 1, module.wd_on_out) - base
    return delta


@torch.no_grad()
def make_module(kind: str, name: str, layer: nn.Module, generator: torch.Generator, size: float = 0.3):
    """A lycoris-lora module of ``kind`` on ``layer`` with random weights, scaled so that its
    update is ``size`` times the layer's weight in norm; DoRA magnitudes moved off ``‖W‖``."""
    module = KINDS[kind](name, layer)
    if isinstance(module, FullModule):
        module.weight.copy_(layer.weight + torch.randn(layer.weight.shape, generator=generator) * layer.weight.std())
        if module.bias is not None:
            module.bias.copy_(layer.bias)  # what a trained full module holds: the weights, not the diff
    factors = [p for n, p in module.named_parameters() if n.startswith(("hada_", "lokr_", "lora_"))]
    for p in factors:
        p.copy_(torch.randn(p.shape, generator=generator))
    if getattr(module, "wd", False):
        module.dora_scale.mul_(0.7 + 0.6 * torch.rand(module.dora_scale.shape, generator=generator))
    if factors:
        factors[0].mul_(size * layer.weight.norm() / reference_delta(module, layer, dora=False).norm())
    return module


def lycoris_file(path: Path, pipe, kind: str, seed: int = 0) -> tuple[Path, dict]:
    """A LyCORIS file of ``kind`` over every target layer of ``pipe`` (UNet and text
    encoders) and the reference update of each: ``{(component, module): ΔW}``."""
    generator = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for component, name, kohya, layer in targets(pipe):
        module = make_module(kind, kohya, layer, generator)
        state.update({f"{kohya}.{key}": value.detach() for key, value in module.custom_state_dict().items()})
        deltas[component, name] = reference_delta(module, layer)
    return write(path, state), deltas


def patched(family: str, deltas: list[tuple[dict, float]]) -> Composer:
    """A tiny composer whose weights are ``W + Σ s·ΔW`` for each ``(deltas, s)``: A1111's and
    ComfyUI's way of applying LoRA files, the reference every method must equal."""
    pipe = tiny_pipeline(family)
    models = {"unet": pipe.unet, **{c: m for c, _, m in text_models(pipe)}}
    with torch.no_grad():
        for table, strength in deltas:
            for (component, name), delta in table.items():
                layer = models[component].get_submodule(name)
                layer.weight += strength * delta.view_as(layer.weight)
    return Composer(pipe, model_name=f"tiny:{family}")


def latents(composer: Composer, loras, method: str = "merge", **kwargs) -> torch.Tensor:
    return composer.generate(PROMPT, loras=loras, method=method, seed=3, lora_scale=SCALE, sampling=SAMPLING,
                             run=AS_LATENTS, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Per family and kind: ``(file, reference deltas)``."""
    root = tmp_path_factory.mktemp("lycoris")
    made = {}
    for family in ("sd1", "sdxl"):
        pipe = tiny_pipeline(family)
        for index, kind in enumerate(KINDS):
            made[family, kind] = lycoris_file(root / f"{family}-{kind}.safetensors", pipe, kind, seed=index)
    return made


@pytest.fixture(scope="module")
def loaded(files) -> dict:
    """Per family, a tiny composer with every kind loaded under its name."""
    composers = {}
    for family in ("sd1", "sdxl"):
        composers[family] = Composer.tiny(family)
        for kind in KINDS:
            composers[family].load_lora(files[family, kind][0], name=kind)
    return composers


@pytest.fixture(scope="module")
def expected(files):
    """The patched model's latents for ``(family, kind)`` (``kind`` ``None``: the base model's),
    each computed once."""
    cache = {}

    def get(family: str, kind: str | None) -> torch.Tensor:
        if (family, kind) not in cache:
            deltas = [] if kind is None else [(files[family, kind][1], SCALE)]
            cache[family, kind] = latents(patched(family, deltas), [])
        return cache[family, kind]

    return get


def fitted_delta(composer: Composer, kind: str, component: str, name: str) -> torch.Tensor:
    f = composer.loras[kind].factors[component][name]
    return (f.up.flatten(1) @ f.down.flatten(1)).view(f.up.shape[0], *f.down.shape[1:])


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_module_equals_lycoris(files, loaded, family, kind):
    """Every module's factors, once the composer has fitted them to the model (and resolved
    DoRA against its weights), multiply to lycoris-lora's update."""
    composer, deltas = loaded[family], files[family, kind][1]
    lora = composer.loras[kind]
    assert lora.unused_keys == [] and lora.format == "kohya" and lora.algorithm == ALGORITHMS[kind]
    assert {(c, m) for c, table in lora.factors.items() for m in table} == set(deltas)
    worst = 0.0
    for (component, name), delta in deltas.items():
        got = fitted_delta(composer, kind, component, name)
        worst = max(worst, (got - delta.view_as(got)).abs().max().item())
    assert worst < DELTA_ATOL, f"{kind}: max |ΔW - lycoris ΔW| = {worst:.2e}"


def test_exact_forms_are_low_rank_where_that_is_smaller(files, loaded):
    """LoHa's face-splitting form has rank dim²; LoKr's Kronecker form the product of its
    halves' inner sizes; a full diff is dense, on the smaller side of the matrix."""
    factors = loaded["sd1"].loras
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # 32 -> 32
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # 32 -> 256
    assert factors["loha"].factors["unet"][to_q].rank == 3 * 3
    assert factors["lokr"].factors["unet"][to_q].rank < 32
    assert factors["diff"].factors["unet"][ff].down.shape == (32, 32)  # down = I (in), up = ΔW
    assert factors["diff"].factors["unet"][to_q].up.shape == (32, 32)
    assert factors["loha"].rank == 3 and factors["lokr-full"].scale_summary()["rank"] is None


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", EVERY_METHOD)
def test_one_file_under_every_method_equals_the_patched_model(loaded, expected, kind, method, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSE_CACHE", str(tmp_path))  # CMLoRA's frequency profile
    want = expected("sd1", kind)
    assert (want - expected("sd1", None)).abs().max() > 0.05, "the file must change the result to mean anything"
    torch.testing.assert_close(latents(loaded["sd1"], [kind], method), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["merge", "composite"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_under_merge_and_composite(loaded, expected, family, kind, method):
    assert (expected(family, kind) - expected(family, None)).abs().max() > 0.05
    torch.testing.assert_close(latents(loaded[family], [kind], method), expected(family, kind), atol=ATOL, rtol=0)


def test_loha_and_lora_under_composite_equal_the_branch_loop(tmp_path):
    """A LoHa and a plain LoRA (UNet only) under Composite: per step, each branch's UNet
    carries only its own update, the predictions averaged before guidance."""
    pipe = tiny_pipeline("sd1")
    unet_only = [t for t in targets(pipe) if t[0] == "unet"]
    generator = torch.Generator().manual_seed(5)
    state, loha = {}, {}
    for _, name, kohya, layer in unet_only:
        module = make_module("loha", kohya, layer, generator)
        state.update({f"{kohya}.{k}": v.detach() for k, v in module.custom_state_dict().items()})
        loha[name] = reference_delta(module, layer)
    parts = lora_parts(pipe, seed=9, text=False)
    weights = {"hada": 1.0, "plain": 0.7}
    composer = Composer.tiny("sd1")
    composer.load_lora(write(tmp_path / "hada.safetensors", state), name="hada")
    composer.load_lora(write(tmp_path / "plain.safetensors", peft_state_dict(parts)), name="plain")
    got = latents(composer, list(weights.items()), "composite")

    lora = {name: up @ down for name, (down, up) in parts["unet"].items()}
    base = {name: pipe.unet.get_submodule(name).weight.detach().clone() for name in set(loha) | set(lora)}

    def only(table: dict, weight: float):
        """A branch's setup: the UNet's weights with ``table``'s updates only."""

        def setup():
            with torch.no_grad():
                for name, original in base.items():
                    delta = table.get(name)
                    update = 0 if delta is None else weight * SCALE * delta.view_as(original)
                    pipe.unet.get_submodule(name).weight.copy_(original + update)

        return setup

    expected = reference_loop(pipe, PROMPT, lambda step: [only(loha, weights["hada"]), only(lora, weights["plain"])])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# -- inspect and refusals ----------------------------------------------------------------


def test_inspect_names_the_algorithm_rank_factor_and_alpha(files, capsys):
    from conftest import run

    for kind, algorithm in (("loha", "LoHa"), ("lokr", "LoKr"), ("diff", "diff"), ("dora-out", "LoCon + DoRA")):
        code, out, err = run(capsys, "inspect", files["sd1", kind][0])
        assert code == 0, err
        assert re.search(rf"\nalgorithm +{re.escape(algorithm)}\n", out)
    summary = load_lora(files["sd1", "lokr"][0]).summary()
    assert summary["factor"] == ["4x4"] and summary["alpha"] == 1.0 and summary["algorithms"]["LoKr"] > 0
    loha = load_lora(files["sd1", "loha"][0]).summary()
    assert (loha["rank"], loha["alpha"], loha["scale"]) == (3, 2.0, 2 / 3)
    code, out, _ = run(capsys, "inspect", files["sd1", "diff"][0])
    assert re.search(r"\nrank +full matrices", out) and re.search(r"\nalpha +none stored \(scale 1\)\n", out)


def lycoris_state(pipe, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for _, _, kohya, layer in targets(pipe):
        module = make_module(kind, kohya, layer, generator)
        state.update({f"{kohya}.{k}": v.detach() for k, v in module.custom_state_dict().items()})
    return state


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"oft_blocks": (4, 8, 8)}, "is a LyCORIS OFT/BOFT adapter: it multiplies each weight by a learned rotation"),
        ({"weight": (32,), "on_input": ()}, r"is a LyCORIS \(IA\)³ adapter: it rescales each layer's channels"),
        ({"w_norm": (32,), "b_norm": (32,)}, "trains normalisation layers"),
        ({"a1.weight": (4, 32), "a2.weight": (32, 4)}, "is a LyCORIS GLoRA adapter"),
    ],
)
def test_other_adapters_are_refused_by_name(tmp_path, keys, message):
    state = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": torch.ones(shape) for k, shape in keys.items()}
    path = write(tmp_path / "other.safetensors", state)
    with pytest.raises(LoRAError, match=message) as info:
        load_lora(path)
    assert str(path) in str(info.value)


def test_bias_deltas_are_refused_and_zero_biases_load(tmp_path):
    pipe = tiny_pipeline("sd1")
    state = lycoris_state(pipe, "diff")
    biases = [k for k in state if k.endswith(".diff_b")]
    assert biases and all(not state[k].any() for k in biases)
    assert load_lora(write(tmp_path / "zero.safetensors", state)).algorithm == "diff"
    state[biases[0]] = torch.full_like(state[biases[0]], 0.1)
    with pytest.raises(LoRAError, match=rf"adds bias deltas \(1 module, e.g. {re.escape(biases[0])}\)"):
        load_lora(write(tmp_path / "bias.safetensors", state))


def test_a_lokr_whose_factors_do_not_make_the_layer_is_refused_and_nothing_loads(tmp_path):
    """lokr_w2 one column short: the Kronecker product is (32, 28), the layer (32, 32)."""
    pipe = tiny_pipeline("sd1")
    state = lycoris_state(pipe, "lokr-full")
    key = next(k for k in state if k.endswith("attn1_to_q.lokr_w2"))
    state[key] = state[key][:, :-1].contiguous()
    composer = Composer.tiny("sd1")
    before = {c: dict(r.layers) for c, r in composer.registries.items()}
    path = write(tmp_path / "bad-lokr.safetensors", state)
    module = key.removesuffix(".lokr_w2")
    with pytest.raises(LoRAError, match=rf"LoKr module {module} .*update \(32, 28\)\) does not fit unet\.") as info:
        composer.load_lora(path)
    assert str(path) in str(info.value) and "Linear with weight (32, 32)" in str(info.value)
    assert composer.loras == {} and {c: dict(r.layers) for c, r in composer.registries.items()} == before


def test_factors_that_do_not_multiply_are_refused(tmp_path):
    pipe = tiny_pipeline("sd1")
    state = lycoris_state(pipe, "loha")
    key = next(k for k in state if k.endswith(".hada_w2_b"))
    state[key] = state[key][:-1].contiguous()
    with pytest.raises(LoRAError, match=rf"module {re.escape(key.split('.')[0])}: hada_w2_a .* do not multiply"):
        load_lora(write(tmp_path / "bad-loha.safetensors", state))


def test_lycoris_keys_under_other_names_are_refused(tmp_path):
    state = {"unet.down_blocks.0.attentions.0.proj_in.hada_w1_a": torch.ones(32, 2)}
    with pytest.raises(LoRAError, match="under names other than kohya's"):
        load_lora(write(tmp_path / "peft-loha.safetensors", state))
