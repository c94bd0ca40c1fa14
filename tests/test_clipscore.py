"""CLIPScore: the torchmetrics formula, batching, the model folder, and a CLIP that has learnt something."""

from __future__ import annotations

import json
import time

import huggingface_hub.constants
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file

from compose.evaluation.clipscore import CLIPScorer, CLIPWeightsNotFound, composition_text

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = {"red": "a red square", "blue": "a blue square"}


def tiny_scorer(folder, batch_size: int = 4) -> CLIPScorer:
    """A randomly initialised tiny CLIP, made by open_clip from a config folder without weights."""
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return CLIPScorer(model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}"), "cpu", batch_size, TINY_CLIP)


def square(color: str) -> Image.Image:
    return Image.new("RGB", (32, 32), color)


def random_images(count: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (count, 40, 48, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> CLIPScorer:
    """The tiny CLIP trained contrastively on a red and a blue square and their captions."""
    scorer = tiny_scorer(tmp_path_factory.mktemp("clip"))
    pixels = torch.stack([scorer.preprocess(square(c)) for c in CAPTIONS])
    tokens = scorer.tokenizer(list(CAPTIONS.values()))
    loss = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(scorer.model.parameters(), lr=1e-3)
    scorer.model.train()
    for _ in range(60):
        image_features, text_features, logit_scale = scorer.model(pixels, tokens)[:3]
        optimizer.zero_grad()
        loss(image_features, text_features, logit_scale).backward()
        optimizer.step()
    scorer.model.eval()
    return scorer


def test_score_is_the_torchmetrics_formula(tmp_path):
    scorer = tiny_scorer(tmp_path / "clip")
    images = random_images(5)
    texts = ["a cat", "a knight in a castle, wtrcolor", "", "red", "a very long caption " * 30]
    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(image) for image in images])
        image_features = F.normalize(scorer.model.encode_image(pixels), dim=-1)
        text_features = F.normalize(scorer.model.encode_text(open_clip.tokenize(texts)), dim=-1)
    expected = torch.clamp(100 * (image_features * text_features).sum(-1), min=0)
    assert (expected == 0).any() and (expected > 0).any()  # both sides of the clamp are exercised
    scores = scorer.score(images, texts)
    assert scores.shape == (5,)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        scorer.score(images[:3], texts[:2])


def test_batching_does_not_change_scores(tmp_path):
    scorer = tiny_scorer(tmp_path / "clip", batch_size=2)
    images = random_images(5)
    texts = [f"picture number {i}" for i in range(5)]
    in_batches = scorer.score(images, texts)
    scorer.batch_size = 5
    torch.testing.assert_close(in_batches, scorer.score(images, texts), atol=1e-4, rtol=1e-5)


def test_save_and_from_folder_give_identical_scores(tmp_path, trained):
    folder = trained.save(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    loaded = CLIPScorer.from_folder(folder, device="cpu")
    images = random_images(3) + [square("red")]
    texts = ["a red square", "a blue square", "noise", "a red square"]
    assert torch.equal(loaded.score(images, texts), trained.score(images, texts))
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(CLIPWeightsNotFound, match="saved: no open_clip_model.safetensors"):
        CLIPScorer.from_folder(folder, device="cpu")


def test_matching_caption_scores_higher(trained):
    for color, caption in CAPTIONS.items():
        other = next(c for c in CAPTIONS.values() if c != caption)
        matching, mismatched = trained.score([square(color)] * 2, [caption, other])
        assert matching > mismatched, (color, matching, mismatched)


def test_missing_pretrained_weights_fail_fast_and_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(CLIPWeightsNotFound) as raised:
        CLIPScorer.from_open_clip("ViT-B-16", "openai", device="cpu", cache_dir=str(tmp_path / "empty-cache"))
    assert time.perf_counter() - start < 5
    message = str(raised.value)
    assert "ViT-B-16/openai are not on this machine" in message
    assert "timm/vit_base_patch16_clip_224.openai/{open_clip_model.safetensors," in message
    assert str(tmp_path / "empty-cache") in message
    assert "open_clip.create_model_and_transforms('ViT-B-16', pretrained='openai'" in message
    with pytest.raises(CLIPWeightsNotFound, match="neither a known tag"):
        CLIPScorer.from_open_clip("ViT-B-16", str(tmp_path / "missing.safetensors"), device="cpu")


def test_composition_text():
    assert composition_text(["kamado nezuko", "black hair", "bamboolight"]) == "kamado nezuko, black hair, bamboolight"


def test_from_open_clip_loads_the_papers_model_from_the_cache(tmp_path, monkeypatch):
    """ViT-B-16 with the ``openai`` tag, from weights placed where open_clip's download puts
    them: found offline, with the tag's QuickGELU and preprocessing."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    weights = {k: v.half().contiguous() for k, v in open_clip.create_model("ViT-B-16-quickgelu").state_dict().items()}
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(weights, repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors")
    scorer = CLIPScorer.from_open_clip(device="cpu", cache_dir=str(tmp_path))
    loaded = scorer.model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in weights.items())
    assert isinstance(scorer.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert scorer.model_cfg["quick_gelu"] and scorer.model.visual.preprocess_cfg["interpolation"] == "bicubic"
    assert scorer.score([square("red")], ["a red square"]).shape == (1,)
