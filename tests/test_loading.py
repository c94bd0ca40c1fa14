"""LoRA files: every format loads into the same record, and every refusal says why."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from loras import kohya_state_dict, lora_parts, peft_state_dict, write, write_kohya_with_tags

from compose import Composer, LoRAError, load_lora
from compose.loading import file_hashes
from compose.tiny import tiny_pipeline


def test_formats_give_the_same_factors(lora_files):
    peft = load_lora(lora_files["sd1", 0]["peft"])
    kohya = load_lora(lora_files["sd1", 0]["kohya"])
    assert (peft.format, kohya.format) == ("diffusers", "kohya")
    assert set(peft.factors) == {"unet", "text_encoder"}
    # kohya text-encoder keys carry transformers' old ``text_model.`` prefix
    kohya_te = {k.removeprefix("text_model."): v for k, v in kohya.factors["text_encoder"].items()}
    for component, table in peft.factors.items():
        other = kohya.factors["unet"] if component == "unet" else kohya_te
        assert table.keys() == other.keys()
        for module, f in table.items():
            torch.testing.assert_close(other[module].up @ other[module].down, f.up @ f.down)


def test_record_fields(tmp_path, lora_files):
    path = write_kohya_with_tags(
        tmp_path / "knight.safetensors",
        kohya_state_dict(lora_files["sd1", 1]["parts"], alpha=4.0),
        {"sks knight": 40, "armor": 12, "sword": 3, "castle": 1},
    )
    lora = load_lora(path, category="character")
    assert lora.name == "knight"
    assert lora.rank == 4 and lora.category == "character"
    assert lora.triggers == ["sks knight", "armor", "sword"]
    assert lora.family.startswith("unknown")
    assert "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in lora.targets
    assert lora.sha256 == file_hashes(path)[0] and len(lora.short_hash) == 12
    summary = lora.summary()
    assert summary["module_kinds"]["to_out.0"] == summary["module_kinds"]["to_q"]
    json.dumps(summary)


def test_sidecar_json(tmp_path, lora_files):
    path = tmp_path / "hat.safetensors"
    path.write_bytes(lora_files["sd1", 2]["peft"].read_bytes())
    path.with_suffix(".json").write_text(json.dumps({"category": "clothing", "trainedWords": ["red hat"]}))
    lora = load_lora(path)
    assert (lora.category, lora.triggers) == ("clothing", ["red hat"])
    with pytest.raises(LoRAError, match="category 'hats' is not one of"):
        load_lora(path, category="hats")


def test_unknown_keys_are_reported(tmp_path, lora_files):
    state = peft_state_dict(lora_files["sd1", 0]["parts"])
    state["unet.some.extra_tensor"] = torch.zeros(3)
    state["unet.not_a_module.lora_A.weight"] = torch.zeros(4, 32)
    state["unet.not_a_module.lora_B.weight"] = torch.zeros(32, 4)
    composer = Composer.tiny("sd1")
    lora = composer.load_lora(write(tmp_path / "extra.safetensors", state))
    assert lora.unused_keys == ["unet.not_a_module", "unet.some.extra_tensor"]


def refusal(path, match, **kwargs):
    with pytest.raises(LoRAError, match=match) as info:
        load_lora(path, **kwargs)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    refusal(tmp_path / "nope.safetensors", "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    refusal(path, r"empty \(0 bytes\)")


@pytest.mark.parametrize("cut", [4, 40, -100])
def test_truncated_file(tmp_path, lora_files, cut):
    data = lora_files["sd1", 0]["peft"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    refusal(path, "not a valid safetensors file")


def test_corrupt_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64)
    refusal(path, "not a valid safetensors file")


def test_pickle_needs_opt_in_and_stays_weights_only(tmp_path, lora_files):
    state = peft_state_dict(lora_files["sd1", 0]["parts"])
    path = tmp_path / "old.bin"
    torch.save(state, path)
    refusal(path, "pickle file, which can run code")
    assert load_lora(path, allow_pickle=True).format == "diffusers"

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"unet.x.lora_A.weight": Exploit()}))
    refusal(evil, "weights-only pickle", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, lora_files, bad):
    state = peft_state_dict(lora_files["sd1", 0]["parts"])
    key = sorted(state)[3]
    state[key] = state[key].clone()
    state[key][0, 0] = bad
    refusal(write(tmp_path / "nan.safetensors", state), f"tensor {key.replace('.', '[.]')} contains NaN or Inf")


def test_not_a_lora(tmp_path):
    refusal(write(tmp_path / "model.safetensors", {"conv.weight": torch.zeros(2, 2)}), "holds no LoRA weights")


def test_lycoris_loha_refused(tmp_path):
    state = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}
    refusal(write(tmp_path / "loha.safetensors", state), "LyCORIS")


def test_lora_for_another_model_is_refused(tmp_path):
    """An SDXL-shaped LoRA on an SD1-shaped model: the message names both shapes and
    the family the file was made for."""
    xl = tiny_pipeline("sdxl")
    path = write(tmp_path / "xl.safetensors", peft_state_dict(lora_parts(xl, seed=1)))
    composer = Composer.tiny("sd1")
    with pytest.raises(LoRAError, match="does not fit this base model") as info:
        composer.load_lora(path)
    assert "xl.safetensors" in str(info.value) and "made for" in str(info.value)
    assert composer.loras == {} and all(len(r) == 0 for r in composer.registries.values())


def test_family_mismatch_by_name(tmp_path):
    """Known families are compared before shapes: an SD1.5 LoRA on SDXL names both."""
    from compose.layers import Factors
    from compose.loading import LoRA

    lora = LoRA(
        "x",
        str(tmp_path / "x.safetensors"),
        "",
        "",
        "peft",
        "SD1.x",
        {"unet": {"a": Factors(torch.zeros(1, 768), torch.zeros(320, 1))}},
    )
    composer = Composer.tiny("sd1")
    composer.family = "SDXL"
    with pytest.raises(LoRAError, match="was made for SD1.x, but the base model is SDXL"):
        composer.add_lora(lora)
