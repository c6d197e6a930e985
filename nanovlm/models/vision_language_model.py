"""VisionLanguageModel: ViT -> pixel-shuffle projector -> language model.

Image embeddings replace the image placeholder tokens (`image_token_id`) of the prompt, in
order; everything else is an ordinary causal language model. Checkpoints are a directory with
`config.json` (`VLMConfig.to_dict()`) and `model.safetensors`, the layout nanoVLM publishes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VLMConfig
from nanovlm.models import fused_decode
from nanovlm.models.checkpoint import load_weights, save_weights
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.modality_projector import ModalityProjector
from nanovlm.models.vision_transformer import ViT

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# With tied embeddings, nanoVLM's checkpoints may keep only one of these two keys.
TIED_ALIASES = {"decoder.head.weight": "decoder.token_embedding.weight",
                "decoder.token_embedding.weight": "decoder.head.weight"}

HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Images = torch.Tensor | Sequence[torch.Tensor] | None


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `hidden @ weight^T` against `targets`. Backward turns the
    saved log-probabilities into softmax - one_hot in place, where F.cross_entropy allocates and
    fills a [N, V] gradient for the NLL and another for log_softmax's backward (CPU, N = 376,
    V = 8193: 27.3 vs 29 ms forward and backward, the same loss bit for bit). Its weight gradient
    is a fresh tensor, so autograd adds a tied embedding's gradient to it in place. Backward runs
    once (the log-probabilities are consumed)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()                                              # [N, V]
        # On CPU in place (each row is read for its max and sum before it is written): a second
        # [N, V] buffer per step cost glibc's heap ~10k page faults and 10-20 ms per mid step.
        log_probs = torch.log_softmax(logits, 1, out=logits) if logits.is_cpu else torch.log_softmax(logits, 1)
        ctx.save_for_backward(hidden, weight, targets, log_probs)
        return -log_probs.gather(1, targets[:, None]).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, log_probs = ctx.saved_tensors
        probs = log_probs.exp_()                                                  # softmax, in place
        probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0
        probs.mul_(grad / len(targets))
        grad_hidden = probs @ weight if ctx.needs_input_grad[0] else None
        grad_weight = probs.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight), targets), float32, in fewer memory passes:
    hidden [N, D], weight [V, D], targets [N] (all supervised) -> mean loss."""
    return _LinearCrossEntropy.apply(hidden, weight, targets)


