"""K-LoRA: the per-layer choice is the released rule (K = rank product, the 3x-filtered
γ, s and s*), a generation is the run in which every layer's weight is replaced by the
chosen ``W + w B A``, and ``reference=True`` equals the released layers with their
global call counter, written out here from a reading of HVision-NKU/K-LoRA."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import AS_LATENTS, SAMPLING, SIZE, STEPS, reference_loop
from loras import lora_parts, peft_state_dict, write
from torch import nn

from compose import Composer, KLoRA, SamplingConfig
from compose.methods import MethodContext
from compose.methods.references import default_lora_scale
from compose.tiny import tiny_pipeline

PROMPT = "a sks cat in szn style"


def scaled_parts(parts: dict, module: str, factor: float) -> dict:
    """``parts`` with one UNet module's update multiplied by ``factor``."""
    unet = dict(parts["unet"])
    down, up = unet[module]
    unet[module] = (down, up * factor)
    return {**parts, "unet": unet}


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


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A content LoRA of rank 4 with one outlier module (its update 30x) and a style LoRA
    of rank 8, both with text-encoder parts: ``(composer, {name: parts})``."""
    root = tmp_path_factory.mktemp("klora-uneven")
    pipe = tiny_pipeline("sd1")
    content = lora_parts(pipe, seed=31, rank=4)
    parts = {"content": scaled_parts(content, sorted(content["unet"])[3], 30.0), "style": lora_parts(pipe, 32, rank=8)}
    composer = Composer.tiny("sd1")
    for name, category in (("content", "character"), ("style", "style")):
        path = write(root / f"{name}.safetensors", peft_state_dict(parts[name]))
        composer.load_lora(path, name=name, category=category)
    return composer, parts


def factor_parts(lora) -> dict:
    """A loaded LoRA's factors as ``{component: {module: (down, up)}}``."""
    return {c: {m: (f.down, f.up) for m, f in table.items()} for c, table in lora.factors.items()}


def released_gamma(content: dict, style: dict, components=("unet",)) -> float:
    """``get_ratio_between_content_and_style`` (utils.py:157-209): per module
    ``Σ|up down|`` of content over style, averaged, then averaged again over the ratios
    below 3x that mean."""
    ratios = []
    for component in components:
        for module in sorted(content[component]):
            (dc, uc), (ds, us) = content[component][module], style[component][module]
            ratios.append((uc @ dc).abs().sum().item() / (us @ ds).abs().sum().item())
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def released_scale(count: int, total: int, pattern: str, alpha: float = 1.5) -> float:
    """The style factor of ``get_klora_weight`` (klora.py:43-73) with inference_sd.py's β."""
    beta = alpha * 0.85 if pattern == "s*" else 0.5
    scale = alpha * count / total + beta
    return scale % alpha if pattern == "s*" else scale


def released_choice(content: dict, style: dict, layers, gamma: float, scale: float, k=None) -> list[str]:
    """Per layer: content iff ``(topK|ΔW_c| / γ) / (topK|ΔW_s| scale) > 1``, ``K = r_c r_s``."""
    choice = []
    for name in layers:
        (dc, uc), (ds, us) = content["unet"][name], style["unet"][name]
        kk = k or uc.shape[1] * us.shape[1]
        top_c = (uc @ dc).abs().flatten().topk(kk).values.sum().item()
        top_s = (us @ ds).abs().flatten().topk(kk).values.sum().item()
        choice.append("content" if top_c / gamma > top_s * scale else "style")
    return choice


def prepared(composer: Composer, method: KLoRA, names: list[str], steps: int = STEPS) -> KLoRA:
    loras = [composer.loras[n] for n in names]
    method.prepare(
        MethodContext(loras, torch.full((len(loras),), 0.8), steps, list(composer.registries["unet"].layers))
    )
    return method


def named(choices: torch.Tensor) -> list[str]:
    return ["content" if j == 0 else "style" for j in choices.tolist()]


@pytest.mark.parametrize(("top_k", "pattern"), [(None, "s"), (8, "s"), (None, "s*")])
def test_choices_equal_the_released_rule(pair, top_k, pattern):
    steps = 20
    method = prepared(pair, KLoRA(top_k=top_k, scale=pattern), ["content", "style"], steps=steps)
    content, style = (factor_parts(pair.loras[n]) for n in ("content", "style"))
    gamma = released_gamma(content, style)
    assert method.gamma[0].item() == pytest.approx(gamma, rel=1e-9)
    seen = set()
    for step in range(steps):
        scale = released_scale(step, steps, pattern)
        expected = released_choice(content, style, method.context.layers, gamma, scale, k=top_k)
        assert named(method.choices[step]) == expected
        seen.update(expected)
    assert seen == {"content", "style"}, "the test must see both LoRAs win some layers"


