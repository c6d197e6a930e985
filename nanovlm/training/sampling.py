"""The order in which training samples are seen: a pure function of (seed, epoch, rank).

Epoch e visits a permutation of the dataset drawn from `seed + e`; worker `rank` of
`world_size` takes every `world_size`-th index of it, and cuts its share into batches of
`batch_size` (the incomplete tail is dropped). Because the order depends on nothing else,
the number of batches already consumed is a complete data position: a resumed run starts
the sampler there and sees exactly the batches an uninterrupted run would have seen.

`PackedBatchSampler` visits the samples in the same order and packs them into rows
(`data.packing`); its batches are groups of indices, and the same holds for them.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Sequence

import torch

from nanovlm.data.packing import greedy_knapsack

# nanoVLM packs a buffer of 4 batches' worth of rows at a time (its ConstantLengthDataset's
# num_of_sequences = 4 * batch_size): enough samples to fill rows well, few enough to keep
# a window's samples close together in the epoch's order.
WINDOW_BATCHES = 4


def epoch_share(dataset_size: int, rank: int, world_size: int, generator: torch.Generator) -> list[int]:
    """Every `world_size`-th index from `rank` of a permutation drawn from `generator`."""
    return torch.randperm(dataset_size, generator=generator)[rank::world_size].tolist()


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches of dataset indices, starting after `start_batch` consumed batches."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        if dataset_size // world_size < batch_size:
            raise ValueError(
                f"The training set has {dataset_size} samples: fewer than batch_size={batch_size} per "
                f"worker with {world_size} worker(s). Lower batch_size or use more data.")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return (self.dataset_size // self.world_size) // self.batch_size

    def position(self, batches_consumed: int) -> dict[str, int]:
        """The data position after `batches_consumed` batches, for checkpoints and errors."""
        epoch, offset = divmod(batches_consumed, self.batches_per_epoch)
        return {"batches_consumed": batches_consumed, "epoch": epoch, "batch_in_epoch": offset}

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return epoch_share(self.dataset_size, self.rank, self.world_size, generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield indices[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its bookkeeping
        return 2 ** 62


class PackedBatchSampler(torch.utils.data.Sampler[list[tuple[int, ...]]]):
    """Endless batches of packed rows, starting after `start_batch` consumed batches: each batch
    is `batch_size` groups of dataset indices, one group per row (`data.packing.SampleGroups`
    loads them, `PackedCollator` packs them).

    Epoch e visits the samples in `ResumableBatchSampler`'s order for e, leaving out those that
    fit no row (more than `max_tokens` tokens or `max_images` images; counted once in `skipped`).
    It packs them a window at a time, as nanoVLM does: samples are gathered until they hold
    WINDOW_BATCHES * batch_size rows' worth of tokens, `greedy_knapsack` groups them, and the
    window's rows are shuffled (they come out fullest first). The epoch's rows are cut into
    batches and an incomplete last batch is dropped. All of it is a function of (seed, epoch,
    rank) and `sizes`, so the number of batches consumed is a complete data position.

    sizes: (tokens, images) per dataset index (`data.packing.sample_sizes`)."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int, max_tokens: int,
                 max_images: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.max_tokens, self.max_images = max_tokens, max_images
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.skipped: Counter[str] = Counter(
            "too_long" if tokens > max_tokens else "too_many_images"
            for tokens, images in self.sizes if tokens > max_tokens or images > max_images)
        self._batches: dict[int, int] = {}   # epoch -> batches in it
        if self.batches_in_epoch(0) == 0:
            fit = len(self.sizes) - sum(self.skipped.values())
            raise ValueError(
                f"The training set packs into fewer than batch_size={batch_size} rows of max_sample_length="
                f"{max_tokens} tokens per worker ({fit} of {len(self.sizes)} samples fit a row; skipped: "
                f"{dict(self.skipped)}). Lower batch_size or max_sample_length, or use more data.")

    def epoch_groups(self, epoch: int) -> list[tuple[int, ...]]:
        """Every row of epoch `epoch`, in order: tuples of dataset indices."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        window_tokens = WINDOW_BATCHES * self.batch_size * self.max_tokens
        groups: list[tuple[int, ...]] = []
        window, held = [], 0
        for index in epoch_share(len(self.sizes), self.rank, self.world_size, generator):
            tokens, images = self.sizes[index]
            if tokens > self.max_tokens or images > self.max_images:
                continue
            window.append(index)
            held += tokens
            if held >= window_tokens:
                groups += self._pack(window, generator)
                window, held = [], 0
        if window:
            groups += self._pack(window, generator)
        self._batches[epoch] = len(groups) // self.batch_size
        return groups

    def _pack(self, window: list[int], generator: torch.Generator) -> list[tuple[int, ...]]:
        rows = greedy_knapsack([self.sizes[i] for i in window], self.max_tokens, self.max_images)
        return [tuple(window[p] for p in rows[r]) for r in torch.randperm(len(rows), generator=generator).tolist()]

    def batches_in_epoch(self, epoch: int) -> int:
        if epoch not in self._batches:
            self.epoch_groups(epoch)
        return self._batches[epoch]

    def _locate(self, batches_consumed: int) -> tuple[int, int]:
        epoch = 0
        while batches_consumed >= self.batches_in_epoch(epoch):
            batches_consumed -= self.batches_in_epoch(epoch)
            epoch += 1
        return epoch, batches_consumed

    def position(self, batches_consumed: int) -> dict[str, int]:
        """The data position after `batches_consumed` batches, for checkpoints and errors."""
        epoch, offset = self._locate(batches_consumed)
        return {"batches_consumed": batches_consumed, "epoch": epoch, "batch_in_epoch": offset}

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        epoch, offset = self._locate(self.start_batch)
        while True:
            groups = self.epoch_groups(epoch)
            for b in range(offset, len(groups) // self.batch_size):
                yield groups[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless, as ResumableBatchSampler
        return 2 ** 62
