"""LoRA files as kohya, A1111 and Civitai tools write and read them: the kohya and model-spec
metadata of the demo world's LoRAs, A1111's and Civitai's sidecars (read, and merged into
when the studio edits a LoRA), alpha, scale and hashes in ``compose inspect``, and the
LoRAs a model brings by name in ``inspect`` and ``generate``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run
from loras import kohya_state_dict, write
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save

from compose import Composer, LoRAError, load_lora
from compose.cli import _cli_lora
from compose.demo_world.concepts import CONCEPTS
from compose.demo_world.train import _save_lora
from compose.demo_world.world import demo_world_folder, lora_path
from compose.layers import Factors
from compose.loading import write_sidecar

WORLD = demo_world_folder()
A1111_NOTES = {
    "description": "a knight in shining armor",
    "sd version": "SD1",
    "activation text": "sks knight, shining armor",
    "preferred weight": 0.7,
    "notes": "best at 0.7 with a castle background",
    "negative text": "",
}
CIVITAI_INFO = {
    "id": 12345,
    "name": "v1.0",
    "baseModel": "SD 1.5",
    "trainedWords": ["sks knight", "plate armor"],
    "model": {"name": "Knight LoRA", "type": "LORA"},
    "files": [{"name": "knight.safetensors", "hashes": {"AutoV2": "0123456789"}}],
}


def tensor_data_sha256(path: Path) -> str:
    """sha256 of a safetensors file after its 8-byte length and JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as handle:
        return dict(handle.metadata())


@pytest.fixture
def knight(tmp_path, lora_files) -> Path:
    """A real diffusers-format LoRA file in a folder of its own, with no sidecar yet."""
    path = tmp_path / "knight.safetensors"
    shutil.copyfile(lora_files["sd1", 0]["peft"], path)
    return path


# -- kohya metadata on the demo world's LoRAs -----------------------------------------


def saved_demo_lora(folder: Path, width: int = 128) -> Path:
    """A demo-world LoRA as the trainer saves it, from factors that need no training."""
    torch.manual_seed(0)
    table = {"mid_block.attentions.0.proj_in": Factors(torch.randn(8, width), torch.randn(width, 8))}
    path = folder / "world" / "loras" / "zorbo.safetensors"
    _save_lora(path, "zorbo", {"unet": table}, {"steps": 10, "lr": 0.001}, images=5)
    return path


