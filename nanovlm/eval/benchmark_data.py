"""A benchmark's questions: from the Hub (the task's published dataset), a local copy of it
(a parquet file or directory, a `save_to_disk` directory, an imagefolder with metadata.jsonl), or,
for MMStar, `shapes`: the offline shapes dataset's multiple-choice questions in MMStar's schema.

Rows stay in the published schema; `check_columns` names any column the task reads and the
rows lack, before a model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from nanovlm.data.local_files import DatasetError, parquet_splits
from nanovlm.eval.tasks import Task

logger = logging.getLogger(__name__)

SHAPES = "shapes"


def load_questions(task: Task, source: str | None = None, split: str | None = None,
                   shapes_settings: dict[str, Any] | None = None, limit: int | None = None) -> Sequence[dict]:
    """The rows of `task` from `source` (default: its Hub dataset), in `split` (default: the
    task's; a local copy with one split is used whole). `shapes_settings`: the shapes dataset's
    settings (`shapes_settings()`) when `source` is 'shapes', which then makes `limit` questions
    (default: its size)."""
    source = source or task.hub_id
    if source == SHAPES:
        if task.name != "mmstar":
            raise DatasetError(f"--dataset shapes holds multiple-choice questions in MMStar's schema; task "
                               f"{task.name!r} needs its own benchmark (a local copy or a Hub id).")
        settings = dict(shapes_settings or {})
        if limit is not None:
            settings["size"] = limit
        return shapes_mmstar_rows(**settings)
    path = Path(source).expanduser()
    rows = _split(_load_local(path) if path.exists() else _load_hub(task, source, split), split or task.split,
                  source, exact=split is not None)
    check_columns(task, rows.column_names, source)
    return rows


def check_columns(task: Task, columns: Sequence[str], source: str) -> None:
    missing = [c for c in task.columns if c not in columns]
    if missing:
        raise DatasetError(f"{source} has no column {', '.join(map(repr, missing))} of task {task.name!r} (it reads "
                           f"{', '.join(task.columns)}; the rows have {', '.join(columns)}). Give the benchmark in "
                           f"its published schema ({task.hub_id}); docs/eval.md lists each task's columns.")


def _load_local(path: Path):
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        files = [path] if path.is_file() and path.suffix == ".parquet" else sorted(path.rglob("*.parquet"))
        if files:
            return _image_paths_read(datasets.load_dataset("parquet", data_files=parquet_splits(path, files)), files)
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path))
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as exc:
        raise DatasetError(f"--dataset {path} does not load: {type(exc).__name__}: {exc}") from exc
    raise DatasetError(f"--dataset {path}: expected a parquet file or directory, a save_to_disk directory or an "
                       "imagefolder directory (images and metadata.jsonl).")


def _image_paths_read(data, files: list[Path]):
    """An `image` column of path strings becomes an image column; relative paths are read from the
    parquet files' directory (`nanovlm.data.formats.resolve_path`)."""
    import datasets

    from nanovlm.data.formats import AmbiguousPaths, resolve_path

    folders = {f.parent.resolve() for f in files}
    base = next(iter(folders)) if len(folders) == 1 else AmbiguousPaths([str(f) for f in files])
    for split, rows in data.items():
        feature = rows.features.get("image")
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            rows = rows.map(lambda batch: {"image": [v if v is None else resolve_path(v, base) for v in batch["image"]]},
                            batched=True)
            data[split] = rows.cast_column("image", datasets.Image())
    return data


def _load_hub(task: Task, source: str, split: str | None):
    import datasets

    config = task.hub_config if source == task.hub_id else None
    logger.info("Loading %s%s (%s) from the Hub.", source, f" / {config}" if config else "", split or task.split)
    try:
        return datasets.load_dataset(source, config, split=split or task.split)
    except (OSError, ValueError) as exc:   # not found, offline, no such split
        raise DatasetError(f"--dataset {source} is no local path and does not load from the Hub ({type(exc).__name__}: "
                           f"{exc}). Without Hub access, give a local copy (e.g. `datasets.load_dataset("
                           f"{task.hub_id!r}{', ' + repr(task.hub_config) if task.hub_config else ''}, split="
                           f"{task.split!r}).save_to_disk(DIR)` where the Hub is reachable).") from exc


def _split(data, split: str, source: str, exact: bool):
    """The split of a DatasetDict: `split`, else (not asked for by name) its only one."""
    import datasets

    if not isinstance(data, datasets.DatasetDict):
        return data
    if split in data:
        return data[split]
    if len(data) == 1 and not exact:
        return next(iter(data.values()))
    raise DatasetError(f"--dataset {source} has splits {list(data)} and no {split!r}; pass --split.")


# ---------------------------------------------------------------- shapes, as MMStar

def shapes_mmstar_rows(size: int = 500, seed: int = 1234, max_objects: int = 1,
                       question_types: str | Sequence[str] = "choice", img_size: int = 64,
                       split: str = "validation") -> list[dict]:
    """`size` multiple-choice questions of the shapes `split`, in MMStar's columns: the options in
    the question, the letter as the answer, the attribute asked about as category and l2_category.
    They are the split's own `choice` questions, with the attributes of `question_types` (the
    settings a model was trained with), in index order."""
    from nanovlm.data import shapes

    types = shapes.parse_question_types(question_types)
    types = types if shapes.CHOICE in types else (*types, shapes.CHOICE)
    rows, index = [], 0
    while len(rows) < size:
        sample = shapes.generate_sample(seed, split, index, max_objects, types, img_size)
        if sample.question_type == shapes.CHOICE:
            rows.append({"index": index, "question": sample.question, "answer": sample.answer,
                         "image": shapes.render_image(sample.objects, img_size),
                         "category": sample.category, "l2_category": sample.category,
                         "meta_info": {"source": "shapes", "split": split, "image_path": f"shapes/{split}/{index}.png"}})
        index += 1
    return rows


def shapes_settings(train_config: dict[str, Any] | None, img_size: int) -> dict[str, Any]:
    """The shapes settings of a training config (a TrainConfig as a dict), for `shapes_mmstar_rows`:
    questions like those the model was trained on. Without one: choice questions about every attribute."""
    settings: dict[str, Any] = {"img_size": img_size}
    if train_config and train_config.get("train_dataset_path") == SHAPES:
        settings.update(seed=train_config["shapes_seed"], max_objects=train_config["shapes_max_objects"],
                        question_types=train_config["shapes_question_types"],
                        size=train_config["shapes_eval_size"])
    return settings


def write_parquet(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows with PIL images in an `image` column -> a parquet file (images as PNG bytes), as the
    Hub stores benchmarks: what `--dataset FILE` reads back."""
    import datasets

    features = datasets.Dataset.from_list([{k: v for k, v in rows[0].items() if k != "image"}]).features
    features["image"] = datasets.Image()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(list(rows), features=features).to_parquet(str(path))
    return path
