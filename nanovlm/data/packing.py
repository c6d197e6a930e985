"""Packing: whole samples grouped into rows of at most `max_tokens` tokens and `max_images` images.

nanoVLM packs with a greedy knapsack (`ConstantLengthDataset` in its data/advanced_datasets.py);
this follows its order and rules: the samples of a window, longest first, each into the least
filled row that still has room for its tokens and its images, else into a new row; the window
starts with ceil(tokens / max_tokens) + KNAPSACK_SLACK empty rows, so rows come out about equally
full. Unlike nanoVLM, no pad token separates the samples (nothing needs one: each sample's last
label is already -100) and the samples of a row do not attend to each other: the collator gives
every token its sample id and a position that restarts per sample, and the decoder builds a
block-diagonal causal mask from them (`models.language_model.packed_causal_mask`).

- `greedy_knapsack(sizes, max_tokens, max_images)`: the grouping of one window.
- `training.sampling.PackedBatchSampler`: which samples form each row and batch (resumable).
- `SampleGroups(dataset)`: dataset[group of indices] -> the group's items (DataLoader workers load them).
- `PackedCollator`: groups of items -> one batch of packed rows.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Sequence

import torch

from nanovlm.data.prompts import IGNORE_INDEX

logger = logging.getLogger(__name__)

KNAPSACK_SLACK = 5   # nanoVLM's `delta`: empty rows a window starts with beyond the fewest that could hold it
PAD_SAMPLE_ID = -1   # the sample id of padding: a block of its own, so no real token attends to it


def greedy_knapsack(sizes: Sequence[tuple[int, int]], max_tokens: int, max_images: int,
                    slack: int = KNAPSACK_SLACK) -> list[list[int]]:
    """Group items into rows of at most `max_tokens` tokens and `max_images` images.

    sizes: (tokens, images) per item; every item must fit a row on its own. Items are placed
    longest first (ties in their given order), each into the least filled row (ties: the older
    row) that has room for both its tokens and its images, else into a new row. The window starts
    with ceil(sum(tokens) / max_tokens) + `slack` empty rows. Returns the non-empty rows, each a
    list of item positions in placement order, rows in creation order."""
    for position, (tokens, images) in enumerate(sizes):
        if tokens > max_tokens or images > max_images:
            raise ValueError(f"item {position} ({tokens} tokens, {images} images) does not fit a row of "
                             f"{max_tokens} tokens and {max_images} images.")
    total = sum(tokens for tokens, _ in sizes)
    n_rows = -(-total // max_tokens) + slack
    loads, images, rows = [0] * n_rows, [0] * n_rows, [[] for _ in range(n_rows)]
    by_load = [(0, row) for row in range(n_rows)]                     # sorted: (tokens held, row)
    for position in sorted(range(len(sizes)), key=lambda p: -sizes[p][0]):
        tokens, n_images = sizes[position]
        chosen = None
        for rank, (load, row) in enumerate(by_load):
            if load + tokens > max_tokens:
                break                                                   # the rest hold as much or more
            if images[row] + n_images <= max_images:
                chosen = rank
                break
        if chosen is None:
            row = len(rows)
            loads.append(0)
            images.append(0)
            rows.append([])
        else:
            _, row = by_load.pop(chosen)
        rows[row].append(position)
        loads[row] += tokens
        images[row] += n_images
        bisect.insort(by_load, (loads[row], row))
    return [row for row in rows if row]


def sample_sizes(dataset) -> list[tuple[int, int]]:
    """(tokens, images) of every sample of `dataset`: its own `sample_sizes()` where it has one
    (VQADataset: from the text, no image decoded), else by loading every item. Images are counted
    as images, not as the tiles the pipeline cuts each into (nanoVLM's max_images_per_knapsack
    counts an item's list of images)."""
    if hasattr(dataset, "sample_sizes"):
        return list(dataset.sample_sizes())
    return [item_size(dataset[k]) for k in range(len(dataset))]


def item_size(item: dict[str, Any]) -> tuple[int, int]:
    """(tokens, images) of one item: its tile grids count its images where it has them."""
    images = len(item["grids"]) if "grids" in item else int(item["images"].shape[0])
    return len(item["input_ids"]), images


class SampleGroups(torch.utils.data.Dataset):
    """`dataset[group]` for a tuple of indices: the items of one packed row, in that order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, group: Sequence[int]) -> list[dict[str, Any]]:
        return [self.dataset[k] for k in group]


class PackedCollator:
    """Groups of `VQADataset` items -> one batch of packed rows, right-padded to the longest row.

    Batch keys: `input_ids`, `labels` (-100 on padding; each sample's own shifted labels),
    `attention_mask` (1 = real token), `position_ids` (0, 1, ... within each sample, 0 on padding),
    `sample_ids` (0, 1, ... per sample of a row, PAD_SAMPLE_ID on padding), all [B, T];
    `images` [N, 3, H, W] (every tile) in placeholder order (row by row) or None; `sample_lengths`
    and `sample_images` (lists, one entry per sample, row by row: tokens and tiles, for FLOPs and
    sample counts).

    The sampler planned each row from `sample_sizes`; an item that comes out larger (an unreadable
    image replaced by another sample, or sizes that disagree with the image pipeline) and no longer
    fits its row is dropped and counted in `dropped`."""

    def __init__(self, pad_token_id: int, max_tokens: int, max_images: int):
        if pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; load it with get_tokenizer().")
        self.pad_token_id, self.max_tokens, self.max_images = pad_token_id, max_tokens, max_images
        self.dropped = 0

    def __call__(self, groups: list[list[dict[str, Any]]]) -> dict[str, Any]:
        rows = [row for row in (self._fit(items) for items in groups) if row]
        if not rows:
            raise ValueError("Every sample of the batch was dropped: none fits a packed row.")
        length = max(sum(len(item["input_ids"]) for item in row) for row in rows)
        B = len(rows)
        input_ids = torch.full((B, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, length), dtype=torch.long)
        position_ids = torch.zeros((B, length), dtype=torch.long)
        sample_ids = torch.full((B, length), PAD_SAMPLE_ID, dtype=torch.long)
        images, sample_lengths, sample_images = [], [], []
        for b, row in enumerate(rows):
            start = 0
            for s, item in enumerate(row):
                n = len(item["input_ids"])
                end = start + n
                input_ids[b, start:end] = item["input_ids"]
                labels[b, start:end] = item["labels"]
                attention_mask[b, start:end] = 1
                position_ids[b, start:end] = torch.arange(n)
                sample_ids[b, start:end] = s
                images.append(item["images"])
                sample_lengths.append(n)
                sample_images.append(int(item["images"].shape[0]))
                start = end
        images = [im for im in images if len(im)]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "sample_ids": sample_ids,
            "images": torch.cat(images) if images else None,
            "sample_lengths": sample_lengths,
            "sample_images": sample_images,
        }

    def _fit(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept, tokens, images = [], 0, 0
        for item in items:
            n, k = item_size(item)
            if tokens + n > self.max_tokens or images + k > self.max_images:
                self.dropped += 1
                logger.warning("Dropped a sample of %d tokens and %d images that no longer fits its packed row "
                               "(%d tokens, %d images already; limits %d and %d).", n, k, tokens, images,
                               self.max_tokens, self.max_images)
                continue
            kept.append(item)
            tokens, images = tokens + n, images + k
        return kept
