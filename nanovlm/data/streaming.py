"""Streamed training data: each worker reads its own rows as batches need them (docs/data.md, Streaming).

    sources ─fragments─► this rank's shards ─SourceStream─► rows, endlessly (epochs)
      ─MixtureStream: a seeded draw of a source per row, by weight─► rows
      ─StreamBatches: windows of 4 batches (rows checked, then packed or shuffled)─► batches of rows
      ─DataLoader(StreamItems: images decoded and processed in its workers)─► the loop

Start-up reads the validation slice and one usable row per source, whatever the size of the data.
Each batch is a function of (seed, rank, the data) and of its place in the stream, so the position
before a batch (`StreamBatches.position`) is complete: every source's (epoch, shard, rows read of
it), the mixture's draws, the window and the rows of it used so far, and the counts so far. A
resumed run seeks every source there (reading at most one fragment's earlier rows), rebuilds that
window and goes on with the batches an uninterrupted run would have had.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch

from nanovlm.data.local_files import DatasetError
from nanovlm.data.packing import greedy_knapsack
from nanovlm.data.samples import UNREADABLE, Inspection, why_skipped
from nanovlm.data.shards import ReadCounter, Shard, read_shard

logger = logging.getLogger(__name__)

WINDOW_BATCHES = 4          # nanoVLM's buffer: 4 batches' worth of rows packed (or shuffled) at a time
DRAW_BLOCK = 4096           # mixture draws made at a time
_ORDER, _DRAWS, _WINDOW = 0, 1, 2   # RNG streams: shard order per epoch, mixture draws, window shuffles


class NoUsableRows(Exception):
    """A source went through a whole epoch on this rank without one usable row."""


class SourceStream:
    """One source's rows on this rank, endlessly: its shards in an order drawn from (seed, rank,
    epoch), each read from its first row. `state`: {"epoch", "shard" (place in the epoch's order),
    "offset" (rows of that shard already read)}."""

    def __init__(self, name: str, shards: list[Shard], seed: int, rank: int, state: dict | None = None):
        if not shards:
            raise DatasetError(f"{name}: no rows for worker {rank}; use fewer workers or more data.")
        self.name, self.shards, self.seed, self.rank = name, shards, seed, rank
        self.state = dict(state or {"epoch": 0, "shard": 0, "offset": 0})
        self.counter = ReadCounter()
        self.usable = 0                       # usable rows seen in this epoch (told by the caller)
        self._whole_epoch = self.state["shard"] == 0 and self.state["offset"] == 0
        self._order = self.order(self.state["epoch"])
        self._rows: Iterator[dict] | None = None

    def order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, self.rank, _ORDER, epoch]).permutation(len(self.shards)).tolist()

    def next(self) -> dict[str, Any]:
        while True:
            if self._rows is None:
                if self.state["shard"] == len(self.shards):
                    self._next_epoch()
                shard = self.shards[self._order[self.state["shard"]]]
                if shard.rows is not None and self.state["offset"] >= shard.rows:   # read to its end
                    self.state = {**self.state, "shard": self.state["shard"] + 1, "offset": 0}
                    continue
                self._rows = read_shard(shard, self.state["offset"], self.counter)
            row = next(self._rows, None)
            if row is not None:
                self.state["offset"] += 1
                return row
            self._rows = None
            self.state = {**self.state, "shard": self.state["shard"] + 1, "offset": 0}

    def _next_epoch(self) -> None:
        if self._whole_epoch and self.usable == 0:
            raise NoUsableRows(self.name)
        epoch = self.state["epoch"] + 1
        self.state = {"epoch": epoch, "shard": 0, "offset": 0}
        self._order, self._whole_epoch, self.usable = self.order(epoch), True, 0

    def where(self) -> str:
        """Where the last row came from: file, part and row."""
        shard = self.shards[self._order[min(self.state["shard"], len(self.shards) - 1)]]
        row = shard.start + (self.state["offset"] - 1) * shard.step
        return f"{shard.fragment.path} ({shard.fragment.kind} {shard.fragment.part}) row {row}"


class MixtureStream:
    """Rows of several `SourceStream`s: draw n picks source i with probability weights[i] / sum,
    from (seed, rank, n // DRAW_BLOCK). `state()`: {"draws", "sources": [each source's state]}."""

    def __init__(self, sources: list[SourceStream], weights: list[float], seed: int, rank: int, draws: int = 0):
        self.sources, self.seed, self.rank, self.draws = sources, seed, rank, draws
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self._block, self._choices = -1, None

    def next(self) -> tuple[int, dict[str, Any]]:
        block, k = divmod(self.draws, DRAW_BLOCK)
        if len(self.sources) == 1:
            source = 0
        else:
            if block != self._block:
                rng = np.random.default_rng([self.seed, self.rank, _DRAWS, block])
                self._block, self._choices = block, rng.choice(len(self.sources), DRAW_BLOCK, p=self.p)
            source = int(self._choices[k])
        self.draws += 1
        return source, self.sources[source].next()

    def state(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": [dict(s.state) for s in self.sources]}

    @property
    def rows_read(self) -> int:
        return sum(s.counter.rows for s in self.sources)


class StreamBatches(torch.utils.data.Sampler):
    """Endless batches from a `MixtureStream`, starting at `start` (a `position(...)["stream"]`).

    Rows are taken a window at a time: rows are read and checked (`SampleBuilder.inspect`; bad ones
    skipped and counted) until the window holds WINDOW_BATCHES batches' worth: packed, that many rows
    of `max_tokens` tokens, grouped by `greedy_knapsack` (at most `max_images` images a row);
    unpacked, that many samples. The window's rows are shuffled (from seed, rank, window) and the
    stream of rows is cut into batches of `batch_size` rows. A batch is a list of rows (unpacked) or
    of tuples of rows (packed: one tuple per packed row)."""

    def __init__(self, make_stream: Callable[[dict | None], MixtureStream], builder, batch_size: int, seed: int,
                 rank: int, packing: bool, max_tokens: int, max_images: int, start: dict | None = None,
                 start_batch: int = 0):
        self.make_stream, self.builder = make_stream, builder
        self.batch_size, self.seed, self.rank, self.packing = batch_size, seed, rank, packing
        self.max_tokens, self.max_images = max_tokens, max_images
        self.start = start or {"stream": None, "window": 0, "row": 0, "counts": {}}
        self.start_batch = start_batch
        counts = self.start["counts"]
        self.skipped: Counter[str] = Counter(counts.get("skipped", {}))
        self.skip_details: dict[str, str] = dict(counts.get("skip_details", {}))
        self._rows_before = counts.get("rows_read", 0)  # read before this run's first window
        self._epoch_first = counts.get("epoch_first_batch", 0)
        self._epoch = self.start["stream"]["sources"][0]["epoch"] if self.start["stream"] else 0
        self._positions: dict[int, dict] = {start_batch: self.start}
        self.stream: MixtureStream | None = None

    @property
    def rows_read(self) -> int:
        """Rows read from storage for training since the run's first step (resumes included)."""
        return self._rows_before + (self.stream.rows_read if self.stream is not None else 0)

    def __len__(self) -> int:  # endless, as ResumableBatchSampler
        return 2 ** 62

    def __iter__(self) -> Iterator[list]:
        self.stream = stream = self.make_stream(self.start["stream"])
        window, skip, b, batch = self.start["window"], self.start["row"], self.start_batch, []
        while True:
            at_start = {"stream": stream.state(), "window": window, "counts": self._counts()}
            rows = self._window(stream, window)
            after = {"stream": stream.state(), "window": window + 1, "row": 0}
            for i in range(skip, len(rows)):
                batch.append(rows[i])
                if len(batch) == self.batch_size:
                    b += 1
                    position = {**at_start, "row": i + 1} if i + 1 < len(rows) else {**after, "counts": None}
                    self._record(b, position)
                    yield batch
                    batch = []
            skip, window = 0, window + 1

    def _record(self, b: int, position: dict) -> None:
        epoch = position["stream"]["sources"][0]["epoch"]
        if epoch != self._epoch:
            self._epoch, self._epoch_first = epoch, b
        counts = position["counts"] or self._counts()
        self._positions[b] = copy.deepcopy({**position, "counts": {**counts, "epoch_first_batch": self._epoch_first}})

    def _counts(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "skip_details": dict(self.skip_details),
                "rows_read": self.rows_read, "epoch_first_batch": self._epoch_first}

    def position(self, batches_consumed: int) -> dict[str, Any]:
        """The data position before batch `batches_consumed` (for checkpoints and errors)."""
        for old in [k for k in self._positions if k < batches_consumed - 1]:
            del self._positions[old]
        state = self._positions[batches_consumed]
        epoch = state["stream"]["sources"][0]["epoch"] if state["stream"] else 0
        return {"batches_consumed": batches_consumed, "epoch": epoch,
                "batch_in_epoch": batches_consumed - state["counts"].get("epoch_first_batch", 0), "stream": state}

    def _window(self, stream: MixtureStream, window: int) -> list:
        rows, sizes, held = [], [], 0
        budget = WINDOW_BATCHES * self.batch_size * (self.max_tokens if self.packing else 1)
        while held < budget:
            source, row = self._next(stream)
            verdict = self.builder.inspect(row, check="header")
            if verdict.reason is None and self.packing:
                verdict = self._fits_a_row(verdict)
            if verdict.reason is not None:
                self.skipped[verdict.reason] += 1
                self.skip_details.setdefault(verdict.reason, f"{stream.sources[source].where()}: {verdict.detail}")
                continue
            stream.sources[source].usable += 1
            rows.append(row)
            sizes.append((verdict.tokens, verdict.images))
            held += verdict.tokens if self.packing else 1
        order = np.random.default_rng([self.seed, self.rank, _WINDOW, window])
        if not self.packing:
            return [rows[p] for p in order.permutation(len(rows))]
        groups = greedy_knapsack(sizes, self.max_tokens, self.max_images)
        return [tuple(rows[p] for p in groups[g]) for g in order.permutation(len(groups))]

    def _fits_a_row(self, verdict: Inspection) -> Inspection:
        if verdict.tokens > self.max_tokens:
            return Inspection("too_long", f"{verdict.tokens} tokens, over max_sample_length={self.max_tokens}")
        if verdict.images > self.max_images:
            return Inspection("too_many_images", f"{verdict.images} images, over max_images_per_knapsack="
                                                 f"{self.max_images}")
        return verdict

    def _next(self, stream: MixtureStream) -> tuple[int, dict[str, Any]]:
        try:
            return stream.next()
        except NoUsableRows as exc:
            raise DatasetError(f"{exc} has no usable row for worker {self.rank}: "
                               f"{why_skipped(self.skipped, self.skip_details)}.") from None


class StreamItems(torch.utils.data.Dataset):
    """`items[row]` (unpacked) or `items[tuple of rows]` (one packed row): the training items,
    images decoded now (in the DataLoader's workers). An item whose image does not decode is None."""

    def __init__(self, builder):
        self.builder = builder

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return [self._load(row) for row in key]
        return self._load(key)

    def _load(self, row: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.builder.item(row)
        except UNREADABLE as exc:
            logger.warning("A streamed row's image does not decode (%s); it is left out of its batch.", exc)
            return None


class SkippingCollate:
    """The collator applied to the items that loaded; the number that did not goes in the batch
    as `skipped_at_load` (the loop adds it to the run's counts, and passes over a batch that is
    nothing else: none of its items loaded)."""

    def __init__(self, collate, packed: bool):
        self.collate, self.packed = collate, packed

    def __call__(self, loaded: list) -> dict[str, Any]:
        if self.packed:
            kept = [[item for item in group if item is not None] for group in loaded]
            failed = sum(len(group) for group in loaded) - sum(len(group) for group in kept)
            kept = [group for group in kept if group]
        else:
            kept = [item for item in loaded if item is not None]
            failed = len(loaded) - len(kept)
        if not kept:
            return {"skipped_at_load": failed}
        batch = self.collate(kept)
        batch["skipped_at_load"] = failed
        return batch


class TrainStream:
    """This rank's streamed training data: what `build_datasets` gives as `train` when streaming.
    The loop builds its DataLoader from `loader_parts`; `rows_scanned` counts the rows start-up read."""

    streaming = True

    def __init__(self, names: list[str], shards: list[list[Shard]], weights: list[float], builder, train_cfg,
                 max_tokens: int, rank: int, rows_scanned: int = 0):
        self.names, self.shards, self.weights, self.builder = names, shards, weights, builder
        self.cfg, self.max_tokens, self.rank, self.rows_scanned = train_cfg, max_tokens, rank, rows_scanned

    def make_stream(self, state: dict | None = None) -> MixtureStream:
        sources = [SourceStream(name, shards, self.cfg.seed, self.rank, state and state["sources"][k])
                   for k, (name, shards) in enumerate(zip(self.names, self.shards))]
        return MixtureStream(sources, self.weights, self.cfg.seed, self.rank, state["draws"] if state else 0)

    def check_usable(self) -> None:
        """Read each source until its first usable row; `DatasetError` for a source that has none."""
        for name, shards in zip(self.names, self.shards):
            source, skipped, details = SourceStream(name, shards, self.cfg.seed, self.rank), Counter(), {}
            try:
                while (verdict := self.builder.inspect(source.next(), check="header")).reason is not None:
                    skipped[verdict.reason] += 1
                    details.setdefault(verdict.reason, f"{source.where()}: {verdict.detail}")
            except NoUsableRows:
                raise DatasetError(f"train_dataset_path entry {name!r} has no usable row for worker {self.rank}: "
                                   f"{why_skipped(skipped, details)}.") from None
            finally:
                self.rows_scanned += source.counter.rows

    def loader_parts(self, collator, data_position: dict | None = None):
        """(items, batch sampler, collate) for the loop's DataLoader, from `data_position` (a
        checkpoint's) or the start."""
        from nanovlm.data.packing import PackedCollator

        start, start_batch = None, 0
        if data_position is not None:
            if "stream" not in data_position:
                raise DatasetError("The checkpoint was written by map-style training (its data position is a batch "
                                   "count); resume it with stream_dataset=false.")
            start, start_batch = data_position["stream"], int(data_position["batches_consumed"])
        max_images = self.cfg.max_images_per_knapsack
        sampler = StreamBatches(self.make_stream, self.builder, self.cfg.batch_size, self.cfg.seed, self.rank,
                                self.cfg.packing, self.max_tokens, max_images, start, start_batch)
        collate = collator
        if self.cfg.packing:
            collate = PackedCollator(self.builder.encoder.tokenizer.pad_token_id, self.max_tokens, max_images)
        return StreamItems(self.builder), sampler, SkippingCollate(collate, self.cfg.packing)


def build_stream(sources, train_cfg, builder, max_tokens: int, rank: int, world_size: int):
    """(this rank's `TrainStream`, validation rows or None): the validation slice is the first
    ceil(eval_samples / len(sources)) rows of each source's validation split, or else of its train
    split, which training then starts after; every rank reads the same slice."""
    from nanovlm.data.shards import after, fragments, split_for_rank, take_rows

    counter, names, per_rank, known, val_rows = ReadCounter(), [], [], [], []
    per_source = -(-train_cfg.eval_samples // len(sources))
    for source in sources:
        train = [Shard(f) for f in fragments(source, "train")]
        if not train:
            raise DatasetError(f"train_dataset_path entry {source.path!r} has no training rows.")
        if train_cfg.val_ratio > 0:
            held_out = [Shard(f) for f in fragments(source, "validation")]
            rows, index, offset = _first_rows(held_out or train, per_source, counter)
            val_rows += rows
            if not held_out:
                train = after(train, index, offset)
        if train_cfg.data_cutoff_idx is not None:
            train = take_rows(train, 0, train_cfg.data_cutoff_idx)
        names.append(source.path)
        known.append(sum(s.rows for s in train) if all(s.rows is not None for s in train) else None)
        per_rank.append(split_for_rank(train, rank, world_size))
    weights = [s.weight for s in sources]
    if None in weights:
        weights = known if None not in known and all(known) else [1.0] * len(sources)
    stream = TrainStream(names, per_rank, [float(w) for w in weights], builder, train_cfg, max_tokens, rank,
                         rows_scanned=counter.rows)
    stream.check_usable()
    if len(sources) > 1:
        logger.info("Streaming a mixture: %s.", ", ".join(f"{n} (weight {w:g})" for n, w in zip(names, weights)))
    return stream, (val_rows or None)


def _first_rows(shards: list[Shard], n: int, counter: ReadCounter) -> tuple[list[dict], int, int]:
    """The first `n` rows of `shards`, and where they end: (shard index, rows of it read)."""
    rows: list[dict] = []
    for index, shard in enumerate(shards):
        if len(rows) == n:
            return rows, index, 0
        reader, offset = read_shard(shard, 0, counter), 0
        while len(rows) < n and (row := next(reader, None)) is not None:
            rows.append(row)
            offset += 1
        if len(rows) == n:
            return rows, index, offset
    return rows, len(shards), 0