def test_k_is_the_rank_product(uneven):
    composer, parts = uneven
    method = prepared(composer, KLoRA(), ["content", "style"], steps=10)
    layer = method.context.layers[0]
    assert method.layer_k([composer.loras[n].factors["unet"][layer] for n in ("content", "style")]) == 32
    assert method.layer_k([composer.loras["content"].factors["unet"][layer]] * 3) == 16
    fixed = prepared(composer, KLoRA(top_k=64), ["content", "style"], steps=10)
    assert not torch.equal(method.choices, fixed.choices), "K must matter for this pair"
    gamma = released_gamma(parts["content"], parts["style"])
    for step in range(10):
        scale = released_scale(step, 10, "s")
        expected = released_choice(parts["content"], parts["style"], method.context.layers, gamma, scale)
        assert named(method.choices[step]) == expected


def test_gamma_drops_outlier_modules(uneven):
    composer, parts = uneven
    filtered = prepared(composer, KLoRA(), ["content", "style"])
    plain = prepared(composer, KLoRA(gamma_filter=None), ["content", "style"])
    assert filtered.gamma[0].item() == pytest.approx(released_gamma(parts["content"], parts["style"]), rel=1e-6)
    assert plain.gamma[0].item() > 1.2 * filtered.gamma[0].item(), "the outlier must move the plain mean"
    assert filtered.gamma[1].item() == plain.gamma[1].item() == 1.0
    both = ("unet", "text_encoder")
    assert prepared(composer, KLoRA(reference=True), ["content", "style"]).gamma[0].item() == pytest.approx(
        released_gamma(parts["content"], parts["style"], both), rel=1e-6
    ), "the released code measures every module of the files"


def test_s_star_falls_where_the_released_modulo_does():
    """s*: β = 0.85 α and the factor taken modulo α, computed in the released order of
    operations, so that the wrap (1.5 at p = 0.15) lands on the same layer calls."""
    method = KLoRA(scale="s*")
    assert method.beta == pytest.approx(1.275)
    for total in (20, 25 * 56, 28000):
        count = torch.arange(total, dtype=torch.float64)
        got = method.style_scale(count, total).tolist()
        assert got == [released_scale(c, total, "s*") for c in range(total)]
    assert KLoRA().beta == 0.5 and KLoRA(scale="s*", beta=1.0).beta == 1.0


def test_reference_fixes_its_settings(uneven):
    method = KLoRA(reference=True)
    assert (method.top_k, method.gamma_filter, method.scale, method.progress) == (None, 3.0, "s*", "calls")
    assert method.beta == pytest.approx(1.275) and not method.text_encoder_loras
    assert KLoRA(**method.parameters()) == method, "a recorded reference method rebuilds"
    for wrong in ({"top_k": 64}, {"scale": "s"}, {"gamma_filter": None}, {"beta": 0.5}, {"progress": "step"}):
        with pytest.raises(ValueError, match="reference=True fixes"):
            KLoRA(reference=True, **wrong)
    assert default_lora_scale(method) == default_lora_scale("klora", {"reference": True}) == 1.0
    assert default_lora_scale("klora") == default_lora_scale(KLoRA()) == 0.8


def test_reference_refuses_what_the_released_code_cannot_compose(pair):
    """The released code composes one content and one style LoRA: ``reference=True``
    refuses one LoRA, three, or two of one role before any step, saying why, rather than
    run K-LoRA's N-LoRA rule under the reference's name; roles can make a pair of them."""
    with pytest.raises(ValueError, match=r"exactly one content and one style LoRA.*got 1 \(content: content\)"):
        pair.generate(
            PROMPT, ["content"], KLoRA(reference=True), sampling=SamplingConfig(steps=1, width=SIZE, height=SIZE)
        )
    both_content = KLoRA(reference=True, roles={"style": "content"})
    with pytest.raises(ValueError, match=r"got 2 \(content: content, style: content\)"):
        prepared(pair, both_content, ["content", "style"])
    three = [("a", "character"), ("b", "style"), ("c", "object")]
    assert "got 3" in KLoRA(reference=True).cannot_compose(three)
    assert KLoRA().cannot_compose(three) is None and KLoRA().cannot_compose(three[:1]) is None
    assert KLoRA(reference=True, roles={"a": "style", "b": "content"}).cannot_compose(three[:2]) is None


