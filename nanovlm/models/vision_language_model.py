"""VisionLanguageModel: ViT -> pixel-shuffle projector -> language model.

Image embeddings replace the image placeholder tokens (`image_token_id`) of the prompt, in
order; everything else is an ordinary causal language model. Checkpoints are a directory with
`config.json` (`VLMConfig.to_dict()`) and `model.safetensors`, the layout nanoVLM publishes, with
the tokenizer, image processor settings and a model card beside them (nanovlm/export/checkpoint_files.py).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import ConfigError, VLMConfig, json_kind, read_json_file
from nanovlm.models import generation
from nanovlm.models.checkpoint import load_weights, save_weights
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.modality_projector import ModalityProjector
from nanovlm.models.vision_transformer import ViT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# With tied embeddings, nanoVLM's checkpoints may keep only one of these two keys.
TIED_ALIASES = {"decoder.head.weight": "decoder.token_embedding.weight",
                "decoder.token_embedding.weight": "decoder.head.weight"}

HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Images = torch.Tensor | Sequence[torch.Tensor] | None


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, load_backbone: bool = False):
        super().__init__()
        if load_backbone:
            from nanovlm.models import hf_import
            cfg = hf_import.configure_from_backbones(cfg)
        self.cfg = cfg.validate()
        self.vision_encoder = ViT(cfg)
        self.MP = ModalityProjector(cfg)
        self.decoder = LanguageModel(cfg)
        self.image_token_id = cfg.image_token_id
        # The training tail (see `_supervised_loss`); nanovlm.accel may replace them (same maths).
        self.finish_rows = LanguageModel.finish     # (decoder, rows [N, D]) -> final hidden states [N, D]
        self.head_loss = head_cross_entropy         # (hidden [N, D], head, targets [N]) -> mean loss
        if load_backbone:
            hf_import.load_backbones(self)

    # ------------------------------------------------------------------ forward
    # Reads counts on the host, so under torch.compile it is a graph break: taken here, without
    # Dynamo's multi-line warning about data-dependent branches, once per forward (one read).
    @torch.compiler.disable
    def check_inputs(self, input_ids: torch.Tensor, images: Images = None,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Raise unless each sample has mp_image_token_length placeholders per image; return
        `attention_mask`, or None where every token is real (the decoder's causal, flash path)."""
        counts = (input_ids == self.image_token_id).sum(dim=1)                 # [B]
        padded = False
        if attention_mask is None:
            counts = counts.tolist()
        else:
            *counts, padded = torch.cat([counts, (attention_mask == 0).any().long()[None]]).tolist()
        per_image, token = self.cfg.mp_image_token_length, self.image_token_id
        if isinstance(images, (list, tuple)):
            if len(images) != len(counts):
                raise ValueError(f"images is a list of {len(images)} entries but input_ids has "
                                 f"{len(counts)} rows; give one tensor [n_i, 3, H, W] per sample.")
            for row, (count, n) in enumerate(zip(counts, (_n_images(im) for im in images))):
                if count != n * per_image:
                    raise ValueError(
                        f"Sample {row} has {count} image placeholder tokens (id {token}) but {n} image(s) x "
                        f"mp_image_token_length={per_image} = {n * per_image} image embeddings. Put "
                        "mp_image_token_length placeholders per image in the prompt.")
        elif sum(counts) != _n_images(images) * per_image:
            n = _n_images(images)
            raise ValueError(
                f"input_ids hold {sum(counts)} image placeholder tokens (id {token}) but {n} image(s) x "
                f"mp_image_token_length={per_image} = {n * per_image} image embeddings were given. Put "
                "mp_image_token_length placeholders per image in the prompt.")
        return attention_mask if padded else None

    def embed(self, input_ids: torch.Tensor, images: Images = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image placeholders replaced by image embeddings, in
        order (`check_inputs` checks that their numbers match)."""
        embeds = self.decoder.token_embedding(input_ids)                        # [B, T, D]
        if isinstance(images, (list, tuple)):
            images = [im if im.dim() == 4 else im.unsqueeze(0) for im in images]
            images = torch.cat(images) if images else None
        if images is None or images.shape[0] == 0:
            return embeds
        image_embeds = self.MP(self.vision_encoder(images.to(embeds.dtype)))   # [N, per_image, D]
        is_image = (input_ids == self.image_token_id).unsqueeze(-1)             # [B, T, 1]
        return embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, images: Images = None, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, return_logits: bool = True,
                sample_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids [B, T]; images [N, 3, H, W] in placeholder order, or one [n_i, 3, H, W] per
        sample; attention_mask [B, T] (1 = real token, left padding); targets [B, T], already
        shifted, -100 = ignored. Returns (logits [B, T, V], loss or None).

        Packed rows (`data.packing.PackedCollator`) add sample_ids [B, T] and position_ids [B, T]
        (restarting per sample): each sample then attends only to itself (`LanguageModel.forward`),
        and the loss is the mean over every supervised token of the batch, as unpacked.

        `return_logits=False` (training) returns (None, loss) and applies the last block's MLP, the
        final norm and the LM head only to the supervised positions: image tokens and prompts are
        most of a VLM's sequence, and the head (vocabulary x hidden) with its softmax is the
        decoder's largest single layer."""
        attention_mask = self.check_inputs(input_ids, images, attention_mask)
        embeds = self.embed(input_ids, images)                                  # [B, T, D]
        packed = {"sample_ids": sample_ids, "position_ids": position_ids}
        if targets is not None and not return_logits:
            attended = self.decoder(embeds, attention_mask=attention_mask, defer_last_mlp=True, **packed)
            return None, self._supervised_loss(attended, targets)
        logits = self.decoder.head(self.decoder(embeds, attention_mask=attention_mask, **packed))   # [B, T, V]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # Which positions are supervised is data: selecting them reads their count on the host, so
    # under torch.compile this runs eagerly (one graph break) after the compiled blocks.
    @torch.compiler.disable
    def _supervised_loss(self, attended: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last block's MLP, the final norm, the LM head and cross-entropy on the supervised
        positions only: attended [B, T, D] from `decoder(..., defer_last_mlp=True)`."""
        # index_select: its backward is much cheaper than boolean-mask indexing's.
        positions = (targets.reshape(-1) != -100).nonzero().squeeze(1)
        rows = attended.reshape(-1, attended.shape[-1]).index_select(0, positions)     # [N, D]
        hidden = self.finish_rows(self.decoder, rows)                                   # [N, D]
        return self.head_loss(hidden, self.decoder.head, targets.reshape(-1)[positions])

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, images: Images = None, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, greedy: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 eos_check_interval: int = 4, compile: bool = False) -> torch.Tensor:
        """New token ids [B, max_new_tokens]: one prefill, then one cached decode step per token
        (nanovlm/models/generation.py).

        Prompts are left-padded. Once a row emits `eos_token_id` the rest of it is EOS; decoding
        stops when every row has finished (checked every `eos_check_interval` steps, the only
        host sync of the loop).

        compile=True builds a faster decode step once. On CPU with float32 weights: the fused C++
        step of `nanovlm.accel.fused_decode` (built on first use, ~25 s once per machine; needs
        `pip install -e '.[cpu-fast]'`). Elsewhere, or where it cannot be built: the decode step
        `torch.compile`d over a static cache (CUDA graphs on GPU), compiled on the first call per
        (batch size, cache length, dtype, device), tens of seconds; the cache is kept between
        calls and its length rounded up to a multiple of 128, so nearby prompt lengths share it."""
        return generation.generate(self, input_ids, images, attention_mask, max_new_tokens, greedy, temperature,
                                   top_k, top_p, eos_token_id, eos_check_interval, compile)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str | os.PathLike, *, tokenizer=None, **card) -> None:
        """`config.json` and `model.safetensors`, plus what makes the directory self-contained
        (nanovlm/export/checkpoint_files.py): the tokenizer (`tokenizer`, else the config's), the
        image processor's settings and a model card. `card`: `tokenizer_path`, `train_cfg`,
        `metrics`, `step` (what a training run knows)."""
        from nanovlm.export.checkpoint_files import write_self_contained_files

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.to_json(path / CONFIG_NAME)
        save_weights(self, path / WEIGHTS_NAME)
        write_self_contained_files(path, self, tokenizer=tokenizer, **card)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, revision: str | None = None) -> "VisionLanguageModel":
        """A local checkpoint directory or a Hub repo id (downloaded with huggingface_hub).
        Directories holding an Idefics3/SmolVLM checkpoint are imported (see `from_idefics3`)."""
        path = local_model_dir(repo_id_or_path, revision)
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"Checkpoint directory {path} has no {CONFIG_NAME}.")
        raw = read_json_file(config_path, what="Checkpoint config")
        if not isinstance(raw, dict):
            raise ConfigError(f"Checkpoint config {config_path} holds {json_kind(raw)}, not a JSON object of "
                              "VLMConfig fields; write the checkpoint again (save_pretrained).")
        if raw.get("model_type") in ("idefics3", "smolvlm"):
            return cls.from_idefics3(path)
        try:
            cfg = VLMConfig.from_dict(raw, strict=False)
        except ConfigError as exc:
            raise ConfigError(f"Checkpoint config {config_path}: {exc}") from None
        model = cls(cfg, load_backbone=False)
        load_weights(model, path / WEIGHTS_NAME, aliases=TIED_ALIASES if cfg.lm_tie_weights else None,
                     optional=("rotary_embd.inv_freq",))
        return model

    @classmethod
    def from_idefics3(cls, repo_id_or_path: str | os.PathLike, revision: str | None = None) -> "VisionLanguageModel":
        """Import a whole Idefics3 / SmolVLM checkpoint (same SigLIP + pixel shuffle + Llama)."""
        from nanovlm.models import hf_import
        return hf_import.load_idefics3(cls, repo_id_or_path, revision=revision)

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str = "Upload nanoVLM model") -> str:
        """Create (or reuse) a Hub model repo and upload this model's self-contained directory
        (config, weights, tokenizer, image processor settings, model card)."""
        from nanovlm.export.hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, private=private, commit_message=commit_message)


def local_model_dir(repo_id_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory as given, or a Hub repo id downloaded (its model files,
    tokenizer and card) with huggingface_hub."""
    path = Path(repo_id_or_path)
    if path.is_dir():
        return path
    if path.exists() or not HUB_REPO_ID.match(str(repo_id_or_path)):
        raise FileNotFoundError(f"Checkpoint {repo_id_or_path} is neither a directory with {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME} nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(repo_id_or_path), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.md", "*.jinja", "*.model"]))


def head_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits head(hidden) [N, V] (in float32) against targets [N]."""
    return F.cross_entropy(head(hidden).float(), targets)


def _n_images(images: Images) -> int:
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_n_images(im) for im in images)
    return images.shape[0] if images.dim() == 4 else 1
