"""The ViT equals transformers' SiglipVisionModel, and keeps nanoVLM's parameter names."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from nanovlm.config import VLMConfig
from nanovlm.models import ViT
from nanovlm.models.hf_import import TensorFile, copy_into, vision_tensors, vit_fields
from toolchain import needs_cxx


def _siglip(tmp_path):
    torch.manual_seed(0)
    hf_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                image_size=32, patch_size=8, layer_norm_eps=1e-6)
    model = SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():  # fresh inits leave biases at 0 and LayerNorms at identity: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    return model, hf_cfg


def _siglip_and_ours(tmp_path):
    """The random SigLIP reference and our ViT loaded with its weights (eval mode)."""
    reference, hf_cfg = _siglip(tmp_path)
    cfg = VLMConfig(**vit_fields(hf_cfg))
    ours = ViT(cfg).eval()
    src = TensorFile(tmp_path)
    copy_into(ours, vision_tensors(src, src.prefix_of("embeddings.patch_embedding.weight"), cfg.vit_n_blocks), "siglip")
    return reference, ours


def test_vit_matches_siglip_vision_model_last_hidden_state(tmp_path):
    reference, ours = _siglip_and_ours(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
        got = ours(images)
    assert got.shape == (3, 16, 32)
    assert (got - expected).abs().max().item() <= 1e-4


def test_vit_parameter_names_match_nanovlm_checkpoints():
    cfg = VLMConfig(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=1, vit_img_size=32,
                    vit_patch_size=8)
    state = ViT(cfg).state_dict()
    assert state["patch_embedding.position_embedding"].shape == (1, 16, 32)
    assert state["blocks.0.attn.qkv_proj.weight"].shape == (96, 32)
    assert state["blocks.0.attn.qkv_proj.bias"].shape == (96,)
    for key in ("patch_embedding.conv.weight", "patch_embedding.conv.bias", "blocks.0.ln1.weight",
                "blocks.0.ln2.bias", "blocks.0.attn.out_proj.weight", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.bias", "layer_norm.weight", "layer_norm.bias"):
        assert key in state


def test_vit_with_cls_token_returns_only_patch_tokens():
    cfg = VLMConfig(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=1, vit_img_size=32,
                    vit_patch_size=8, vit_cls_flag=True)
    vit = ViT(cfg)
    assert vit.patch_embedding.position_embedding.shape == (1, 17, 32)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)


def test_images_of_another_size_are_refused_with_the_expected_size():
    cfg = VLMConfig(vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=4, vit_n_blocks=1, vit_img_size=32,
                    vit_patch_size=8)
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\].*vit_img_size=32"):
        ViT(cfg)(torch.randn(2, 3, 40, 40))


@needs_cxx
def test_vit_with_the_cpu_kernels_compiled_matches_siglip_and_eager_gradients(tmp_path):
    # nanovlm.accel's CPU forms (attention written out, GELU as x * sigmoid(2u)), compiled:
    # still SigLIP's outputs, and the plain eager model's gradients.
    from nanovlm.accel import apply_cpu_kernels

    reference, ours = _siglip_and_ours(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
    grads = []
    for accelerated in (False, True):
        forward = torch.compile(apply_cpu_kernels(ours), dynamic=False) if accelerated else ours
        ours.zero_grad()
        out = forward(images)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
        assert (out.detach() - expected).abs().max().item() <= 1e-4
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5), name
