"""The reference implementation: transformers' `Idefics3ForConditionalGeneration` (SmolVLM's
architecture: SigLIP + pixel shuffle + Llama) built with a config equal to a `VLMConfig`,
carrying our model's weights, wrapped as a benchmark `Runner`.

The export table below is the inverse of a checkpoint import: every one of our parameters
maps to exactly one Idefics3 tensor (the fused ViT qkv splits into q, k, v), and every
Idefics3 tensor is written, with its shape asserted.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from nanovlm.bench.harness import DTYPES, SyntheticBatch
from nanovlm.config import ConfigError, VLMConfig
from nanovlm.training.optim import adamw


def idefics3_config(cfg: VLMConfig, attn_implementation: str = "sdpa"):
    """An `Idefics3Config` describing the same network as `cfg` (tied head, no CLS token)."""
    from transformers import Idefics3Config

    if cfg.vit_cls_flag:
        raise ConfigError("vit_cls_flag=True has no Idefics3 equivalent (its ViT has no CLS token); "
                          "benchmark against the reference with vit_cls_flag=False.")
    if cfg.lm_attn_scaling != 1.0:
        raise ConfigError(f"lm_attn_scaling={cfg.lm_attn_scaling} has no Llama equivalent; use 1.0.")
    vision = dict(
        hidden_size=cfg.vit_hidden_dim, intermediate_size=cfg.vit_inter_dim, num_hidden_layers=cfg.vit_n_blocks,
        num_attention_heads=cfg.vit_n_heads, image_size=cfg.vit_img_size, patch_size=cfg.vit_patch_size,
        layer_norm_eps=cfg.vit_ln_eps, hidden_act="gelu_pytorch_tanh", attention_dropout=cfg.vit_dropout,
    )
    text = dict(
        model_type="llama", hidden_size=cfg.lm_hidden_dim, intermediate_size=cfg.lm_inter_dim,
        num_hidden_layers=cfg.lm_n_blocks, num_attention_heads=cfg.lm_n_heads,
        num_key_value_heads=cfg.lm_n_kv_heads, vocab_size=cfg.lm_vocab_size, rms_norm_eps=cfg.lm_rms_eps,
        max_position_embeddings=cfg.lm_max_position_embeddings, attention_dropout=cfg.lm_dropout,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.lm_re_base)},
        tie_word_embeddings=cfg.lm_tie_weights, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=cfg.mp_pixel_shuffle_factor,
                            image_token_id=cfg.image_token_id, tie_word_embeddings=cfg.lm_tie_weights, pad_token_id=0)
    config._attn_implementation = attn_implementation
    return config


def export_state_dict(ours: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our `VisionLanguageModel` state dict under Idefics3 names."""
    cfg: VLMConfig = ours.cfg
    sd = ours.state_dict()
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
    out[ht + "embed_tokens.weight"] = sd[t + "token_embedding.weight"]
    for i in range(cfg.lm_n_blocks):
        b, hb = f"{t}blocks.{i}.", f"{ht}layers.{i}."
        for ours_name, hf_name in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                                   ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                                   ("attn.v_proj", "self_attn.v_proj"), ("attn.out_proj", "self_attn.o_proj"),
                                   ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                                   ("mlp.down_proj", "mlp.down_proj")):
            out[f"{hb}{hf_name}.weight"] = sd[f"{b}{ours_name}.weight"]
    out[ht + "norm.weight"] = sd[t + "norm.weight"]
    out["lm_head.weight"] = sd[t + "head.weight"]
    return out


def build_reference(ours: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """An Idefics3ForConditionalGeneration on the same device, holding a copy of our weights."""
    from transformers import Idefics3ForConditionalGeneration

    ref = Idefics3ForConditionalGeneration(idefics3_config(ours.cfg, attn_implementation))
    exported = export_state_dict(ours)
    target = ref.state_dict()
    missing = set(target) - set(exported)
    unexpected = set(exported) - set(target)
    if missing or unexpected:
        raise RuntimeError(f"Idefics3 export mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    for name, tensor in exported.items():
        if tuple(target[name].shape) != tuple(tensor.shape):
            raise RuntimeError(f"Idefics3 export: {name} has shape {tuple(tensor.shape)}, "
                               f"the reference expects {tuple(target[name].shape)}.")
    ref.load_state_dict({k: t.detach().clone() for k, t in exported.items()}, strict=True)
    if ours.cfg.lm_tie_weights and ref.lm_head.weight.data_ptr() != ref.model.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("The reference's lm_head is not tied to its embeddings; the comparison would be unfair.")
    device = next(ours.parameters()).device
    return ref.to(device)


class ReferenceRunner:
    """transformers' Idefics3 as a `Runner`: generation through `GenerationMixin.generate`
    (greedy, no EOS), training through its own loss (labels shifted inside)."""

    def __init__(self, model: torch.nn.Module, dtype: str = "float32", lr: float = 1e-4, name: str = "reference"):
        self.name = name
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = DTYPES[dtype]
        self.lr = lr
        self._optimizer: torch.optim.Optimizer | None = None
        self._infer_model: torch.nn.Module | None = None

    def _inference_model(self) -> torch.nn.Module:
        if self._infer_model is None:
            self._infer_model = self.model if self.dtype == torch.float32 else copy.deepcopy(self.model).to(self.dtype)
            self._infer_model.eval()
        return self._infer_model

    def _pixels(self, batch: SyntheticBatch) -> torch.Tensor:
        b = batch.batch_size
        return batch.images.view(b, batch.n_tiles, *batch.images.shape[1:])    # [B, n_tiles, 3, H, W]

    @torch.inference_mode()
    def encode_images(self, batch: SyntheticBatch) -> torch.Tensor:
        m = self._inference_model()
        return m.model.get_image_features(self._pixels(batch).to(self.dtype), return_dict=True).pooler_output

    @torch.inference_mode()
    def generate(self, batch: SyntheticBatch, max_new_tokens: int) -> torch.Tensor:
        m = self._inference_model()
        out = m.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=self._pixels(batch).to(self.dtype), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, batch.seq_len:]

    @torch.inference_mode()
    def logits(self, batch: SyntheticBatch) -> torch.Tensor:
        m = self._inference_model()
        return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=self._pixels(batch).to(self.dtype), use_cache=False).logits

    def loss(self, batch: SyntheticBatch) -> torch.Tensor:
        return self.model(**self._train_inputs(batch)).loss

    def _train_inputs(self, batch: SyntheticBatch) -> dict:
        # Our targets are already shifted (targets[t] = id at t+1); Idefics3 shifts labels itself.
        labels = torch.full_like(batch.targets, -100)
        labels[:, 1:] = batch.targets[:, :-1]
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=self._pixels(batch), labels=labels, use_cache=False)

    def train_step(self, batch: SyntheticBatch) -> None:
        if self._optimizer is None:
            self.model.train()
            self._optimizer = adamw(self.model.parameters(), lr=self.lr)  # fused, as HF's Trainer defaults to
        autocast = (contextlib.nullcontext() if self.dtype == torch.float32
                    else torch.autocast(device_type=self.device.type, dtype=self.dtype))
        with autocast:
            loss = self.model(**self._train_inputs(batch)).loss
        loss.backward()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