@torch.compiler.disable
def _eager_embedding(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """F.embedding outside torch.compile. Inductor's CPU backward of an embedding zero-fills the
    [V, D] gradient and scatters into it on one thread (3.2 ms per compiled mid step, perf),
    ATen's takes 0.4 ms on both threads."""
    return F.embedding(ids, weight)


def _finish_rows(decoder: LanguageModel, rows: torch.Tensor) -> torch.Tensor:
    return decoder.finish(rows)


@functools.cache
def _compiled_finish_rows():
    """`decoder.finish` compiled for CPU (`compile_for_training`'s options) and any number of rows
    (dynamic shapes): its norms and SwiGLU fused instead of ~20 eager kernels forward and backward
    (perf, mid compare step: 3 ms less CPU time). Built on first use: torch.compile's import costs
    a second, and nanovlm.training imports this module."""
    from nanovlm.training.compiling import compile_for_training

    return compile_for_training(_finish_rows, torch.device("cpu"), dynamic=True)


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
        if load_backbone:
            hf_import.load_backbones(self)

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, images: Images = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the image placeholders replaced by image embeddings."""
        table = self.decoder.token_embedding
        if input_ids.is_cpu and torch.compiler.is_compiling() and table.weight.requires_grad:
            embeds = _eager_embedding(table.weight, input_ids)
        else:
            embeds = table(input_ids)
        is_image = input_ids == self.image_token_id                             # [B, T]
        per_image = self.cfg.mp_image_token_length
        if isinstance(images, (list, tuple)):
            if len(images) != input_ids.shape[0]:
                raise ValueError(f"images is a list of {len(images)} entries but input_ids has "
                                 f"{input_ids.shape[0]} rows; give one tensor [n_i, 3, H, W] per sample.")
            images = [im if im.dim() == 4 else im.unsqueeze(0) for im in images]
            counts = is_image.sum(dim=1).tolist()
            for row, (count, im) in enumerate(zip(counts, images)):
                if count != im.shape[0] * per_image:
                    raise ValueError(
                        f"Sample {row} has {count} image placeholder tokens (id {self.image_token_id}) but "
                        f"{im.shape[0]} image(s) x mp_image_token_length={per_image} = {im.shape[0] * per_image} "
                        "image embeddings. Put mp_image_token_length placeholders per image in the prompt.")
            images = [im for im in images if im.shape[0] > 0]
            images = torch.cat(images) if images else None
        elif not torch.compiler.is_compiling():   # the check reads a count back (a graph break)
            count = int(is_image.sum())
            n_images = 0 if images is None else images.shape[0]
            if count != n_images * per_image:
                raise ValueError(
                    f"input_ids hold {count} image placeholder tokens (id {self.image_token_id}) but "
                    f"{n_images} image(s) x mp_image_token_length={per_image} = {n_images * per_image} image "
                    "embeddings were given. Put mp_image_token_length placeholders per image in the prompt.")
        if images is None or images.shape[0] == 0:
            return embeds
        image_embeds = self.MP(self.vision_encoder(images.to(embeds.dtype)))   # [N, per_image, D]
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, images: Images = None, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, return_logits: bool = True,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids [B, T]; images [N, 3, H, W] in placeholder order, or one [n_i, 3, H, W] per
        sample; attention_mask [B, T] (1 = real token, left padding); targets [B, T], already
        shifted, -100 = ignored. Returns (logits [B, T, V], loss or None).

        `return_logits=False` (training) returns (None, loss) and applies the last block's MLP, the
        final norm and the LM head only to the supervised positions: image tokens and prompts are
        most of a VLM's sequence, and the head (vocabulary x hidden) with its softmax is the
        decoder's largest single layer."""
        embeds = self.embed(input_ids, images)
        if targets is not None and not return_logits:
            # Up to the last block's attention; its MLP, the final norm and the head then run
            # on the supervised positions only.
            attended = self.decoder(embeds, attention_mask=attention_mask, defer_last_mlp=True)
            return None, self._supervised_loss(attended, targets, compiled=torch.compiler.is_compiling())
        hidden = self.decoder(embeds, attention_mask=attention_mask)
        if targets is None:
            return self.decoder.head(hidden), None
        logits = self.decoder.head(hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss

    # The selection's shape depends on the data: torch.compile runs this part eagerly (one graph
    # break) and compiles what comes before it, so compiled training keeps these savings.
    @torch.compiler.disable
    def _supervised_loss(self, attended: torch.Tensor, targets: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """The last block's MLP, the final norm, the LM head and cross-entropy on the supervised
        positions only: attended [B, T, D] from `decoder(..., defer_last_mlp=True)`. compiled=True
        (the forward runs under torch.compile) runs that MLP and norm compiled as well, on CPU,
        for any number of rows."""
        # index_select: forward and backward 0.14 ms, against 0.74 for boolean-mask indexing
        # (CPU, 376 of 512 rows of 384).
        positions = (targets.reshape(-1) != -100).nonzero().squeeze(1)
        rows = attended.reshape(-1, attended.shape[-1]).index_select(0, positions)     # [n_supervised, D]
        rows = _compiled_finish_rows()(self.decoder, rows) if compiled and rows.is_cpu else self.decoder.finish(rows)
        head, targets = self.decoder.head, targets.reshape(-1)[positions]
        if rows.dtype == torch.float32 and head.bias is None and not torch.is_autocast_enabled(rows.device.type):
            return linear_cross_entropy(rows, head.weight, targets)
        return F.cross_entropy(head(rows).float(), targets)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, images: Images = None, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, greedy: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 eos_check_interval: int = 4, compile: bool = False) -> torch.Tensor:
        """New token ids [B, max_new_tokens]: one prefill, then one cached decode step per token.

        Prompts are left-padded. Once a row emits `eos_token_id` the rest of it is EOS; decoding
        stops when every row has finished (checked every `eos_check_interval` steps, the only
        host sync of the loop).

        compile=True builds a faster decode step once. On CPU with float32 weights: the fused C++
        step of `fused_decode` (built on first use, ~25 s once per machine). Elsewhere, or where
        no C++ toolchain is found: `torch.compile`d `static_decode_step` (CUDA graphs on GPU),
        compiled on the first call per (batch size, cache length, dtype, device), tens of
        seconds; its cache is kept between calls (CUDA graphs replay on fixed addresses) and its
        length rounded up to a multiple of 128, so nearby prompt lengths share one compiled step."""
        B, T = input_ids.shape
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left padding: attention_mask[:, -1] must be 1 for every row.")
        fill = eos_token_id if eos_token_id is not None else 0
        out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=input_ids.device)
        if max_new_tokens <= 0:
            return out
        fused = fused_decode.fused_decoder(self.decoder) if compile else None
        if compile and fused is None:
            cache = self._reused_kv_cache(B, -(-(T + max_new_tokens) // 128) * 128)
        else:
            cache = self.decoder.new_kv_cache(B, T + max_new_tokens)
        hidden = self.decoder(self.embed(input_ids, images), attention_mask=attention_mask, kv_cache=cache)
        logits = self.decoder.head(hidden[:, -1])                                # [B, V]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        decode_step = self._decode_step_fn(cache, max_new_tokens, hidden.dtype, compile, fused)
        for step in range(max_new_tokens):
            token = sample_next_token(logits, greedy, temperature, top_k, top_p)  # [B]
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            out[:, step] = token
            if step == max_new_tokens - 1:
                break
            if eos_token_id is not None and (step + 1) % eos_check_interval == 0 and bool(finished.all()):
                break
            logits = self.decoder.head(decode_step(token, step))
        return out

    def _decode_step_fn(self, cache, n_steps: int, dtype: torch.dtype, compile: bool, fused):
        """The decode loop's step, (token [B], step index) -> final hidden [B, D], writing this
        token's keys and values to `cache`: the fused C++ step, the compiled static step, or
        `decode_step`. RoPE tables for all `n_steps` are computed here, once."""
        cos, sin = self.decoder.decode_rope(cache, n_steps, dtype)               # [B, n, 1, hd]
        if fused is not None:
            cos, sin = cos.squeeze(2), sin.squeeze(2)                             # [B, n, hd]

            def fused_step(token: torch.Tensor, step: int) -> torch.Tensor:
                hidden = fused.step(token, cache.k, cache.v, cache.key_mask, cache.length, cos, sin, step)
                cache.length += 1
                return hidden
            return fused_step
        if compile:
            static_step = self._compiled_decode_step(cache)
            # Device tensors, advanced in place: the compiled step never sees a new Python int.
            position = torch.tensor(cache.length, device=cache.k.device)
            index = torch.tensor(0, device=cache.k.device)

            def compiled_step(token: torch.Tensor, step: int) -> torch.Tensor:
                hidden = static_step(token, cache.k, cache.v, cache.key_mask, cos, sin, position, index)
                position.add_(1)
                index.add_(1)
                return hidden
            return compiled_step
        return lambda token, step: self.decoder(token, kv_cache=cache, rope=(cos[:, step], sin[:, step]))

    def _reused_kv_cache(self, batch_size: int, max_len: int):
        """One KV cache per (batch size, length, dtype, device), kept on the model for compiled
        decoding; emptied here (slots past the written ones are masked, so no zeroing)."""
        weight = self.decoder.token_embedding.weight
        key = (batch_size, max_len, weight.dtype, weight.device)
        caches = self.__dict__.setdefault("_kv_caches", {})
        if key not in caches:
            caches.clear()   # one shape at a time: the memory of a cache is the model's to hold
            caches[key] = self.decoder.new_kv_cache(batch_size, max_len)
        cache = caches[key]
        cache.length, cache.key_mask = 0, None
        cache.next_position.zero_()
        return cache

    def _compiled_decode_step(self, cache):
        """`decoder.static_decode_step` compiled once per model; on CUDA with CUDA graphs, whose
        replays need the cache tensors at fixed addresses (marked static here)."""
        cuda = cache.k.device.type == "cuda"
        if cuda:
            for tensor in (cache.k, cache.v, cache.key_mask):
                if tensor is not None:
                    torch._dynamo.mark_static_address(tensor)
        if getattr(self, "_static_step", None) is None:
            self._static_step = torch.compile(self.decoder.static_decode_step, fullgraph=True, dynamic=False,
                                              mode="reduce-overhead" if cuda else None)
        if not cuda:
            return self._static_step

        def step(*args):
            torch.compiler.cudagraph_mark_step_begin()
            return self._static_step(*args).clone()   # a replay overwrites its outputs
        return step

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.to_json(path / CONFIG_NAME)
        save_weights(self, path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, revision: str | None = None) -> "VisionLanguageModel":
        """A local checkpoint directory or a Hub repo id (downloaded with huggingface_hub).
        Directories holding an Idefics3/SmolVLM checkpoint are imported (see `from_idefics3`)."""
        path = Path(repo_id_or_path)
        if not path.is_dir():
            if path.exists() or not HUB_REPO_ID.match(str(repo_id_or_path)):
                raise FileNotFoundError(f"Checkpoint {repo_id_or_path} is neither a directory with {CONFIG_NAME} "
                                        f"and {WEIGHTS_NAME} nor a Hub repo id (owner/name).")
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(str(repo_id_or_path), revision=revision,
                                          allow_patterns=["*.json", "*.safetensors", "*.md"]))
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"Checkpoint directory {path} has no {CONFIG_NAME}.")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") in ("idefics3", "smolvlm"):
            return cls.from_idefics3(path)
        cfg = VLMConfig.from_dict(raw, strict=False)
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
        """Create (or reuse) a Hub model repo and upload config, weights and a model card."""
        from huggingface_hub import create_repo, upload_folder
        repo_id = create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            (Path(tmp) / "README.md").write_text(model_card(repo_id, self))
            upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp, commit_message=commit_message)
        logger.info("Uploaded %s to https://huggingface.co/%s", type(self).__name__, repo_id)
        return repo_id