def test_reference_keeps_to_attention_projections(tmp_path):
    """The released code puts K-LoRA layers on the attention projections only: a LoRA
    that also targets feed-forward layers gets no layer there."""
    pipe = tiny_pipeline("sd1")
    composer = Composer.tiny("sd1")
    targets = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$|ff\.net\.2$")
    for name, category, seed in (("content", "character", 41), ("style", "style", 42)):
        state = peft_state_dict(lora_parts(pipe, seed=seed, unet_pattern=targets, text=False))
        composer.load_lora(write(tmp_path / f"{name}.safetensors", state), name=name, category=category)
    ours = prepared(composer, KLoRA(), ["content", "style"])
    reference = prepared(composer, KLoRA(reference=True), ["content", "style"])
    ff = [i for i, layer in enumerate(ours.context.layers) if "ff.net" in layer]
    attention = [i for i, layer in enumerate(ours.context.layers) if "attn" in layer]
    assert ff and ours.present[ff].all() and reference.present[ff].sum() == 0
    assert reference.present[attention].all()


class ReleasedKLoRALayer(nn.Module):
    """``KLoRALinearLayer`` in a ``LoRACompatibleLinear`` at scale 1, as read from
    klora.py: every call advances the shared counter, recomputes both top-K sums with
    ``K = r_c r_s`` and adds content's ``up down`` iff ``(S_c / γ) / (S_s scale) > 1``."""

    def __init__(self, base: nn.Linear, content, style, gamma: float, counter: list[int], total: int) -> None:
        super().__init__()
        self.base, self.gamma, self.counter, self.total = base, gamma, counter, total
        self.w1, self.w2 = content[1] @ content[0], style[1] @ style[0]
        self.k = content[1].shape[1] * style[1].shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter[0] += 1
        scale = released_scale(self.counter[0] % self.total, self.total, "s*")
        top1 = self.w1.abs().flatten().topk(self.k).values.sum() / self.gamma
        top2 = self.w2.abs().flatten().topk(self.k).values.sum() * scale
        weight = self.w1 if top1 / top2 > 1 else self.w2
        return self.base(x) + F.linear(x, weight)


def test_reference_generation_equals_the_released_layers(uneven):
    """``KLoRA(reference=True)`` at its default LoRA scale (1) equals a diffusers UNet whose
    attention projections are the released K-LoRA layers, counter sized to the steps;
    the text encoder carries no LoRA."""
    composer, parts = uneven
    steps = 6
    method = KLoRA(reference=True)
    got = composer.generate(
        PROMPT,
        ["content", "style"],
        method,
        seed=3,
        sampling=SamplingConfig(steps=steps, width=SIZE, height=SIZE),
        run=AS_LATENTS,
    )

    pipe = tiny_pipeline("sd1")
    gamma = released_gamma(parts["content"], parts["style"], ("unet", "text_encoder"))
    counter, modules = [0], sorted(parts["content"]["unet"])
    for name in modules:
        parent, child = name.rsplit(".", 1)
        owner = pipe.unet.get_submodule(parent)
        layer = ReleasedKLoRALayer(
            getattr(owner, child),
            parts["content"]["unet"][name],
            parts["style"]["unet"][name],
            gamma,
            counter,
            steps * len(modules),
        )
        setattr(owner, child, layer)
    expected = reference_loop(pipe, PROMPT, lambda i: [lambda: None], steps=steps)
    assert counter[0] == steps * len(modules)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    per_step = prepared(composer, KLoRA(scale="s*"), ["content", "style"], steps=steps)
    assert not torch.equal(method.choices, per_step.choices), "the choices must drift within a step"
    assert set(method.choices.flatten().tolist()) == {0, 1}


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
    got = pair.generate(PROMPT, loras=names, method="klora", seed=3, sampling=SAMPLING, run=AS_LATENTS)

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
        "x",
        loras=["l0", "l1", "l2"],
        method="klora",
        sampling=SamplingConfig(steps=2, width=SIZE, height=SIZE),
        run=AS_LATENTS,
    )
    assert torch.isfinite(latents).all()
