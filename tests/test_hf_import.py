"""Importing Hugging Face checkpoints from local directories: SigLIP + Llama backbones into a fresh
VLM, and a whole Idefics3 (SmolVLM) model, each checked against transformers' own forward."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM,
                          SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

from nanovlm.config import VLMConfig
from nanovlm.models import VisionLanguageModel
from nanovlm.models.hf_import import HFImportError

VOCAB = 80
IMAGE_TOKEN = 77


def _perturb(model):
    # Fresh inits leave biases at 0 and norms at identity, which would hide mapping mistakes.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _vision_kwargs():
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                patch_size=8)


def _text_kwargs(tied):
    return dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, rope_theta=20000.0, max_position_embeddings=256, tie_word_embeddings=tied,
                pad_token_id=0)


@pytest.fixture()
def backbones(tmp_path):
    torch.manual_seed(0)
    siglip = _perturb(SiglipModel(SiglipConfig(
        vision_config=_vision_kwargs(),
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=16))))
    llama = _perturb(LlamaForCausalLM(LlamaConfig(**_text_kwargs(tied=True))))
    siglip.save_pretrained(tmp_path / "siglip")
    llama.save_pretrained(tmp_path / "llama")
    # The config we start from has the 222M sizes; the checkpoints' own configs must win.
    cfg = VLMConfig(vit_model_type=str(tmp_path / "siglip"), lm_model_type=str(tmp_path / "llama"),
                    mp_pixel_shuffle_factor=2, lm_max_length=128)
    return siglip, llama, cfg


def test_backbone_import_reads_architecture_from_the_checkpoints(backbones):
    _, _, cfg = backbones
    model = VisionLanguageModel(cfg, load_backbone=True)
    c = model.cfg
    assert (c.vit_hidden_dim, c.vit_inter_dim, c.vit_n_heads, c.vit_n_blocks, c.vit_img_size, c.vit_patch_size) == \
        (32, 64, 4, 2, 32, 8)
    assert (c.lm_hidden_dim, c.lm_inter_dim, c.lm_n_heads, c.lm_n_kv_heads, c.lm_n_blocks) == (48, 96, 4, 2, 2)
    assert c.lm_re_base == 20000.0 and c.lm_max_position_embeddings == 256 and c.lm_tie_weights
    assert c.mp_image_token_length == 4
    assert (c.lm_base_vocab_size, c.lm_vocab_size) == (VOCAB, VOCAB + 1)  # one row for '<|image|>'
    assert cfg.vit_hidden_dim == 768  # the caller's config is not modified


def test_backbone_import_matches_siglip_and_llama_outputs(backbones):
    siglip, llama, cfg = backbones
    model = VisionLanguageModel(cfg, load_backbone=True).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        vit_diff = (model.vision_encoder(images) - siglip.vision_model(pixel_values=images).last_hidden_state)
        logits, _ = model(ids)
        lm_diff = logits[..., :VOCAB] - llama(input_ids=ids).logits
    assert vit_diff.abs().max().item() <= 1e-4
    assert lm_diff.abs().max().item() <= 1e-4


def test_extra_vocabulary_rows_start_at_the_mean_embedding(backbones):
    _, llama, cfg = backbones
    model = VisionLanguageModel(cfg, load_backbone=True)
    table = llama.model.embed_tokens.weight.detach()
    new_row = model.decoder.token_embedding.weight[VOCAB].detach()
    assert torch.allclose(new_row, table.mean(dim=0), atol=1e-6)
    assert model.decoder.head.weight is model.decoder.token_embedding.weight


def test_siglip_vision_model_layout_without_prefix_loads(tmp_path, backbones):
    _, _, cfg = backbones
    torch.manual_seed(1)
    vision = _perturb(SiglipVisionModel(SiglipVisionConfig(**_vision_kwargs())))
    vision.save_pretrained(tmp_path / "vision_only")
    model = VisionLanguageModel(cfg.replace(vit_model_type=str(tmp_path / "vision_only")), load_backbone=True)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        diff = model.vision_encoder(images) - vision(pixel_values=images).last_hidden_state
    assert diff.abs().max().item() <= 1e-4


def test_backbone_with_a_wrong_tensor_shape_fails_naming_the_key(tmp_path, backbones):
    _, _, cfg = backbones
    weights = tmp_path / "siglip" / "model.safetensors"
    tensors = load_file(weights)
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    tensors[key] = torch.zeros(32, 63)
    save_file(tensors, weights)
    with pytest.raises(HFImportError, match=r"blocks\.1\.mlp\.fc2\.weight.*\[32, 63\]"):
        VisionLanguageModel(cfg, load_backbone=True)


def test_missing_backbone_tensor_fails_naming_the_key(tmp_path, backbones):
    _, _, cfg = backbones
    weights = tmp_path / "llama" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(HFImportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        VisionLanguageModel(cfg, load_backbone=True)


# ---------------------------------------------------------------- Idefics3 / SmolVLM

@pytest.fixture()
def idefics3(tmp_path):
    torch.manual_seed(0)
    config = Idefics3Config(vision_config=_vision_kwargs(), text_config=_text_kwargs(tied=False),
                            scale_factor=2, image_token_id=IMAGE_TOKEN, pad_token_id=0)
    model = _perturb(Idefics3ForConditionalGeneration(config))
    model.save_pretrained(tmp_path / "smolvlm")
    return model, tmp_path / "smolvlm"


def _prompt_with_images(n_rows=2, n_images=1):
    torch.manual_seed(3)
    rows = []
    for _ in range(n_rows):
        text = torch.randint(1, IMAGE_TOKEN - 1, (5,)).tolist()
        ids = text[:2] + [IMAGE_TOKEN] * (4 * n_images) + text[2:]  # 4 image tokens per 32 px image
        rows.append(ids)
    return torch.tensor(rows)


def test_idefics3_import_matches_transformers_logits(idefics3):
    reference, path = idefics3
    ours = VisionLanguageModel.from_idefics3(path).eval()
    assert ours.image_token_id == IMAGE_TOKEN
    assert ours.cfg.mp_pixel_shuffle_factor == 2 and ours.cfg.mp_image_token_length == 4
    ids = _prompt_with_images()
    pixels = torch.rand(2, 1, 3, 32, 32) + 0.1   # Idefics3 drops all-zero images as padding
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        got, _ = ours(ids, images=pixels.flatten(0, 1))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_from_pretrained_recognises_an_idefics3_checkpoint(idefics3):
    reference, path = idefics3
    ours = VisionLanguageModel.from_pretrained(path).eval()
    ids = _prompt_with_images(n_rows=1, n_images=2)
    pixels = torch.rand(1, 2, 3, 32, 32) + 0.1
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        got, _ = ours(ids, images=pixels[0])
    assert (got - expected).abs().max().item() <= 1e-4


def test_non_idefics3_config_is_refused_by_name(tmp_path, idefics3):
    _, path = idefics3
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llava"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="llava"):
        VisionLanguageModel.from_idefics3(path)