def sample_next_token(logits: torch.Tensor, greedy: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax, or a sample after temperature, top-k and top-p."""
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass
        # (so the most likely token always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


def model_card(repo_id: str, model: VisionLanguageModel) -> str:
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: nanovlm
license: mit
pipeline_tag: image-text-to-text
tags:
  - vision-language
  - multimodal
  - nanovlm
---

# {repo_id}

A nanoVLM-style vision-language model ({n_params / 1e6:.1f}M parameters) trained with nanovlm-ray:
a SigLIP-style vision encoder ({cfg.vit_n_blocks} blocks, width {cfg.vit_hidden_dim}, {cfg.vit_img_size} px,
patch {cfg.vit_patch_size}), a pixel-shuffle projector (factor {cfg.mp_pixel_shuffle_factor},
{cfg.mp_image_token_length} tokens per image) and a Llama-style decoder ({cfg.lm_n_blocks} blocks, width
{cfg.lm_hidden_dim}, vocabulary {cfg.lm_vocab_size}). Tokenizer: `{cfg.lm_tokenizer}`.

```python
from nanovlm.models import VisionLanguageModel

model = VisionLanguageModel.from_pretrained("{repo_id}")
```

or from the command line: `nanovlm generate --checkpoint {repo_id} --image photo.jpg --prompt "What is in the image?"`
"""
