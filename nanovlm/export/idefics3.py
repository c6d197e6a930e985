"""`nanovlm export --format transformers`: a checkpoint as transformers' Idefics3 (SmolVLM's
architecture: SigLIP, pixel shuffle, Llama), a directory that `AutoModelForImageTextToText` and
`AutoProcessor` load by themselves. docs/export.md has the full mapping.

    VLMConfig vit_*            -> Idefics3Config.vision_config (SigLIP, GELU-tanh, no CLS token)
    VLMConfig lm_*             -> text_config (Llama, plain RoPE)
    mp_pixel_shuffle_factor    -> scale_factor (the same (i*s + j)*D + c feature order)
    image_token_id, lm_tie_weights -> image_token_id, tie_word_embeddings
    weights                    -> an explicit key table: every one of our tensors is exactly one
                                  Idefics3 tensor (the ViT's fused qkv splits into q, k, v); a
                                  strict load into the Idefics3 model asserts every key and shape

The vocabulary keeps our ids. Rows are appended for the tokens Idefics3's processor needs and
the tokenizer lacks (idefics3_processor.py); each is the mean of the existing rows, so its logit
(the mean of the real logits) never exceeds the largest real one: greedy decoding never picks it.
The benchmark's reference (nanovlm/bench/reference.py) is `to_idefics3` without those rows.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from nanovlm.config import ConfigError, VLMConfig

logger = logging.getLogger(__name__)


class ExportError(ConfigError):
    """A model that cannot be exported as asked (the message names the setting and why)."""


def check_exportable(cfg: VLMConfig) -> None:
    """`ExportError` for a model Idefics3 cannot compute."""
    problems = []
    if cfg.vit_cls_flag:
        problems.append("vit_cls_flag=True (Idefics3's vision tower has no CLS token)")
    if cfg.lm_attn_scaling != 1.0:
        problems.append(f"lm_attn_scaling={cfg.lm_attn_scaling} (Llama scales attention by 1/sqrt(head_dim) only)")
    if problems:
        raise ExportError("Cannot export to Idefics3: " + "; ".join(problems) + ".")


def idefics3_config(cfg: VLMConfig, vocab_size: Optional[int] = None, attn_implementation: str = "sdpa"):
    """An `Idefics3Config` for the same network as `cfg`; `vocab_size` >= lm_vocab_size appends rows."""
    from transformers import Idefics3Config

    check_exportable(cfg)
    vision = dict(
        hidden_size=cfg.vit_hidden_dim, intermediate_size=cfg.vit_inter_dim, num_hidden_layers=cfg.vit_n_blocks,
        num_attention_heads=cfg.vit_n_heads, image_size=cfg.vit_img_size, patch_size=cfg.vit_patch_size,
        layer_norm_eps=cfg.vit_ln_eps, hidden_act="gelu_pytorch_tanh", attention_dropout=cfg.vit_dropout,
    )
    text = dict(
        model_type="llama", hidden_size=cfg.lm_hidden_dim, intermediate_size=cfg.lm_inter_dim,
        num_hidden_layers=cfg.lm_n_blocks, num_attention_heads=cfg.lm_n_heads,
        num_key_value_heads=cfg.lm_n_kv_heads, vocab_size=vocab_size or cfg.lm_vocab_size, rms_norm_eps=cfg.lm_rms_eps,
        max_position_embeddings=cfg.lm_max_position_embeddings, attention_dropout=cfg.lm_dropout,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.lm_re_base)},
        tie_word_embeddings=cfg.lm_tie_weights, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=cfg.mp_pixel_shuffle_factor,
                            image_token_id=cfg.image_token_id, tie_word_embeddings=cfg.lm_tie_weights, pad_token_id=0)
    config._attn_implementation = attn_implementation
    return config


def idefics3_state_dict(model: torch.nn.Module, vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Our `VisionLanguageModel`'s weights under Idefics3 names (shared tensors, not copies);
    the vocabulary grown to `vocab_size` with mean rows."""
    cfg: VLMConfig = model.cfg
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    v, hv = "vision_encoder.", "model.vision_model."
    out[hv + "embeddings.patch_embedding.weight"] = sd[v + "patch_embedding.conv.weight"]
    out[hv + "embeddings.patch_embedding.bias"] = sd[v + "patch_embedding.conv.bias"]
    out[hv + "embeddings.position_embedding.weight"] = sd[v + "patch_embedding.position_embedding"][0]  # [1,N,D] -> [N,D]
    d = cfg.vit_hidden_dim
    for i in range(cfg.vit_n_blocks):
        b, hb = f"{v}blocks.{i}.", f"{hv}encoder.layers.{i}."
        for ours_name, hf_name in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{hb}{hf_name}.{p}"] = sd[f"{b}{ours_name}.{p}"]
        for p in ("weight", "bias"):
            q, k, val = sd[f"{b}attn.qkv_proj.{p}"].split(d, dim=0)       # rows [q; k; v]
            out[f"{hb}self_attn.q_proj.{p}"], out[f"{hb}self_attn.k_proj.{p}"], out[f"{hb}self_attn.v_proj.{p}"] = q, k, val
    for p in ("weight", "bias"):
        out[f"{hv}post_layernorm.{p}"] = sd[f"{v}layer_norm.{p}"]
    out["model.connector.modality_projection.proj.weight"] = sd["MP.proj.weight"]
    t, ht = "decoder.", "model.text_model."
    for i in range(cfg.lm_n_blocks):
        b, hb = f"{t}blocks.{i}.", f"{ht}layers.{i}."
        for ours_name, hf_name in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                                   ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                                   ("attn.v_proj", "self_attn.v_proj"), ("attn.out_proj", "self_attn.o_proj"),
                                   ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                                   ("mlp.down_proj", "mlp.down_proj")):
            out[f"{hb}{hf_name}.weight"] = sd[f"{b}{ours_name}.weight"]
    out[ht + "norm.weight"] = sd[t + "norm.weight"]
    rows = vocab_size or cfg.lm_vocab_size
    out[ht + "embed_tokens.weight"] = _with_mean_rows(sd[t + "token_embedding.weight"], rows)
    out["lm_head.weight"] = _with_mean_rows(sd[t + "head.weight"], rows)
    return out


