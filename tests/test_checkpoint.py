"""save_pretrained / from_pretrained: exact round trip, nanoVLM's published layout, and errors that
name the file and the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm.config import VLMConfig
from nanovlm.models import CheckpointError, VisionLanguageModel

TINY = dict(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=2, vit_img_size=32, vit_patch_size=8,
            lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=2,
            lm_base_vocab_size=100, extra_token_amount=1, lm_vocab_size=101, lm_max_length=64,
            lm_max_position_embeddings=128, mp_pixel_shuffle_factor=2, mp_image_token_length=4)


def _model(**changes):
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig(**{**TINY, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs():
    ids = torch.tensor([[1, 2] + [100] * 4 + [3, 4, 5]])
    return ids, torch.randn(1, 3, 32, 32)


def _logits(model, ids, images):
    with torch.no_grad():
        return model(ids, images=images)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_bit_identical_logits(tmp_path, tied):
    model = _model(lm_tie_weights=tied)
    ids, images = _inputs()
    model.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(model, ids, images), _logits(loaded, ids, images))
    assert (loaded.decoder.head.weight is loaded.decoder.token_embedding.weight) == tied


def test_config_json_is_the_config_dict(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == model.cfg.to_dict()
    assert VisionLanguageModel.from_pretrained(tmp_path).cfg == model.cfg


@pytest.mark.parametrize("kept", ["decoder.token_embedding.weight", "decoder.head.weight"])
def test_published_nanovlm_checkpoint_with_one_tied_tensor_and_legacy_fields_loads(tmp_path, kept):
    model = _model()
    ids, images = _inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = ({"decoder.token_embedding.weight", "decoder.head.weight"} - {kept}).pop()
    del state[dropped]
    save_file(state, tmp_path / "model.safetensors")
    config = model.cfg.to_dict()
    config.update(lm_use_tokens=False, lm_eos_token_id=0, max_img_size=config["vit_img_size"], resize_to_max_side_len=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(model, ids, images), _logits(loaded, ids, images))


def test_truncated_weights_fail_naming_the_file_and_the_tensor(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as info:
        VisionLanguageModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(weights) in message and "truncated" in message
    last = max(((name, entry) for name, entry in _header(data).items()), key=lambda kv: kv[1]["data_offsets"][1])[0]
    assert repr(last) in message


def test_shape_mismatch_fails_naming_the_file_and_the_tensor(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["MP.proj.weight"] = torch.zeros(32, 64)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'MP\.proj\.weight' has shape \[32, 64\]"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_missing_tensor_fails_naming_it(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["decoder.blocks.1.mlp.up_proj.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors lacks 1 tensor.*decoder\.blocks\.1\.mlp\.up_proj"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VisionLanguageModel.from_pretrained(tmp_path)


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header


def test_push_to_hub_uploads_config_weights_and_a_model_card(monkeypatch, tmp_path):
    from pathlib import Path
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    uploaded = {}

    def upload_folder(self, *, repo_id, repo_type, folder_path, commit_message):
        uploaded.update(repo_id=repo_id, repo_type=repo_type,
                        files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()})

    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=f"someone/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = _model()
    assert model.push_to_hub("tiny-vlm") == "someone/tiny-vlm"
    assert (uploaded["repo_id"], uploaded["repo_type"]) == ("someone/tiny-vlm", "model")
    assert {"config.json", "model.safetensors", "README.md", "image_processor.json"} <= set(uploaded["files"])
    card = uploaded["files"]["README.md"].decode()
    assert "nanovlm generate --checkpoint" in card and json.dumps(model.cfg.to_dict(), indent=2) in card
    assert json.loads(uploaded["files"]["config.json"]) == model.cfg.to_dict()


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        VisionLanguageModel.from_pretrained(str(tmp_path / "runs" / "step_000100"))
