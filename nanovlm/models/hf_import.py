"""Import Hugging Face checkpoints: SigLIP/SigLIP2 vision towers, Llama/SmolLM2 decoders, and
whole Idefics3/SmolVLM models.

Each source is a Hub id or a local directory holding `config.json` and safetensors weights
(one file or an index of shards). Architecture fields come from the checkpoint's own config;
every tensor is copied through an explicit key table with its shape asserted, and an error
names the key that did not fit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from nanovlm.config import ConfigError, VLMConfig

logger = logging.getLogger(__name__)


class HFImportError(ValueError):
    """A Hugging Face checkpoint does not have the layout or sizes the model needs."""


# ==================================================================== files

def resolve_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise download the Hub repo's configs and safetensors."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not str(name_or_path):
        raise ConfigError("No checkpoint given (empty vit_model_type / lm_model_type); set it to a Hub id "
                          "or a local directory, or build the model with load_backbone=False.")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(name_or_path), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


class TensorFile:
    """Read-only view of a checkpoint's tensors, single-file or sharded."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json.")
        self._handles = {name: safe_open(str(directory / name), framework="pt", device="cpu") for name in files}
        self._where = {key: name for name, handle in self._handles.items() for key in handle.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise HFImportError(f"Checkpoint {self.directory} has no tensor {key!r}.")
        return self._handles[self._where[key]].get_tensor(key)

    def prefix_of(self, suffix: str, avoid: tuple[str, ...] = ()) -> str:
        """The prefix before `suffix` in this file's keys (e.g. 'vision_model.' or '')."""
        for key in sorted(self._where, key=len):
            if key.endswith(suffix) and not any(a in key for a in avoid):
                return key[: -len(suffix)]
        raise HFImportError(f"Checkpoint {self.directory} has no tensor ending in {suffix!r}; "
                           "it is not the expected architecture.")


def copy_into(module: nn.Module, tensors: dict[str, torch.Tensor], origin: str,
              skip: tuple[str, ...] = ()) -> None:
    """Copy `tensors` (keys of `module.state_dict()`) into the module, asserting every shape."""
    state = module.state_dict()
    missing = [k for k in state if k not in tensors and not k.endswith(skip)]
    if missing:
        raise HFImportError(f"{origin}: no source tensor for {missing[:8]}.")
    with torch.no_grad():
        for key, value in tensors.items():
            if key not in state:
                raise HFImportError(f"{origin}: mapped tensor {key!r} is not a parameter of {type(module).__name__}.")
            if tuple(value.shape) != tuple(state[key].shape):
                raise HFImportError(f"{origin}: {key!r} has shape {list(value.shape)} in the checkpoint but "
                                   f"{list(state[key].shape)} in the model.")
            state[key].copy_(value)


# ==================================================================== configs

def _auto_config(directory: Path) -> Any:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(directory))