def _with_mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, D] -> [rows, D], the new rows the mean of the existing ones."""
    if rows < weight.shape[0]:
        raise ExportError(f"The export's vocabulary ({rows}) is smaller than the model's ({weight.shape[0]}).")
    if rows == weight.shape[0]:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def to_idefics3(model: torch.nn.Module, vocab_size: Optional[int] = None, attn_implementation: str = "sdpa"):
    """An `Idefics3ForConditionalGeneration` holding a copy of our weights, on our model's device."""
    from transformers import Idefics3ForConditionalGeneration

    cfg: VLMConfig = model.cfg
    hf = Idefics3ForConditionalGeneration(idefics3_config(cfg, vocab_size, attn_implementation))
    exported = idefics3_state_dict(model, vocab_size)
    target = hf.state_dict()
    missing, unexpected = set(target) - set(exported), set(exported) - set(target)
    if missing or unexpected:
        raise RuntimeError(f"Idefics3 export mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    for name, tensor in exported.items():
        if tuple(target[name].shape) != tuple(tensor.shape):
            raise RuntimeError(f"Idefics3 export: {name} has shape {tuple(tensor.shape)}, Idefics3 expects "
                               f"{tuple(target[name].shape)}.")
    hf.load_state_dict({k: t.detach().clone() for k, t in exported.items()}, strict=True)
    if cfg.lm_tie_weights and hf.lm_head.weight.data_ptr() != hf.model.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("The exported lm_head is not tied to its embeddings although lm_tie_weights=True.")
    return hf.to(next(model.parameters()).device)


def export_transformers(checkpoint: str | Path, output: str | Path, tokenizer: Optional[str] = None) -> list[str]:
    """Write `checkpoint` (ours, or one written by nanoVLM's code) to `output` as an Idefics3
    directory: config, safetensors, generation config, tokenizer with its chat template,
    processor files and a model card. Returns what Idefics3's processor does differently for
    this model (`processor_differences`), which the model card lists too."""
    from nanovlm.export import idefics3_processor as proc
    from nanovlm.export.checkpoint_files import checkpoint_tokenizer, training_details
    from nanovlm.export.model_card import model_card
    from nanovlm.models import VisionLanguageModel

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists and is not an empty directory; choose a new one.")
    model = VisionLanguageModel.from_pretrained(checkpoint).eval()
    cfg = model.cfg
    check_exportable(cfg)
    hf_tokenizer = proc.export_tokenizer(checkpoint_tokenizer(checkpoint, cfg, tokenizer), cfg)
    hf_model = to_idefics3(model.float(), vocab_size=len(hf_tokenizer))
    hf_model.config._attn_implementation = None   # let the loader choose, as for any Hub checkpoint
    proc.set_generation_defaults(hf_model, hf_tokenizer)
    differences = proc.processor_differences(cfg)
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(str(tmp))
        proc.build_processor(hf_tokenizer, cfg).save_pretrained(str(tmp))
        train_cfg, metrics, step = training_details(checkpoint)
        card = model_card(cfg, train_cfg=train_cfg, metrics=metrics, step=step, library="transformers",
                          usage=proc.transformers_usage(cfg), notes=differences)
        (tmp / "README.md").write_text(card)
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %s to %s (Idefics3, vocabulary %d).", checkpoint, output, len(hf_tokenizer))
    return differences
