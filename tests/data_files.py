"""Small local datasets in the formats `docs/data.md` accepts, written by the tests that read them
(imported by test modules; not a test itself). Every row carries an `id` column, so a test can say
which rows a worker read."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}


def write_images(directory: Path, size: int = 8) -> list[str]:
    """One small PNG per colour in `directory`; their file names."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (size, size), rgb).save(directory / f"{name}.png")
    return [f"{name}.png" for name in COLOURS]


def answer(i: int) -> str:
    return list(COLOURS)[i % len(COLOURS)]


def cauldron_rows(n: int, first_id: int = 0, image_dir: str = "") -> list[dict]:
    """the_cauldron rows (image paths relative to the data file): one turn, the image's colour."""
    return [{"id": first_id + i, "images": [f"{image_dir}{answer(i)}.png"],
             "texts": [{"user": "What colour is it?", "assistant": answer(i)}]} for i in range(n)]


def write_parquet(path: Path, n: int, row_group_size: int = 10_000, first_id: int = 0) -> Path:
    """`n` the_cauldron rows in one parquet file, the images beside it, built column-wise (300,000
    rows in about 2 s): every row points at one of three shared image files."""
    write_images(path.parent)
    names = [f"{answer(i)}.png" for i in range(3)]
    table = pa.table({
        "id": pa.array(range(first_id, first_id + n), pa.int64()),
        "images": pa.array([[names[i % 3]] for i in range(n)], pa.list_(pa.string())),
        "texts": pa.array([[{"user": "What colour is it?", "assistant": answer(i)}] for i in range(n)]),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
