"""Streaming reads: a source's rows as shards that each worker reads on its own, in order, from any row.

A *fragment* is the smallest piece of a source that can be read without reading the others: a
parquet row group, a block of rows of an Arrow table or of a parsed JSON array / CSV file, a byte
range of a JSONL file, a file of a Hub (or remote) dataset as `datasets` streams it. A *shard* is a
run of one fragment's rows. `fragments(source, split)` lists a source's fragments in storage order
(nothing but footers and file sizes is read); `split_for_rank` gives each rank a disjoint share (`take_rows`, `after`: cuts);
`read_shard(shard, offset, counter)` yields its rows from the `offset`-th on, normalised
(`formats.normalize_row`), reading as little before them as the format allows: nothing for Arrow and
parsed files, the row group's earlier batches for parquet, the fragment's earlier lines for JSONL.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from nanovlm.data.formats import normalize_row
from nanovlm.data.local_files import DatasetError

logger = logging.getLogger(__name__)

BLOCK_ROWS = 10_000        # rows per fragment of an Arrow table or a parsed file
JSONL_BLOCK_BYTES = 8 << 20
READ_BATCH = 64            # rows per parquet read


@dataclass(frozen=True)
class Fragment:
    """kind: parquet (part = row group), arrow / records (part = first row), jsonl (part = (first
    byte, end byte): the lines that start there), stream (part = (subset, shard index) of a
    `datasets` streaming dataset). rows: None where only reading tells."""
    kind: str
    path: str
    part: Any
    rows: int | None
    base_dir: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class Shard:
    """Rows start, start + step, ... (before `stop`, None: the fragment's end) of a fragment."""
    fragment: Fragment
    start: int = 0
    stop: int | None = None
    step: int = 1

    @property
    def rows(self) -> int | None:
        stop = self.fragment.rows if self.stop is None else self.stop
        return None if stop is None else max(0, -(-(stop - self.start) // self.step))


class ReadCounter:
    """Rows read from storage, those passed over included (stride-skipped rows, a parquet row
    group's rows before a seek's target): what the per-rank tests count."""

    def __init__(self):
        self.rows = 0


# ==================================================================== listing

def fragments(source, split: str = "train") -> list[Fragment]:
    """The fragments of `split` of a `sources.Source`, in storage order ([] if it has no such split)."""
    if source.format in ("hub", "remote"):
        return _stream_fragments(source, split)
    if source.format == "arrow":
        data = _arrow(source.path, split)
        return [] if data is None else [Fragment("arrow", source.path, a, min(BLOCK_ROWS, len(data) - a), split=split)
                                        for a in range(0, len(data), BLOCK_ROWS)]
    files = source.files.get(split, [])
    if source.format == "imagefolder":
        files = [str(f) for f in sorted(Path(source.path).rglob("metadata.jsonl"))] if split == "train" else []
    found = []
    for file in files:
        base = str(Path(file).parent)
        if source.format == "parquet":
            import pyarrow.parquet as pq
            meta = pq.ParquetFile(file).metadata
            found += [Fragment("parquet", file, g, meta.row_group(g).num_rows, base) for g in range(meta.num_row_groups)]
        elif source.format == "csv" or _is_json_array(file):
            n = len(_records(file))
            found += [Fragment("records", file, a, min(BLOCK_ROWS, n - a), base) for a in range(0, n, BLOCK_ROWS)]
        else:
            size = Path(file).stat().st_size
            found += [Fragment("jsonl", file, (a, min(a + JSONL_BLOCK_BYTES, size)), None, base)
                      for a in range(0, size, JSONL_BLOCK_BYTES)]
    return found


def _stream_fragments(source, split: str) -> list[Fragment]:
    import datasets
    subsets = source.subsets
    if source.format == "hub" and subsets in ((), ("all",)):
        try:
            subsets = tuple(datasets.get_dataset_config_names(source.path))
        except (OSError, ValueError) as exc:
            raise _not_streamable(source.path, exc) from exc
    found = []
    files = tuple(source.files.get(split, ())) if source.format == "remote" else ()
    if source.format == "remote" and not files:
        return []
    for subset in (subsets if source.format == "hub" else (None,)):
        data = _stream(source.path, subset, split, files)
        if data is not None:
            base = source.path.rsplit("/", 1)[0] if source.format == "remote" else None   # relative image paths
            found += [Fragment("stream", source.path, (subset, i, files), None, base, split)
                      for i in range(data.num_shards)]
    return found


def split_for_rank(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """This rank's shards, disjoint from every other rank's. Known lengths: the rank's contiguous
    1/world_size of the rows (whole fragments but at the two ends). Unknown: every world_size-th
    shard, or, with fewer shards than ranks, every world_size-th row of each (each rank then
    reads every row and keeps its own)."""
    if world_size == 1:
        return list(shards)
    if all(s.rows is not None for s in shards):
        total = sum(s.rows for s in shards)
        return take_rows(shards, rank * total // world_size, (rank + 1) * total // world_size)
    if len(shards) >= world_size:
        return shards[rank::world_size]
    logger.warning("%d shards of unknown length for %d workers: each worker reads every row of them and keeps "
                   "every %d-th.", len(shards), world_size, world_size)
    return [replace(s, start=s.start + rank * s.step, step=s.step * world_size) for s in shards]


def take_rows(shards: list[Shard], first: int, end: int | None) -> list[Shard]:
    """Rows [first, end) of the concatenated shards (end None: to the end), as shards; every
    shard's length must be known."""
    out, position = [], 0
    for shard in shards:
        n = shard.rows
        if n is None:
            raise DatasetError(f"{shard.fragment.path}: its length is unknown until it is read, so rows cannot be "
                               "counted off it (data_cutoff_idx); use stream_dataset=false.")
        lo, hi = max(first - position, 0), n if end is None else min(end - position, n)
        if lo < hi:
            out.append(replace(shard, start=shard.start + lo * shard.step, stop=shard.start + hi * shard.step))
        position += n
    return out


def after(shards: list[Shard], index: int, offset: int) -> list[Shard]:
    """The shards from the `offset`-th row of shard `index` on (what a reader left of them)."""
    if index >= len(shards):
        return []
    shard = shards[index]
    return [replace(shard, start=shard.start + offset * shard.step), *shards[index + 1:]]


# ==================================================================== reading

def read_shard(shard: Shard, offset: int, counter: ReadCounter) -> Iterator[dict[str, Any]]:
    """The shard's rows from its `offset`-th on, normalised. Counts every row read in `counter`."""
    first = shard.start + offset * shard.step
    for index, row in enumerate(_read_fragment(shard.fragment, first, counter)):
        position = first + index
        if shard.stop is not None and position >= shard.stop:
            return
        counter.rows += 1
        if (position - shard.start) % shard.step == 0:
            yield normalize_row(row, shard.fragment.base_dir)


def _read_fragment(fragment: Fragment, first: int, counter: ReadCounter) -> Iterator[dict[str, Any]]:
    """Raw rows of a fragment from its `first` row on; `counter` gets the rows read to get there."""
    if fragment.kind == "parquet":
        import pyarrow.parquet as pq
        seen = 0
        for batch in pq.ParquetFile(fragment.path).iter_batches(batch_size=READ_BATCH, row_groups=[fragment.part]):
            if seen + batch.num_rows > first:
                counter.rows += max(0, first - seen)     # the batch's rows before `first` were decoded too
                yield from batch.slice(max(0, first - seen)).to_pylist()
            else:
                counter.rows += batch.num_rows
            seen += batch.num_rows
    elif fragment.kind == "arrow":
        table = _arrow(fragment.path, fragment.split).with_format("arrow")
        for a in range(fragment.part + first, fragment.part + fragment.rows, READ_BATCH):
            yield from table[a:min(a + READ_BATCH, fragment.part + fragment.rows)].to_pylist()
    elif fragment.kind == "records":
        yield from _records(fragment.path)[fragment.part + first:fragment.part + fragment.rows]
    elif fragment.kind == "jsonl":
        yield from _jsonl_lines(fragment.path, *fragment.part, first)
    else:
        subset, index, files = fragment.part
        data = _stream(fragment.path, subset, fragment.split, files)
        yield from data.shard(num_shards=data.num_shards, index=index, contiguous=True).skip(first)


def _jsonl_lines(path: str, start: int, end: int, first: int) -> Iterator[dict[str, Any]]:
    """The JSON objects of the lines that start in bytes [start, end), from the `first`-th."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()          # the line that started before `start` belongs to the previous range
        index = 0
        while f.tell() < end:
            where = f.tell()
            line = f.readline()
            if not line:
                return
            if not line.strip():
                continue
            if index >= first:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path} byte {where}: a line is not valid JSON ({exc.msg}); each line must be "
                                       "one JSON object.") from None
                yield row if isinstance(row, dict) else {"value": row}
            index += 1


def _is_json_array(path: str) -> bool:
    if not path.endswith(".json"):
        return False
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"["


@lru_cache(maxsize=8)
def _records(path: str) -> list[dict[str, Any]]:
    """A JSON array or a CSV file, parsed once per process (their rows cannot be found otherwise)."""
    try:
        if path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(rows, list):
        raise DatasetError(f"{path} holds a JSON {type(rows).__name__}, not a list of rows.")
    return [row if isinstance(row, dict) else {"value": row} for row in rows]


@lru_cache(maxsize=8)
def _arrow(path: str, split: str):
    import datasets
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        return data.get(split) if split != "train" or "train" in data else next(iter(data.values()))
    return data if split == "train" else None


@lru_cache(maxsize=64)
def _stream(path: str, subset: str | None, split: str, data_files: tuple[str, ...]):
    """A `datasets` streaming dataset of a Hub id (or of remote files), images left undecoded;
    None if it has no such split."""
    import datasets
    try:
        if data_files:
            builder = {"parquet": "parquet", "csv": "csv"}.get(data_files[0].rsplit(".", 1)[-1], "json")
            loaded = datasets.load_dataset(builder, data_files={split: list(data_files)}, streaming=True)
        else:
            loaded = datasets.load_dataset(path, subset, streaming=True)
    except (OSError, ValueError) as exc:
        raise _not_streamable(path, exc) from exc
    if split not in loaded:
        return None
    from nanovlm.data.sources import _has_image_feature, _undecoded_feature
    data = loaded[split]
    for name, feature in (data.features or {}).items():
        if _has_image_feature(feature):
            data = data.cast_column(name, _undecoded_feature(feature))
    return data


def _not_streamable(path: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"train_dataset_path={path!r} is no local path and does not stream from the Hub: "
                        f"{type(exc).__name__}: {exc}. Check the path or the dataset id (and train_dataset_name), "
                        "or the network.")
