"""Rows in the formats people have -> the one row schema samples are made from (docs/data.md, Formats).

    {"images": [image, ...], "texts": [{"user": str, "assistant": str}, ...], ...other columns}

An image is a PIL image, `datasets`' undecoded `{"bytes", "path"}`, or a file path (kept as
`{"bytes": None, "path": ...}`; a relative path is read from the data file's directory). Accepted:

- the_cauldron / FineVision: `images` + `texts`; FineVision adds `<name>_ratings` (one 1..5
  rating per turn) for the four `RATINGS`, which nanoVLM's `<name>_min_rating` filters read;
- one image and one turn: `image` + `question`/`answer` (or `user`/`assistant`);
- LLaVA: `image` (a path, or a list of paths) + `conversations`
  `[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]`;
- imagefolder's `metadata.jsonl`: `file_name` (the image) + any of the text columns above.

`normalize_row` is applied to every row, map-style or streamed, and leaves a normalised row as it is.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

# FineVision's per-turn quality ratings; nanoVLM's TrainConfig filters turns by `<name>_min_rating`.
RATINGS = ("relevance", "image_correspondence", "visual_dependency", "formatting")
LLAVA_IMAGE_PLACEHOLDER = "<image>"
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model"}


def min_ratings(train_cfg) -> dict[str, int]:
    """{rating column: minimum} for the filters that drop anything (FineVision rates 1..5)."""
    limits = {f"{name}_ratings": getattr(train_cfg, f"{name}_min_rating") for name in RATINGS}
    return {column: limit for column, limit in limits.items() if limit > 1}


class AmbiguousPaths:
    """A base directory that cannot be told: the rows come from files in several directories."""

    def __init__(self, files: list[str]):
        self.files = files


def normalize_row(row: dict[str, Any], base_dir: str | Path | AmbiguousPaths | None = None) -> dict[str, Any]:
    """The row in the one schema: `images` (a list), `texts` (a list of turns); other columns kept."""
    if "texts" in row and isinstance(row.get("images"), list) and not _has_paths(row["images"]):
        return row   # the_cauldron / FineVision, decoded or not: the common case, as it is
    out = dict(row)
    if "conversations" in out and "texts" not in out:
        out["texts"] = llava_turns(out.pop("conversations"))
    elif "texts" not in out:
        for user, assistant in (("question", "answer"), ("user", "assistant")):
            if user in out and assistant in out:
                out["texts"] = [{"user": out[user], "assistant": out[assistant]}]
                break
    if isinstance(out.get("texts"), dict):
        out["texts"] = [out["texts"]]
    images = out.pop("images", None)
    for column in ("image", "file_name"):
        if images is None and out.get(column) is not None:
            images = out.pop(column)
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    out["images"] = [image_value(image, base_dir) for image in images]
    return out


def _has_paths(images: list) -> bool:
    """Whether some image is a path to resolve: a string, or a {path} without bytes."""
    return any(isinstance(i, str) or (isinstance(i, dict) and not i.get("bytes") and isinstance(i.get("path"), str))
               for i in images)


def llava_turns(conversation: Any) -> list[dict[str, str]]:
    """LLaVA `conversations` -> turns: each human message paired with the gpt message after it;
    `<image>` placeholders are dropped (the images open the first user turn, as in nanoVLM)."""
    turns, user = [], None
    for message in conversation or []:
        if not isinstance(message, dict):
            continue
        role = str(message.get("from", message.get("role", ""))).lower()
        text = message.get("value", message.get("content"))
        if not isinstance(text, str):
            continue
        text = text.replace(LLAVA_IMAGE_PLACEHOLDER, "").strip()
        if role in _USER_ROLES:
            user = text
        elif role in _ASSISTANT_ROLES and user is not None:
            turns.append({"user": user, "assistant": text})
            user = None
    return turns


def image_value(image: Any, base_dir: str | Path | AmbiguousPaths | None) -> Any:
    """A PIL image or undecoded {bytes, path} as given; a path string as {bytes: None, path},
    relative paths joined to `base_dir`."""
    if isinstance(image, str):
        return {"bytes": None, "path": resolve_path(image, base_dir)}
    if isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
        return {"bytes": None, "path": resolve_path(image["path"], base_dir)}
    return image


def resolve_path(path: str, base_dir: str | Path | AmbiguousPaths | None) -> str:
    from nanovlm.data.local_files import DatasetError

    if base_dir is None or Path(path).is_absolute() or "://" in path:
        return path
    if isinstance(base_dir, str) and "://" in base_dir:   # a remote file's directory (s3://bucket/dir)
        return f"{base_dir.rstrip('/')}/{path}"
    if isinstance(base_dir, AmbiguousPaths):
        raise DatasetError(f"Image path {path!r} in the files {base_dir.files} is relative, and they are in several "
                           "directories, so it is ambiguous; make the paths absolute or put the data files in one "
                           "directory.")
    return str(Path(base_dir) / path)


def row_turns(row: dict[str, Any], minimum: dict[str, int] | None = None) -> tuple[list[tuple[str, str]], int]:
    """The usable (user, assistant) turns of a normalised row, and how many turns the rating
    filters dropped: a turn whose rating in a `minimum` column is below its minimum is dropped, as
    nanoVLM does; turns with an empty side are not usable."""
    turns, dropped = [], 0
    for index, turn in enumerate(row.get("texts") or []):
        if not isinstance(turn, dict):
            continue
        if minimum and _below_minimum(row, index, minimum):
            dropped += 1
            continue
        user, assistant = turn.get("user"), turn.get("assistant")
        if isinstance(user, str) and isinstance(assistant, str) and user.strip() and assistant.strip():
            turns.append((user, assistant))
    return turns, dropped


def _below_minimum(row: dict[str, Any], index: int, minimum: dict[str, int]) -> bool:
    for column, limit in minimum.items():
        ratings = row.get(column)
        if ratings is not None and index < len(ratings) and ratings[index] is not None and ratings[index] < limit:
            return True
    return False


def open_image(image: Any, decode: bool = True) -> Image.Image:
    """A PIL image from what a row holds: a PIL image, or {bytes, path} (`decode=False`: only its
    header is read, enough for `.size`). A missing file raises FileNotFoundError."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        if isinstance(source, str) and "://" in source:   # s3://, gs://, https://: through fsspec
            import fsspec
            with fsspec.open(source, "rb") as f:
                source = io.BytesIO(f.read())
        opened = Image.open(source)
        if decode:
            opened.load()
        return opened
    raise ValueError(f"not an image: {type(image).__name__}")
