"""K-LoRA: the per-layer choice is the reference rule, and a generation is the run in
which every layer's weight is replaced by the chosen ``W + w B A``."""

from __future__ import annotations

import pytest
import torch
from conftest import SIZE, STEPS, reference_loop
from loras import lora_parts, peft_state_dict, write

from compose import Composer, KLoRA
from compose.methods import MethodContext
from compose.tiny import tiny_pipeline

PROMPT = "a sks cat in szn style"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A composer with a content LoRA and a style LoRA of rank 8 (UNet only)."""
    root = tmp_path_factory.mktemp("klora")
    pipe = tiny_pipeline("sd1")
    composer = Composer.tiny("sd1")
    for name, category, seed in (("content", "character", 21), ("style", "style", 22)):
        state = peft_state_dict(lora_parts(pipe, seed=seed, rank=8, text=False))
        composer.load_lora(write(root / f"{name}.safetensors", state), name=name, category=category)
    return composer


def reference_choice(content, style, layers, progress, k=64, alpha=1.5, beta=0.5) -> list[str]:
    """The reference K-LoRA rule written out: per layer, content iff
    (topK|ΔW_c| / γ) > topK|ΔW_s| (α p + β), γ = mean_l Σ|ΔW_c| / Σ|ΔW_s|."""
    deltas = {
        name: [(f.up @ f.down).abs() for f in (content.factors["unet"][name], style.factors["unet"][name])]
        for name in layers
    }
    gamma = sum(dc.sum().item() / ds.sum().item() for dc, ds in deltas.values()) / len(layers)
    choice = []
    for dc, ds in deltas.values():
        top_c = dc.flatten().topk(k).values.sum().item()
        top_s = ds.flatten().topk(k).values.sum().item()
        choice.append("content" if top_c / gamma > top_s * (alpha * progress + beta) else "style")
    return choice


def prepared(composer: Composer, method: KLoRA, names: list[str], steps: int = STEPS) -> KLoRA:
    loras = [composer.loras[n] for n in names]
    method.prepare(
        MethodContext(loras, torch.full((len(loras),), 0.8), steps, list(composer.registries["unet"].layers))
    )
    return method


@pytest.mark.parametrize("top_k", [64, 8])
def test_choices_equal_the_reference_rule(pair, top_k):
    method = prepared(pair, KLoRA(top_k=top_k), ["content", "style"], steps=20)
    layers = method.context.layers
    seen = set()
    for progress in (0.0, 0.2, 0.45, 0.7, 0.95):
        expected = reference_choice(pair.loras["content"], pair.loras["style"], layers, progress, k=top_k)
        got = ["content" if j == 0 else "style" for j in method.choose(progress).tolist()]
        assert got == expected
        seen.update(got)
    assert seen == {"content", "style"}, "the test must see both LoRAs win some layers"
    assert torch.equal(method.choices[10], method.choose(0.5))


def test_roles_follow_categories_and_can_be_overridden(pair):
    method = prepared(pair, KLoRA(), ["style", "content"])
    assert method.is_style.tolist() == [True, False]
    swapped = prepared(pair, KLoRA(roles={"content": "style", "style": "content"}), ["style", "content"])
    assert swapped.is_style.tolist() == [False, True]
    with pytest.raises(ValueError, match="must be one of"):
        prepared(pair, KLoRA(roles={"style": "background"}), ["style", "content"])


def test_topk_sums_are_computed_once(pair):
    prepared(pair, KLoRA(), ["content", "style"])
    cached = {k: v for k, v in pair.loras["content"].derived.items() if k[0] == "klora-topk" and k[1] == 64}
    assert len(cached) == len(pair.registries["unet"])
    sentinel = next(iter(cached))
    pair.loras["content"].derived[sentinel] = (1e9, 1e9)
    method = prepared(pair, KLoRA(), ["content", "style"])
    assert method.mass[0, 0] == 1e9
    pair.loras["content"].derived[sentinel] = cached[sentinel]


def test_generation_equals_chosen_weight_replacement(pair):
    """Per step, every layer's base weight replaced by ``W + w ΔW_chosen``: one plain
    UNet pass, no LoRA machinery."""
    names = ["content", "style"]
    got = pair.generate(
        PROMPT, loras=names, method="klora", seed=3, steps=STEPS, width=SIZE, height=SIZE, output_type="latent"
    )

    method = prepared(pair, KLoRA(), names)
    pipe = tiny_pipeline("sd1")
    modules = {name: pipe.unet.get_submodule(name) for name in method.context.layers}
    originals = {name: m.weight.detach().clone() for name, m in modules.items()}
    loras = [pair.loras[n] for n in names]

    def patch(step: int):
        def setup():
            for name, choice in zip(method.context.layers, method.choices[step].tolist(), strict=True):
                f = loras[choice].factors["unet"][name]
                modules[name].weight.data = originals[name] + 0.8 * (f.up @ f.down)

        return [setup]

    expected = reference_loop(pipe, PROMPT, patch)
    assert method.choices.float().std() > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_many_loras_pick_one_per_layer(lora_files, tmp_path):
    composer = Composer.tiny("sd1")
    for i in range(3):
        composer.load_lora(lora_files["sd1", i]["peft"], name=f"l{i}", category=("character", "style", "object")[i])
    method = prepared(composer, KLoRA(), ["l0", "l1", "l2"])
    w = method.weights(2)
    assert w.shape == (len(composer.registries["unet"]), 1, 3)
    assert torch.equal((w > 0).sum(-1), torch.ones_like(w[..., 0], dtype=torch.long))
    assert method.gamma[1] == 1.0
    latents = composer.generate(
        "x", loras=["l0", "l1", "l2"], method="klora", steps=2, width=SIZE, height=SIZE, output_type="latent"
    )
    assert torch.isfinite(latents).all()
