"""The order in which training samples are seen: a pure function of (seed, epoch, rank).

Epoch e visits a permutation of the dataset drawn from `seed + e`; worker `rank` of
`world_size` takes every `world_size`-th index of it, and cuts its share into batches of
`batch_size` (the incomplete tail is dropped). Because the order depends on nothing else,
the number of batches already consumed is a complete data position: a resumed run starts
the sampler there and sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch


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
        order = torch.randperm(self.dataset_size, generator=generator)
        return order[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield indices[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its bookkeeping
        return 2 ** 62
