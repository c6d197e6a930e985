"""The reference implementation: transformers' `Idefics3ForConditionalGeneration` (SmolVLM's
architecture: SigLIP + pixel shuffle + Llama) carrying our model's weights, wrapped as a
benchmark `Runner`. It is built by the exporter (`nanovlm.export.idefics3.to_idefics3`, the same
config and key table as `nanovlm export --format transformers`), in memory and with our
vocabulary as it is.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from nanovlm.bench.harness import DTYPES, SyntheticBatch
from nanovlm.export.idefics3 import to_idefics3
from nanovlm.training.optim import adamw


def build_reference(ours: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """An Idefics3ForConditionalGeneration on our model's device, holding a copy of our weights.
    A model Idefics3 cannot compute (a CLS token, attention scaling) is an `ExportError` (a
    `ConfigError`) naming the setting."""
    return to_idefics3(ours, attn_implementation=attn_implementation)


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
