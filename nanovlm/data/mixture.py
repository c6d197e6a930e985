"""A map-style mixture: several datasets drawn by weight (`TrainConfig.train_dataset_weights`).

An epoch of the mixture holds `round(total * w_i / sum(w))` samples of dataset i, where `total` is
the number of usable samples of all of them: a dataset weighted above its share repeats samples,
one below it contributes a subset; which samples is drawn once from the seed. The samplers then
shuffle the whole epoch as they do any dataset, so resuming stays exact. Without weights the
mixture is the concatenation (each dataset in proportion to its rows, as nanoVLM concatenates).
(A streamed mixture draws a dataset per row instead: `streaming.MixtureStream`.)
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from nanovlm.data.samples import why_skipped


class MixtureDataset(torch.utils.data.Dataset):
    """The `VQADataset`s `parts` mixed by `weights` (None: by their sizes); the interface of a
    `VQADataset` that training and packing use (len, items, sample_sizes, shard, skip counts)."""

    def __init__(self, parts: Sequence[Any], weights: Sequence[float | None], seed: int):
        self.parts = list(parts)
        sizes = [len(p) for p in self.parts]
        total = sum(sizes)
        if None in weights:
            weights = sizes
        self.index: list[tuple[int, int]] = []      # (part, sample of that part)
        rng = np.random.default_rng([seed, 0x6D6978])
        for part, (size, weight) in enumerate(zip(sizes, weights)):
            wanted = round(total * weight / sum(weights))
            if size == 0 or wanted == 0:
                continue
            repeats, rest = divmod(wanted, size)
            chosen = list(range(size)) * repeats + sorted(rng.permutation(size)[:rest].tolist())
            self.index += [(part, k) for k in chosen]
        self.skipped: Counter[str] = sum((p.skipped for p in self.parts), Counter())
        self.skip_details = {k: v for p in reversed(self.parts) for k, v in p.skip_details.items()}
        self.rows_scanned = sum(p.rows_scanned for p in self.parts)

    @property
    def skipped_at_load(self) -> int:
        return sum(p.skipped_at_load for p in self.parts)

    def why_skipped(self) -> str:
        return why_skipped(self.skipped, self.skip_details)

    def shard(self, rank: int, world_size: int) -> "MixtureDataset":
        """This rank's share, as `VQADataset.shard`: disjoint, equally long."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        self.index = self.index[rank::world_size][:len(self.index) // world_size]
        return self

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        part, sample = self.index[k]
        return self.parts[part][sample]

    def sample_sizes(self) -> list[tuple[int, int]]:
        sizes = [p.sample_sizes() for p in self.parts]
        return [sizes[part][sample] for part, sample in self.index]