def test_demo_loras_carry_the_keys_kohya_a1111_and_comfyui_read(tmp_path):
    path = saved_demo_lora(tmp_path)
    meta = metadata_of(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == meta["ss_network_alpha"] == "8"
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")  # A1111: an SD1 LoRA
    assert meta["ss_output_name"] == meta["modelspec.title"] == "zorbo" and meta["ss_sd_model_name"] == "world"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert json.loads(meta["ss_tag_frequency"]) == {"demo_world": {"zorbo creature": 5}}
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.trigger_phrase"] == "zorbo creature" and meta["compose_category"] == "character"
    data_hash = tensor_data_sha256(path)
    assert meta["sshs_model_hash"] == data_hash and meta["modelspec.hash_sha256"] == "0x" + data_hash
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # under 1 MiB, kohya hashes no bytes
    lora = load_lora(path)
    assert (lora.triggers, lora.category, lora.short_hash) == (["zorbo creature"], "character", data_hash[:12])


def test_legacy_hash_is_kohyas_over_a_file_with_only_its_training_keys(tmp_path):
    path = saved_demo_lora(tmp_path, width=40_000)  # 1.3 MB of fp16: past the 1 MiB offset
    meta = metadata_of(path)
    kohya_file = save(load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(kohya_file[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_saving_twice_writes_the_same_metadata_and_tensors(tmp_path):
    first, second = saved_demo_lora(tmp_path / "a"), saved_demo_lora(tmp_path / "b")
    assert metadata_of(first) == metadata_of(second)  # no date or clock in it (safetensors orders it at random)
    assert tensor_data_sha256(first) == tensor_data_sha256(second)


def test_the_shipped_demo_loras_still_load_and_hash_as_they_say():
    for name in ("zorbo", "vosh"):
        path = lora_path(WORLD, name)
        lora = load_lora(path)
        assert lora.triggers == [CONCEPTS[name].trigger] and lora.category == CONCEPTS[name].category
        assert metadata_of(path)["sshs_model_hash"][:12] == lora.short_hash == tensor_data_sha256(path)[:12]


def test_modelspec_trigger_phrase_gives_the_triggers_without_tag_counts(tmp_path, lora_files):
    tensors = load_file(lora_files["sd1", 0]["peft"])
    path = tmp_path / "paladin.safetensors"
    path.write_bytes(save(tensors, {"modelspec.trigger_phrase": "sks paladin, holy light"}))
    assert load_lora(path).triggers == ["sks paladin", "holy light"]


# -- A1111's and Civitai's sidecars ----------------------------------------------------


def test_a1111_user_metadata_gives_triggers_preferred_weight_and_notes(knight):
    knight.with_suffix(".json").write_text(json.dumps(A1111_NOTES), encoding="utf-8")
    lora = load_lora(knight)
    assert lora.triggers == ["sks knight", "shining armor"] and lora.preferred_weight == 0.7
    assert lora.notes == {"description": "a knight in shining armor", "notes": "best at 0.7 with a castle background",
                          "sd_version": "SD1"}  # fmt: skip


def test_our_triggers_win_over_activation_text_and_civitai(knight):
    knight.with_suffix(".json").write_text(json.dumps({**A1111_NOTES, "triggers": ["ours"]}), encoding="utf-8")
    knight.with_suffix(".civitai.info").write_text(json.dumps(CIVITAI_INFO), encoding="utf-8")
    assert load_lora(knight).triggers == ["ours"]
    knight.with_suffix(".json").write_text(json.dumps(A1111_NOTES), encoding="utf-8")
    assert load_lora(knight).triggers == ["sks knight", "shining armor"]  # ours (the .json) before Civitai's


def test_a_json_no_longer_hides_the_civitai_info(knight):
    knight.with_suffix(".json").write_text(json.dumps({"category": "character"}), encoding="utf-8")
    knight.with_suffix(".civitai.info").write_text(json.dumps(CIVITAI_INFO), encoding="utf-8")
    lora = load_lora(knight)
    assert lora.category == "character" and lora.triggers == ["sks knight", "plate armor"]
    assert lora.notes == {"civitai_model": "Knight LoRA", "civitai_base_model": "SD 1.5", "civitai_version": "v1.0"}


def test_preferred_weight_zero_is_unset_and_a_bad_one_is_refused(knight):
    sidecar = knight.with_suffix(".json")
    sidecar.write_text(json.dumps({"preferred weight": 0}), encoding="utf-8")
    assert load_lora(knight).preferred_weight is None
    sidecar.write_text(json.dumps({"preferred weight": "heavy"}), encoding="utf-8")
    with pytest.raises(LoRAError, match="knight.json: A1111's 'preferred weight' must be a number"):
        load_lora(knight)


def test_writing_our_fields_keeps_a1111s(knight):
    sidecar = knight.with_suffix(".json")
    sidecar.write_text(json.dumps(A1111_NOTES), encoding="utf-8")
    assert write_sidecar(knight, "character", ["sks knight"]) == sidecar
    assert json.loads(sidecar.read_text(encoding="utf-8")) == {**A1111_NOTES, "category": "character",
                                                               "triggers": ["sks knight"]}  # fmt: skip
    lora = load_lora(knight)
    assert (lora.category, lora.triggers, lora.preferred_weight) == ("character", ["sks knight"], 0.7)
    write_sidecar(knight, None, ["sks knight"])
    assert "category" not in json.loads(sidecar.read_text(encoding="utf-8"))
    assert sorted(p.name for p in knight.parent.iterdir()) == ["knight.json", "knight.safetensors"]  # no temp file


def test_an_unreadable_sidecar_is_refused_not_overwritten(knight):
    sidecar = knight.with_suffix(".json")
    sidecar.write_text('{"activation text": "sks knight",', encoding="utf-8")
    with pytest.raises(LoRAError, match="knight.json: sidecar is not valid JSON"):
        write_sidecar(knight, "character", ["sks knight"])
    assert sidecar.read_text(encoding="utf-8") == '{"activation text": "sks knight",'


def test_editing_in_the_studio_keeps_a1111s_fields(tmp_path, lora_files):
    from compose.app.studio import Studio

    library = tmp_path / "library"
    library.mkdir()
    shutil.copyfile(lora_files["sd1", 0]["peft"], library / "knight.safetensors")
    (library / "knight.json").write_text(json.dumps(A1111_NOTES), encoding="utf-8")
    studio = Studio("tiny:sd1", library, load=Composer.load, operator=True)  # editing is an operator action
    assert studio.composer.loras["knight"].triggers == ["sks knight", "shining armor"]
    studio.edit("knight", "character", "sks knight, armor")
    saved = json.loads((library / "knight.json").read_text(encoding="utf-8"))
    assert saved == {**A1111_NOTES, "category": "character", "triggers": ["sks knight", "armor"]}


# -- compose inspect: alpha, scale and hashes ----------------------------------------------


def kohya_with_alphas(path: Path, parts: dict, alphas: tuple[float, float]) -> Path:
    """A kohya file whose modules alternate between two alphas (all of rank 4)."""
    tensors = kohya_state_dict(parts, alpha=alphas[0])
    alpha_keys = sorted(k for k in tensors if k.endswith(".alpha"))
    for key in alpha_keys[::2]:
        stem = key.removesuffix(".alpha")
        tensors[f"{stem}.lora_down.weight"] *= alphas[0] / alphas[1]  # the same update, another alpha
        tensors[key] = torch.tensor(alphas[1])
    return write(path, tensors)


def test_inspect_shows_alpha_rank_scale_and_every_hash(capsys, tmp_path, lora_files):
    path = kohya_with_alphas(tmp_path / "mixed.safetensors", lora_files["sd1", 1]["parts"], (2.0, 8.0))
    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["rank"], summary["alpha"], summary["scale"]) == (4, [2.0, 8.0], [0.5, 2.0])
    assert summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert summary["civitai_autov2"] == summary["sha256"][:10].upper()
    assert summary["a1111_hash"] == tensor_data_sha256(path)[:12]
    code, out, _ = run(capsys, "inspect", path)
    assert re.search(r"\nalpha +2 to 8 \(varies by layer\)\n", out) and re.search(r"\nscale +0.5 to 2 \(varies", out)


def test_inspect_shows_one_alpha_where_the_file_has_one(capsys, lora_files):
    code, out, err = run(capsys, "inspect", lora_files["sd1", 2]["kohya"], "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["format"], summary["rank"], summary["alpha"], summary["scale"]) == ("kohya", 4, 2.0, 0.5)


def test_inspect_on_the_real_sd15_files(capsys, fixtures_dir):
    for path in sorted(fixtures_dir.glob("*.safetensors")):
        code, out, err = run(capsys, "inspect", path, "--json")
        assert code == 0, err
        summary = json.loads(out)
        assert (summary["format"], summary["base_family"]) == ("attn-processor", "SD1.x")
        assert (summary["rank"], summary["alpha"], summary["scale"]) == (4, None, 1.0)  # no alphas: scale 1
        assert summary["a1111_hash"] == tensor_data_sha256(path)[:12]
        assert summary["civitai_autov2"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10].upper()
        _, text, _ = run(capsys, "inspect", path)
        assert re.search(r"\nalpha +none stored \(scale 1\)\n", text)


# -- LoRAs the model brings, by name and by path -------------------------------------------


def test_inspect_takes_the_names_the_demo_world_brings(capsys):
    code, out, err = run(capsys, "inspect", "zorbo", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["name"] == "zorbo" and Path(summary["file"]) == lora_path(WORLD, "zorbo")
    assert summary["triggers"] == ["zorbo creature"]


def test_inspect_of_an_unknown_name_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "inspect", "nosuch")
    assert code == 2 and "nosuch: no such file, and no LoRA of that name comes with the model" in err
    assert all(name in err for name in CONCEPTS)
    code, _, err = run(capsys, "inspect", "nosuch", "--model", "tiny:sd1")
    assert code == 2 and "(it brings none)" in err


@pytest.fixture(scope="module")
def world() -> Composer:
    return Composer.load("demo-world")


def test_the_same_file_by_path_is_the_loaded_lora(world):
    zorbo = world.loras["zorbo"]
    assert world.load_lora(lora_path(WORLD, "zorbo")) is zorbo
    assert _cli_lora(world, str(lora_path(WORLD, "zorbo")), False, None) is zorbo
    assert _cli_lora(world, "zorbo", False, None) is zorbo


def test_another_file_under_a_taken_name_is_refused(world, tmp_path):
    impostor = tmp_path / "zorbo.safetensors"
    shutil.copyfile(lora_path(WORLD, "flimbo"), impostor)
    with pytest.raises(LoRAError, match=r"a different LoRA named 'zorbo' is already loaded .*another name"):
        world.load_lora(impostor)
    assert world.loras["zorbo"].path == str(lora_path(WORLD, "zorbo"))
    assert world.load_lora(impostor, name="impostor").name == "impostor"
    world.unload_lora("impostor")


def test_generate_lora_nosuch_lists_what_the_model_brings(world):
    with pytest.raises(ValueError, match="nosuch: no such file") as refused:
        _cli_lora(world, "nosuch", False, None)
    assert all(name in str(refused.value) for name in CONCEPTS)


def test_generate_with_a_demo_lora_by_path(capsys, tmp_path):
    out = tmp_path / "zorbo.png"
    code, printed, err = run(capsys, "generate", "--prompt", "a zorbo creature on the left", "--lora",
                             f"{lora_path(WORLD, 'zorbo')}:0.8", "--steps", "2", "--out", out)  # fmt: skip
    assert code == 0, err
    with Image.open(out) as image:
        record = json.loads(image.info["compose"])
    assert [(lora["name"], lora["weight"]) for lora in record["loras"]] == [("zorbo", 0.8)]
