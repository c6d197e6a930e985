"""`VQACollator`: a list of `VQADataset` items -> one left-padded batch.

Left padding keeps every sequence's last token at the end of the row, where generation
continues. Padding never changes a sample's loss as long as the model honours the attention
mask (RoPE scores depend on relative positions only; nanovlm and HF both count positions
from the mask anyway).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from nanovlm.data.prompts import IGNORE_INDEX

logger = logging.getLogger(__name__)


def left_pad(sequences: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_len] padded on the left with `value`, and the mask [B, max_len] (1 = real token)."""
    length = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            padded[row, -len(sequence):] = sequence
            mask[row, -len(sequence):] = 1
    return padded, mask


class VQACollator:
    """Batch keys: `input_ids`, `labels`, `attention_mask` [B, T] (left-padded; labels -100 on
    padding), `images` [N, 3, H, W] (every sample's images, in placeholder order) or None,
    `prompt_ids`, `prompt_attention_mask` [B, P] (left-padded prompts for generation),
    `question_types`, `answers` (lists of str)."""

    def __init__(self, tokenizer, max_length: int):
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; load it with get_tokenizer().")
        self.pad_token_id = tokenizer.pad_token_id
        self.max_length = max_length
        self.dropped = 0  # samples longer than max_length (VQADataset normally drops them first)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [item for item in batch if len(item["input_ids"]) <= self.max_length]
        if len(kept) < len(batch):
            self.dropped += len(batch) - len(kept)
            logger.warning("Dropped %d samples longer than max_length=%d from a batch.",
                           len(batch) - len(kept), self.max_length)
        if not kept:
            raise ValueError(f"Every sample of the batch is longer than max_length={self.max_length}.")
        input_ids, attention_mask = left_pad([item["input_ids"] for item in kept], self.pad_token_id)
        labels, _ = left_pad([item["labels"] for item in kept], IGNORE_INDEX)
        prompt_ids, prompt_attention_mask = left_pad([item["prompt_ids"] for item in kept], self.pad_token_id)
        images = [item["images"] for item in kept if len(item["images"])]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "images": torch.cat(images) if images else None,
            "prompt_ids": prompt_ids,
            "prompt_attention_mask": prompt_attention_mask,
            "question_types": [item["question_type"] for item in kept],
            "answers": [item["answer"] for item in kept],
        }
