"""Rows -> training samples: load rows (shapes, local files, the Hub; one dataset or a mixture)
and build each rank's training and validation data (docs/data.md).

Rows follow the nanoVLM schema, `images` + `texts`; the other accepted formats are normalised to
it (`formats`). Two modes (`TrainConfig.stream_dataset`; None: auto, `sources.use_streaming`):
- map-style: every row is checked before training (`VQADataset`; the scan is kept on disk, so
  the next run, trial or rank reads it: `scan_cache`), and training visits permutations of the
  usable rows (`training.sampling`): exact epochs, exact resume;
- streaming: each rank reads its own shards as batches need them (`streaming.TrainStream`).
Either way a row that cannot make a sample is skipped and counted by reason (`samples.SKIP_FIXES`),
never fatal; a dataset without a usable row is a `DatasetError` before training.

`build_datasets(vlm_cfg, train_cfg, tokenizer, rank, world_size)` is what the training loop (and
each Ray Train worker) calls.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from nanovlm.data.formats import min_ratings, normalize_row
from nanovlm.data.local_files import DatasetError
from nanovlm.data.processors import image_processor_for
from nanovlm.data.samples import SKIP_FIXES, UNREADABLE, SampleBuilder, why_skipped
from nanovlm.data.scan_cache import Scan, cached_scan, scan_key
from nanovlm.data.shapes import DATA_VERSION, ShapesRows
from nanovlm.data.sources import RowTable, Source, load_table, resolve_sources, use_streaming
from nanovlm.data.tokenizer_training import train_tokenizer_on_rows

logger = logging.getLogger(__name__)


# ==================================================================== answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed: for exact match."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def _text_rows(rows: Sequence[dict]) -> Iterator[dict[str, Any]]:
    """Rows normalised, images left undecoded (cheap to scan)."""
    if hasattr(rows, "text_row"):  # ShapesRows: skip drawing
        yield from (rows.text_row(i) for i in range(len(rows)))
        return
    import datasets
    if isinstance(rows, datasets.Dataset):
        rows = RowTable(rows)
    if isinstance(rows, RowTable):
        yield from rows.undecoded_rows()
        return
    yield from (normalize_row(row) for row in rows)


# ==================================================================== samples

class VQADataset(torch.utils.data.Dataset):
    """Samples for the VLM (item keys: `samples.SampleBuilder.item`), from the usable rows only.

    Every row is checked when the dataset is made (`skipped`: rows skipped by reason,
    `skip_details`: the first row skipped for each reason and why); `cache_scan` keeps that scan
    on disk for the next dataset of the same rows and settings. `image_processor` defaults to the
    model's (`image_processor_for(cfg)`); `min_ratings`: FineVision's filters (`formats.min_ratings`)."""

    def __init__(self, rows: Sequence[dict], tokenizer, image_processor, cfg, max_length: int | None = None,
                 verify_images: bool = False, name: str = "dataset", max_images: int | None = None,
                 min_ratings: dict[str, int] | None = None, cache_scan: bool = False):
        self.rows = rows
        self.builder = SampleBuilder(tokenizer, image_processor or image_processor_for(cfg), cfg, max_length,
                                     max_images, min_ratings)
        self.name = name
        self.skipped_at_load = 0               # unreadable images met in __getitem__ (this process)
        check = "decode" if verify_images else "size"
        scan, cached = cached_scan(self._scan_key(check) if cache_scan else None, lambda: self._scan(check))
        self.indices, self._sizes = scan.indices, scan.sizes
        self.skipped: Counter[str] = scan.skipped
        self.skip_details: dict[str, str] = scan.skip_details
        self.rows_scanned = 0 if cached else scan.rows_read   # rows this dataset read to check them
        kept, total = len(self.indices), len(self.indices) + sum(self.skipped.values())
        if self.skipped:
            logger.warning("%s: kept %d of %d rows%s; skipped %s; first of each: %s.", name, kept, total,
                           " (scan read from the cache)" if cached else "", dict(self.skipped), self.skip_details)
        else:
            logger.info("%s: %d rows%s.", name, kept, " (scan read from the cache)" if cached else "")

    def _scan(self, check: str) -> Scan:
        scan = Scan([], {})
        image_size = (self.rows.img_size,) * 2 if hasattr(self.rows, "text_row") else None
        for i, row in enumerate(_text_rows(self.rows)):
            scan.rows_read += 1
            verdict = self.builder.inspect(row, check, image_size)
            if verdict.reason is not None:
                scan.skipped[verdict.reason] += 1
                scan.skip_details.setdefault(verdict.reason, f"row {i}: {verdict.detail}")
                continue
            scan.indices.append(i)
            scan.sizes[i] = (verdict.tokens, verdict.images)
        return scan

    def _scan_key(self, check: str) -> str | None:
        """What the scan depends on, hashed; None for rows without a stable identity."""
        if isinstance(self.rows, ShapesRows):
            rows = f"{self.rows!r} v{DATA_VERSION}"
        elif isinstance(self.rows, RowTable):
            rows = self.rows.fingerprint
        else:
            return None
        builder = self.builder
        return scan_key({"rows": rows, "tokenizer": tokenizer_fingerprint(builder.encoder.tokenizer),
                         "processor": repr(builder.image_processor), "tile_tokens": builder.encoder.image_token_length,
                         "max_length": builder.max_length, "max_images": builder.max_images,
                         "min_ratings": builder.min_ratings, "check": check})

    def why_skipped(self) -> str:
        """The counts by reason, and the most common reason's first row and fix, in one line."""
        return why_skipped(self.skipped, self.skip_details)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values()) + self.skipped_at_load

    def shard(self, rank: int, world_size: int) -> "VQADataset":
        """Keep this rank's share: disjoint across ranks, the same length on every rank
        (the last len % world_size samples are dropped)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        per_rank = len(self.indices) // world_size
        self.indices = self.indices[rank::world_size][:per_rank]
        return self

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        # An image that cannot be decoded now (lazy decoding) is replaced by the next sample.
        for attempt in range(len(self.indices)):
            index = self.indices[(k + attempt) % len(self.indices)]
            try:
                return self.builder.item(normalize_row(self.rows[index]))
            except UNREADABLE as exc:
                self.skipped_at_load += 1
                logger.warning("%s row %d: unreadable image (%s); using the next row.", self.name, index, exc)
        raise DatasetError(f"{self.name}: no row has a readable image; check the image files or bytes the rows hold.")

    def sample_sizes(self) -> list[tuple[int, int]]:
        """(tokens, images) of every sample, in index order, as the scan measured them from the
        text and the images' sizes (no pixel decoded): what packing plans rows with. They count
        what an item holds: len(input_ids), and its images (not their tiles, as nanoVLM counts)."""
        return [self._sizes[i] for i in self.indices]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges, added tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(f"{text}\n{tokenizer.chat_template}".encode()).hexdigest()[:16]


# ==================================================================== row loading

def load_rows(train_cfg, img_size: int = 64) -> tuple[Sequence[dict], Sequence[dict] | None, bool]:
    """(train rows, validation rows or None, local) of TrainConfig.train_dataset_path, one dataset."""
    sources = resolve_sources(train_cfg)
    if len(sources) != 1:
        raise DatasetError(f"train_dataset_path={train_cfg.train_dataset_path!r} is a mixture; load_rows reads "
                           "one dataset.")
    return _source_rows(sources[0], train_cfg, img_size)


def _source_rows(source: Source, train_cfg, img_size: int):
    if source.format == "shapes":
        common = dict(seed=train_cfg.shapes_seed, max_objects=train_cfg.shapes_max_objects,
                      question_types=train_cfg.shapes_question_types, img_size=img_size)
        train_size = train_cfg.shapes_train_size
        if train_cfg.data_cutoff_idx is not None:
            train_size = min(train_size, train_cfg.data_cutoff_idx)
        return (ShapesRows("train", train_size, **common),
                ShapesRows("validation", train_cfg.shapes_eval_size, **common), False)
    train, val = _pick_splits(load_table(source), train_cfg.val_ratio, train_cfg.seed, source.path)
    if train_cfg.data_cutoff_idx is not None:
        train = train.select(range(min(len(train), train_cfg.data_cutoff_idx)))
    return RowTable(train, source.base_dir), None if val is None else RowTable(val, source.base_dir), source.local


def _pick_splits(data, val_ratio: float, seed: int, path: str):
    import datasets
    if isinstance(data, datasets.DatasetDict):
        for name in ("validation", "val"):
            if name in data and "train" in data:
                return data["train"], data[name]
        if "train" not in data and len(data) != 1:
            raise DatasetError(f"train_dataset_path={path!r} has splits {list(data)} and none is 'train'.")
        data = data["train"] if "train" in data else next(iter(data.values()))
    n_val = round(len(data) * val_ratio)
    if val_ratio > 0 and n_val == 0 and len(data) > 1:
        n_val = 1
    if n_val == 0:
        logger.warning("%s: no validation split and val_ratio=%s: no validation set.", path, val_ratio)
        return data, None
    split = data.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return split["train"], split["test"]


@dataclass
class DataSplits:
    """What `build_datasets` returns; unpacks as `train, val = build_datasets(...)`.

    `train` is already this rank's share, so a sampler over it must not shard again:
    `sampler_rank` / `sampler_world_size` are 0 / 1. Map-style it is a `VQADataset` (or a
    `mixture.MixtureDataset`); streaming (`streaming` True) a `streaming.TrainStream`. `val` is the
    whole validation set (or None); evaluation strides over it by rank and sums the counts."""
    train: Any
    val: Any
    sampler_rank: int = 0
    sampler_world_size: int = 1
    streaming: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.val))

    def report(self, sampler, skipped_at_load: int = 0, rank: int = 0, sum_over_ranks=None) -> dict[str, Any]:
        """The run's data counts: `rows_scanned` (read before training), `rows_streamed` (read
        while training), `skipped` by reason with `skipped_total`, and `skip_details` (this
        rank's first row skipped for each reason). `sum_over_ranks(list of numbers)`: the sums
        over the ranks (e.g. an all-reduce); None: this rank's counts are the run's."""
        skipped = Counter({"unreadable_image": skipped_at_load}) + Counter(getattr(sampler, "skipped", {}))
        details = dict(getattr(sampler, "skip_details", {}))
        parts = [self.train, *getattr(self.val, "datasets", [self.val])]   # a mixture's validation: a ConcatDataset
        if self.streaming:   # the stream read the validation rows (checked from memory after)
            parts = [self.train]
        scanned = sum(getattr(d, "rows_scanned", 0) for d in parts if d is not None)
        if not self.streaming:
            skipped["unreadable_image"] += self.train.skipped_at_load
            if rank == 0:   # every rank scanned (or read the scan of) the whole set: count it once
                skipped += self.train.skipped
                details = {**self.train.skip_details, **details}
        counts = [scanned, getattr(sampler, "rows_read", 0) if self.streaming else 0,
                  *(skipped.get(reason, 0) for reason in SKIP_FIXES)]
        if sum_over_ranks is not None:
            counts = [int(n) for n in sum_over_ranks([float(n) for n in counts])]
        by_reason = {reason: n for reason, n in zip(SKIP_FIXES, counts[2:]) if n}
        return {"streaming": self.streaming, "rows_scanned": counts[0], "rows_streamed": counts[1],
                "skipped": by_reason, "skipped_total": sum(by_reason.values()), "skip_details": details}


def build_datasets(vlm_cfg, train_cfg, tokenizer, rank: int = 0, world_size: int = 1,
                   image_processor=None, shard_val: bool = False) -> DataSplits:
    """This rank's training data (a disjoint share) and the validation set (docs/data.md)."""
    if tokenizer.image_token_id != vlm_cfg.image_token_id:
        raise ValueError(f"The tokenizer gives {tokenizer.image_token!r} id {tokenizer.image_token_id} but "
                         f"VLMConfig.image_token_id is {vlm_cfg.image_token_id} (lm_base_vocab_size="
                         f"{vlm_cfg.lm_base_vocab_size}); set lm_base_vocab_size to the tokenizer's base "
                         "vocabulary or vlm_image_token_id to the tokenizer's id.")
    image_processor = image_processor or image_processor_for(vlm_cfg)
    sources = resolve_sources(train_cfg)
    common = dict(tokenizer=tokenizer, image_processor=image_processor, cfg=vlm_cfg,
                  max_images=train_cfg.max_images_per_example, min_ratings=min_ratings(train_cfg))
    if use_streaming(train_cfg, sources):
        from nanovlm.data.streaming import build_stream
        builder = SampleBuilder(tokenizer, image_processor, vlm_cfg, None, common["max_images"], common["min_ratings"])
        max_tokens = train_cfg.max_sample_length or vlm_cfg.lm_max_length
        train, val_rows = build_stream(sources, train_cfg, builder, max_tokens, rank, world_size)
        val = VQADataset(val_rows, name="validation", **common) if val_rows else None
        return DataSplits(train, val, streaming=True)
    parts = []
    for source in sources:
        train_rows, val_rows, local = _source_rows(source, train_cfg, vlm_cfg.vit_img_size)
        args = dict(common, verify_images=local, cache_scan=True)
        parts.append((VQADataset(train_rows, name=f"train {source.path}", **args),
                      None if val_rows is None else VQADataset(val_rows, name=f"validation {source.path}", **args)))
    train = parts[0][0]
    if len(parts) > 1:
        from nanovlm.data.mixture import MixtureDataset
        train = MixtureDataset([p[0] for p in parts], [s.weight for s in sources], train_cfg.seed)
    if len(train) < world_size:
        raise DatasetError(f"train_dataset_path={train_cfg.train_dataset_path!r} has {len(train)} usable "
                           f"training rows for {world_size} worker(s): {train.why_skipped()}.")
    train.shard(rank, world_size)
    vals = [val for _, val in parts if val is not None]
    val = vals[0] if len(vals) == 1 else (torch.utils.data.ConcatDataset(vals) if vals else None)
    if shard_val and isinstance(val, VQADataset):
        val.shard(rank, world_size)
    return DataSplits(train, val)


def train_tokenizer_for_dataset(train_cfg, vocab_size: int, out_dir, img_size: int = 64, **kwargs):
    """Train a byte-level BPE on the text of the training rows that `train_cfg.train_dataset_path`
    names (shapes, local files, Hub ids; every dataset of a mixture), without decoding any image.
    Point `TrainConfig.tokenizer_path` at `out_dir` and set `lm_base_vocab_size=vocab_size` to use it."""
    def rows() -> Iterator[dict[str, Any]]:
        for source in resolve_sources(train_cfg):
            yield from _text_rows(_source_rows(source, train_cfg, img_size)[0])
    return train_tokenizer_on_rows(rows(), vocab_size, out_dir, **kwargs)