def _vision_config(hf: Any, origin: str) -> Any:
    """The SigLIP vision sub-config of a SiglipModel / SiglipVisionModel / Siglip2 / Idefics3 config."""
    vision = getattr(hf, "vision_config", None) or hf
    if getattr(vision, "image_size", None) is None:
        raise HFImportError(f"{origin} ({vision.model_type}) has no fixed image_size (a NaFlex SigLIP2?); "
                           "use a fixed-resolution checkpoint such as google/siglip2-base-patch16-512.")
    act = getattr(vision, "hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise HFImportError(f"{origin}: vision hidden_act={act!r}; this ViT implements GELU-tanh only.")
    return vision


def _text_config(hf: Any, origin: str) -> Any:
    text = getattr(hf, "text_config", None) or hf
    if text.model_type not in ("llama",):
        raise HFImportError(f"{origin}: language model type {text.model_type!r} is not supported; expected 'llama' "
                           "(Llama / SmolLM2).")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            raise HFImportError(f"{origin}: {flag}=True; this decoder has bias-free projections.")
    head_dim = getattr(text, "head_dim", None)
    if head_dim is not None and head_dim != text.hidden_size // text.num_attention_heads:
        raise HFImportError(f"{origin}: head_dim={head_dim} differs from hidden_size / num_attention_heads.")
    return text


def _rope_theta(text: Any, origin: str) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    scaling = getattr(text, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise HFImportError(f"{origin}: rope_type={rope_type!r}; only plain RoPE (rope_type 'default') is implemented.")
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None:
        raise HFImportError(f"{origin}: config has no rope_theta.")
    return float(theta)


def vit_fields(vision: Any) -> dict[str, Any]:
    return dict(vit_hidden_dim=vision.hidden_size, vit_inter_dim=vision.intermediate_size,
                vit_patch_size=vision.patch_size, vit_img_size=vision.image_size,
                vit_n_heads=vision.num_attention_heads, vit_n_blocks=vision.num_hidden_layers,
                vit_ln_eps=vision.layer_norm_eps, vit_dropout=float(getattr(vision, "attention_dropout", 0.0)),
                vit_cls_flag=False)


def lm_fields(text: Any, origin: str) -> dict[str, Any]:
    return dict(lm_hidden_dim=text.hidden_size, lm_inter_dim=text.intermediate_size,
                lm_n_heads=text.num_attention_heads,
                lm_n_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                lm_n_blocks=text.num_hidden_layers, lm_rms_eps=text.rms_norm_eps, lm_re_base=_rope_theta(text, origin),
                lm_max_position_embeddings=text.max_position_embeddings,
                lm_dropout=float(getattr(text, "attention_dropout", 0.0)))


def configure_from_backbones(cfg: VLMConfig) -> VLMConfig:
    """A copy of `cfg` whose vit_* / lm_* architecture fields come from the checkpoints named by
    `vit_model_type` and `lm_model_type`; the vocabulary keeps `cfg`'s extra rows."""
    vit_dir = resolve_dir(cfg.vit_model_type)
    lm_dir = resolve_dir(cfg.lm_model_type)
    vision = _vision_config(_auto_config(vit_dir), cfg.vit_model_type)
    lm_hf = _auto_config(lm_dir)
    text = _text_config(lm_hf, cfg.lm_model_type)
    changes = {**vit_fields(vision), **lm_fields(text, cfg.lm_model_type)}
    changes["lm_tie_weights"] = bool(getattr(lm_hf, "tie_word_embeddings", False))
    extra_rows = cfg.lm_vocab_size - cfg.lm_base_vocab_size
    changes["lm_base_vocab_size"] = text.vocab_size
    changes["lm_vocab_size"] = text.vocab_size + extra_rows
    changes["lm_max_length"] = min(cfg.lm_max_length, text.max_position_embeddings)
    grid = vision.image_size // vision.patch_size
    if grid % cfg.mp_pixel_shuffle_factor == 0:
        changes["mp_image_token_length"] = (grid // cfg.mp_pixel_shuffle_factor) ** 2
    if cfg.max_img_size == cfg.vit_img_size:   # no splitting: images stay one tile of the backbone's size
        changes["max_img_size"] = vision.image_size
    for name, value in changes.items():
        if getattr(cfg, name) != value:
            logger.info("%s=%r from the backbone checkpoints (config had %r)", name, value, getattr(cfg, name))
    return cfg.replace(**changes)


# ==================================================================== key tables

def vision_tensors(src: TensorFile, prefix: str, n_blocks: int) -> dict[str, torch.Tensor]:
    """SigLIP keys (under `prefix`) -> our ViT keys; q/k/v are concatenated into qkv_proj."""
    g = lambda key: src.get(prefix + key)  # noqa: E731
    out = {
        "patch_embedding.conv.weight": g("embeddings.patch_embedding.weight"),
        "patch_embedding.conv.bias": g("embeddings.patch_embedding.bias"),
        "patch_embedding.position_embedding": g("embeddings.position_embedding.weight").unsqueeze(0),  # [1, N, D]
        "layer_norm.weight": g("post_layernorm.weight"),
        "layer_norm.bias": g("post_layernorm.bias"),
    }
    for i in range(n_blocks):
        hf, ours = f"encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[ours + f"attn.qkv_proj.{kind}"] = torch.cat(
                [g(hf + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
            out[ours + f"attn.out_proj.{kind}"] = g(hf + f"self_attn.out_proj.{kind}")
            out[ours + f"ln1.{kind}"] = g(hf + f"layer_norm1.{kind}")
            out[ours + f"ln2.{kind}"] = g(hf + f"layer_norm2.{kind}")
            out[ours + f"mlp.fc1.{kind}"] = g(hf + f"mlp.fc1.{kind}")
            out[ours + f"mlp.fc2.{kind}"] = g(hf + f"mlp.fc2.{kind}")
    return out


def lm_tensors(src: TensorFile, prefix: str, n_blocks: int, vocab_size: int, tied: bool,
               head_key: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """Llama keys (under `prefix`) -> our LanguageModel keys, the vocabulary grown to `vocab_size`."""
    g = lambda key: src.get(prefix + key)  # noqa: E731
    out = {
        "token_embedding.weight": grow_vocab(g("embed_tokens.weight"), vocab_size, "embed_tokens.weight"),
        "norm.weight": g("norm.weight"),
    }
    if not tied:
        head = src.get(head_key) if head_key in src else g("embed_tokens.weight")  # a tied source, untied model
        out["head.weight"] = grow_vocab(head, vocab_size, head_key)
    for i in range(n_blocks):
        hf, ours = f"layers.{i}.", f"blocks.{i}."
        for p in ("q", "k", "v"):
            out[ours + f"attn.{p}_proj.weight"] = g(hf + f"self_attn.{p}_proj.weight")
        out[ours + "attn.out_proj.weight"] = g(hf + "self_attn.o_proj.weight")
        for p in ("gate", "up", "down"):
            out[ours + f"mlp.{p}_proj.weight"] = g(hf + f"mlp.{p}_proj.weight")
        out[ours + "norm1.weight"] = g(hf + "input_layernorm.weight")
        out[ours + "norm2.weight"] = g(hf + "post_attention_layernorm.weight")
    return out


def grow_vocab(weight: torch.Tensor, vocab_size: int, key: str) -> torch.Tensor:
    """[V_hf, D] -> [vocab_size, D]; new rows (the VLM's special tokens) start at the mean row, so
    they begin inside the distribution of the trained embeddings."""
    if weight.shape[0] > vocab_size:
        raise HFImportError(f"{key} has {weight.shape[0]} rows but lm_vocab_size={vocab_size}; raise lm_vocab_size.")
    extra = vocab_size - weight.shape[0]
    if extra == 0:
        return weight
    return torch.cat([weight, weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(extra, -1)])


# ==================================================================== entry points

def load_backbones(model: nn.Module) -> None:
    """Fill `model.vision_encoder` and `model.decoder` from `cfg.vit_model_type` / `cfg.lm_model_type`
    (the config was already set from them by `configure_from_backbones`)."""
    cfg = model.cfg
    vit_src = TensorFile(resolve_dir(cfg.vit_model_type))
    prefix = vit_src.prefix_of("embeddings.patch_embedding.weight", avoid=("text_model",))
    copy_into(model.vision_encoder, vision_tensors(vit_src, prefix, cfg.vit_n_blocks), cfg.vit_model_type)
    logger.info("Loaded vision backbone %s", cfg.vit_model_type)

    lm_src = TensorFile(resolve_dir(cfg.lm_model_type))
    prefix = lm_src.prefix_of("embed_tokens.weight")
    tensors = lm_tensors(lm_src, prefix, cfg.lm_n_blocks, cfg.lm_vocab_size, cfg.lm_tie_weights)
    copy_into(model.decoder, tensors, cfg.lm_model_type, skip=("rotary_embd.inv_freq", "head.weight"))
    logger.info("Loaded language backbone %s (%d extra vocabulary rows)", cfg.lm_model_type,
                cfg.lm_vocab_size - cfg.lm_base_vocab_size)


def idefics3_config(directory: Path, origin: str) -> tuple[VLMConfig, bool]:
    """VLMConfig equal to an Idefics3/SmolVLM checkpoint's architecture, and whether it ties
    its embeddings."""
    hf = _auto_config(directory)
    if hf.model_type not in ("idefics3", "smolvlm"):
        raise HFImportError(f"{origin} has model_type={hf.model_type!r}; expected 'idefics3' or 'smolvlm'.")
    vision = _vision_config(hf, origin)
    text = _text_config(hf, origin)
    tied = bool(getattr(hf, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    grid = vision.image_size // vision.patch_size
    cfg = VLMConfig(
        **vit_fields(vision), **lm_fields(text, origin),
        lm_base_vocab_size=text.vocab_size, extra_token_amount=0, lm_vocab_size=text.vocab_size,
        lm_tie_weights=tied, lm_max_length=min(text.max_position_embeddings, 8192),
        lm_model_type=str(origin), lm_tokenizer=str(origin), vit_model_type=str(origin),
        mp_pixel_shuffle_factor=hf.scale_factor, mp_image_token_length=(grid // hf.scale_factor) ** 2,
        # The checkpoint's tokenizer already holds its image token; the id comes from its config.
        vlm_extra_tokens={"image_token": "<image>"}, vlm_image_token_id=hf.image_token_id,
        vit_img_mean=0.5, vit_img_std=0.5,   # Idefics3's processor normalises to [-1, 1]
        vlm_load_backbone_weights=False, hf_repo_name=Path(str(origin)).name,
    )
    return cfg, tied


def load_idefics3(cls: Callable[..., nn.Module], repo_id_or_path: str | Path, revision: str | None = None) -> nn.Module:
    """A `VisionLanguageModel` with the weights of an Idefics3/SmolVLM checkpoint."""
    directory = resolve_dir(repo_id_or_path, revision)
    cfg, tied = idefics3_config(directory, str(repo_id_or_path))
    model = cls(cfg, load_backbone=False)
    src = TensorFile(directory)
    vision_prefix = src.prefix_of("vision_model.embeddings.patch_embedding.weight") + "vision_model."
    text_prefix = src.prefix_of("text_model.embed_tokens.weight") + "text_model."
    connector = src.prefix_of("connector.modality_projection.proj.weight") + "connector.modality_projection.proj.weight"
    copy_into(model.vision_encoder, vision_tensors(src, vision_prefix, cfg.vit_n_blocks), str(repo_id_or_path))
    copy_into(model.MP, {"proj.weight": src.get(connector)}, str(repo_id_or_path))
    copy_into(model.decoder, lm_tensors(src, text_prefix, cfg.lm_n_blocks, cfg.lm_vocab_size, tied),
              str(repo_id_or_path), skip=("rotary_embd.inv_freq", "head.weight"))
    logger.info("Imported %s (%s) into VisionLanguageModel; image token id %d", repo_id_or_path,
                "tied" if tied else "untied", cfg.image_token_id)
    return model
