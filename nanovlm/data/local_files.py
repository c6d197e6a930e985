"""Local dataset files: which data files make which split, and the one-line reason a local dataset
does not load (a malformed `metadata.jsonl` line named by file and line number). `sources` uses them."""

from __future__ import annotations

import json
from pathlib import Path


class DatasetError(ValueError):
    """A dataset cannot be loaded, or has no usable row; the message names the path and the fix."""


def parquet_splits(path: Path, files: list[Path]) -> dict[str, list[str]]:
    """The data files (parquet, JSON, CSV) by split, named as `datasets` infers splits from a
    directory (train-*, validation/, ...), leaving out the other files there (e.g. the images the
    rows point to)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if path.is_file():
        return {"train": [str(path)]}
    found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    wanted = {str(f) for f in files}
    splits = {str(split): [f for f in names if f in wanted] for split, names in found.items()}
    return {split: names for split, names in splits.items() if names}


def load_failure(path: Path, exc: BaseException) -> str:
    """One line on why `path` could not be loaded: the malformed metadata.jsonl line if there is
    one, else the innermost error."""
    for metadata in sorted(path.rglob("metadata.jsonl")) if path.is_dir() else []:
        with metadata.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    problem = f"is not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
                else:
                    if isinstance(row, dict):
                        continue
                    problem = f"holds a {type(row).__name__}"
                return (f"{metadata} line {number} {problem}; each line must be one JSON object such as "
                        '{"file_name": "a.png", "texts": [{"user": "...", "assistant": "..."}]}.')
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"train_dataset_path={str(path)!r} cannot be loaded: {type(exc).__name__}: {exc}"
