"""Where rows come from: the datasets `train_dataset_path` names, their formats, and (map-style)
loading them as random-access tables.

`resolve_sources(train_cfg)` -> one `Source` per entry (docs/data.md, Formats): the built-in
`shapes`; local parquet, save_to_disk (Arrow) and imagefolder directories; JSON / JSONL (records,
LLaVA) and CSV files, alone or in a directory; a Hub dataset id; a remote URI (`s3://...`, read by
`datasets` through fsspec). `use_streaming` decides the mode (`TrainConfig.stream_dataset`, or
auto) from what each source costs to scan; `load_table` loads a source map-style, as a `RowTable`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from nanovlm.config import dataset_entries
from nanovlm.data.formats import AmbiguousPaths, normalize_row
from nanovlm.data.local_files import DatasetError, load_failure, parquet_splits

logger = logging.getLogger(__name__)

# auto mode streams a local dataset above this many rows (counted from parquet footers or Arrow
# metadata) or, for text formats whose rows cannot be counted without reading them, this many bytes
STREAM_ABOVE_ROWS = 100_000
STREAM_ABOVE_BYTES = 100 << 20
TEXT_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class Source:
    """One dataset of the mixture. `format`: shapes, parquet, arrow, imagefolder, json, csv, hub
    or remote; `files`: split -> local (or remote) data files; `base_dir`: where relative image
    paths are read from; `subsets`: Hub configs (("all",) = every one)."""
    path: str
    format: str
    weight: float | None = None
    subsets: tuple[str, ...] = ("all",)
    files: dict[str, list[str]] = field(default_factory=dict)
    base_dir: str | AmbiguousPaths | None = None

    @property
    def local(self) -> bool:
        return self.format not in ("hub", "remote", "shapes")


def resolve_sources(train_cfg) -> list[Source]:
    """The sources of `train_cfg.train_dataset_path` (their formats detected, nothing read)."""
    default_subsets = tuple(n.strip() for n in train_cfg.train_dataset_name.split(",") if n.strip()) or ("all",)
    sources = []
    for entry in dataset_entries(train_cfg.train_dataset_path, train_cfg.train_dataset_weights):
        subsets = entry.subsets or default_subsets
        if entry.path == "shapes":
            sources.append(Source("shapes", "shapes"))
        elif "://" in entry.path:
            suffix = "." + entry.path.rsplit(".", 1)[-1].lower()
            sources.append(Source(entry.path, "remote", entry.weight, subsets,
                                  {"train": [entry.path]} if suffix in (".parquet", *TEXT_FORMATS) else {}))
        elif Path(entry.path).expanduser().exists():
            sources.append(_local_source(Path(entry.path).expanduser(), entry.weight))
        else:
            sources.append(Source(entry.path, "hub", entry.weight, subsets))
    return sources


def _local_source(path: Path, weight: float | None) -> Source:
    name = str(path)
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else TEXT_FORMATS.get(path.suffix)
        if kind is None:
            raise DatasetError(f"train_dataset_path={name!r}: a file must be .parquet, .json, .jsonl or .csv.")
        return Source(name, kind, weight, files={"train": [str(path)]}, base_dir=str(path.parent))
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return Source(name, "arrow", weight, base_dir=str(path))
    for kind, patterns in (("parquet", ("*.parquet",)), ("json", ("*.jsonl", "*.json")), ("csv", ("*.csv",))):
        found = sorted(f for pattern in patterns for f in path.rglob(pattern) if not f.name.startswith("metadata."))
        if found:
            files = parquet_splits(path, found)
            folders = sorted({str(Path(f).parent) for names in files.values() for f in names})
            base = folders[0] if len(folders) == 1 else AmbiguousPaths(folders)
            return Source(name, kind, weight, files=files, base_dir=base)
    if any((path / m).exists() for m in ("metadata.jsonl", "metadata.csv")) or any(path.iterdir()):
        return Source(name, "imagefolder", weight, base_dir=str(path))
    raise DatasetError(f"train_dataset_path={name!r}: expected a save_to_disk directory, parquet, JSON, JSONL or CSV "
                       "files, or an imagefolder directory with metadata.jsonl.")


def estimated_rows(source: Source) -> tuple[int | None, int]:
    """(rows, bytes) of a local source as far as they cost nothing to learn: rows from parquet
    footers and Arrow metadata, bytes of text files (JSON, CSV, metadata.jsonl)."""
    import pyarrow.parquet as pq

    if source.format == "parquet":
        return sum(pq.ParquetFile(f).metadata.num_rows for names in source.files.values() for f in names), 0
    if source.format == "arrow":
        import datasets
        data = datasets.load_from_disk(source.path)
        return sum(len(d) for d in (data.values() if isinstance(data, datasets.DatasetDict) else [data])), 0
    files = [Path(f) for names in source.files.values() for f in names]
    if source.format == "imagefolder":
        files = list(Path(source.path).rglob("metadata.jsonl"))
    return None, sum(f.stat().st_size for f in files)


def use_streaming(train_cfg, sources: Sequence[Source]) -> bool:
    """`stream_dataset` when set; else (auto) stream Hub and remote data, and local data of more
    than STREAM_ABOVE_ROWS rows (or STREAM_ABOVE_BYTES of text): scanning it up front would cost
    more than the first steps."""
    if train_cfg.stream_dataset is not None:
        return train_cfg.stream_dataset
    if any(s.format == "shapes" for s in sources):
        return False
    if any(not s.local for s in sources):
        return True
    rows, size = zip(*(estimated_rows(s) for s in sources))
    return sum(r or 0 for r in rows) > STREAM_ABOVE_ROWS or sum(size) > STREAM_ABOVE_BYTES


# ==================================================================== map-style tables

class RowTable(Sequence):
    """A map-style split: a `datasets.Dataset` whose rows come out normalised (`normalize_row`),
    relative image paths read from `base_dir`."""

    def __init__(self, data, base_dir: str | AmbiguousPaths | None = None):
        self.data, self.base_dir = data, base_dir

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return normalize_row(self.data[index], self.base_dir)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def select(self, indices) -> "RowTable":
        return RowTable(self.data.select(indices), self.base_dir)

    @property
    def fingerprint(self) -> str:
        base = self.base_dir.files if isinstance(self.base_dir, AmbiguousPaths) else self.base_dir
        return f"{self.data._fingerprint}:{base}"

    def undecoded_rows(self) -> Iterator[dict[str, Any]]:
        """Every row, normalised, its images left undecoded ({bytes, path}): cheap to scan."""
        data = self.data
        for name, feature in data.features.items():
            if _has_image_feature(feature):
                data = data.cast_column(name, _undecoded_feature(feature))
        for batch in data.iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield normalize_row(dict(zip(columns, values)), self.base_dir)


def _has_image_feature(feature: Any) -> bool:
    from datasets import Image as ImageFeature
    return isinstance(feature, ImageFeature) or isinstance(getattr(feature, "feature", None), ImageFeature)


def _undecoded_feature(feature: Any) -> Any:
    from datasets import Image as ImageFeature, List
    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    return List(ImageFeature(decode=False))


def load_table(source: Source):
    """A source's splits as `datasets` tables: a Dataset or a DatasetDict (downloaded and
    converted to Arrow once, in `datasets`' cache)."""
    import datasets

    if source.format == "hub":
        return _load_hub(source.path, source.subsets)
    path = Path(source.path)
    try:
        if source.format == "arrow":
            return datasets.load_from_disk(str(path))
        if source.format == "imagefolder":
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        builder = "json" if source.format == "json" else source.format
        if source.format == "remote":
            builder = {"parquet": "parquet", "csv": "csv"}.get(source.path.rsplit(".", 1)[-1], "json")
        return datasets.load_dataset(builder, data_files=source.files)
    except DatasetError:
        raise
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as exc:
        raise DatasetError(load_failure(path, exc)) from exc


def _load_hub(path: str, subsets: tuple[str, ...]):
    """the_cauldron-style: one config per subset name, train splits concatenated."""
    import datasets
    parts = {}
    try:
        if subsets in ((), ("all",)):
            subsets = tuple(datasets.get_dataset_config_names(path))
        for subset in subsets:
            logger.info("Loading %s / %s from the Hub.", path, subset)
            loaded = datasets.load_dataset(path, subset)
            for split, ds in loaded.items():
                parts.setdefault(split, []).append(ds)
    except (OSError, ValueError) as exc:  # not found, offline, no such subset
        raise DatasetError(f"train_dataset_path={path!r} is no local path and does not load from the Hub: "
                           f"{type(exc).__name__}: {exc}. Check the path or the dataset id (and "
                           "train_dataset_name), or the network.") from exc
    if "validation" in parts and len(parts["validation"]) != len(subsets):
        del parts["validation"]  # only some subsets have one: split everything by val_ratio instead
    return datasets.DatasetDict({split: datasets.concatenate_datasets(p) for split, p in parts.items()})
