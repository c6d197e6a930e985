"""Rows -> training samples: load rows (shapes, local dirs, the Hub), build `VQADataset`s.

Rows follow the nanoVLM schema: `images` (list of PIL images) and `texts` (list of
{"user", "assistant"} turns); `image` / `question` + `answer` columns are accepted too.
A row with no usable turn, an unreadable image, more than `max_images_per_example` images, or
a prompt longer than `lm_max_length` is skipped and counted (`VQADataset.skipped`), never fatal.
Images go through the model's image pipeline (`image_processor_for`, docs/data.md).

`build_datasets(vlm_cfg, train_cfg, tokenizer, rank, world_size)` is what the training loop
(and each Ray Train worker) calls: train and validation `VQADataset`s, sharded per rank.
"""

from __future__ import annotations

import io
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from nanovlm.data.local_files import DatasetError, load_failure, parquet_splits, resolve_image_paths
from nanovlm.data.processors import Grid, image_processor_for, process_images
from nanovlm.data.prompts import IGNORE_INDEX, ConversationEncoder
from nanovlm.data.shapes import ShapesRows
from nanovlm.data.tokenizer_training import train_tokenizer_on_rows

logger = logging.getLogger(__name__)

DEFAULT_QUESTION_TYPE = "default"
# What to do about each reason a row is skipped for (VQADataset.skipped's keys).
SKIP_FIXES = {
    "no_usable_turns": "each row needs texts=[{'user': ..., 'assistant': ...}] (or question/answer columns)",
    "unreadable_image": "check the image files or bytes the rows hold",
    "too_long": "raise lm_max_length or shorten the texts",
    "too_many_images": "raise max_images_per_example or split the rows",
}


# ==================================================================== answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed: for exact match."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


# ==================================================================== row normalisation

def row_turns(row: dict[str, Any]) -> list[tuple[str, str]]:
    """The usable (user, assistant) turns of a row: both sides non-empty strings."""
    texts = row.get("texts")
    if texts is None and "question" in row and "answer" in row:
        texts = [{"user": row["question"], "assistant": row["answer"]}]
    if texts is None and "user" in row and "assistant" in row:
        texts = [{"user": row["user"], "assistant": row["assistant"]}]
    if isinstance(texts, dict):
        texts = [texts]
    turns = []
    for turn in texts or []:
        if not isinstance(turn, dict):
            continue
        user, assistant = turn.get("user"), turn.get("assistant")
        if isinstance(user, str) and isinstance(assistant, str) and user.strip() and assistant.strip():
            turns.append((user, assistant))
    return turns


def row_images(row: dict[str, Any]) -> list[Any]:
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def open_image(image: Any, decode: bool = True) -> Image.Image:
    """A PIL image from what a row holds: a PIL image, or datasets' undecoded {bytes, path}
    (`decode=False`: only its header is read, enough for `.size`)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        opened = Image.open(source)
        if decode:
            opened.load()
        return opened
    raise ValueError(f"not an image: {type(image).__name__}")


def _text_rows(rows: Sequence[dict]) -> Iterator[dict[str, Any]]:
    """Rows with images left undecoded (cheap to scan)."""
    if hasattr(rows, "text_row"):  # ShapesRows: skip drawing
        yield from (rows.text_row(i) for i in range(len(rows)))
        return
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(rows, datasets.Dataset):
        undecoded = rows
        for name, feature in rows.features.items():
            if _has_image_feature(feature):
                undecoded = undecoded.cast_column(name, _undecoded_feature(feature))
        for batch in undecoded.iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield dict(zip(columns, values))
        return
    yield from rows


def _has_image_feature(feature: Any) -> bool:
    from datasets import Image as ImageFeature
    return isinstance(feature, ImageFeature) or isinstance(getattr(feature, "feature", None), ImageFeature)


def _undecoded_feature(feature: Any) -> Any:
    from datasets import Image as ImageFeature, List
    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    return List(ImageFeature(decode=False))


# ==================================================================== samples

class VQADataset(torch.utils.data.Dataset):
    """Samples for the VLM: ids with the image string, shifted labels, processed images.

    Item keys: `input_ids` [L], `labels` [L] (already shifted: labels[t] is the target of
    position t, i.e. input_ids[t+1] where it is an answer token or its end token, else -100),
    `attention_mask` [L], `images` [n, 3, H, W] (the tiles of every image of the row, in order),
    `grids` (each image's (rows, cols)), `prompt_ids` [P] (input_ids before the last answer, for
    generation), `question_type`, `answer` (the last assistant turn).

    `image_processor` defaults to the model's (`image_processor_for(cfg)`).
    """

    def __init__(self, rows: Sequence[dict], tokenizer, image_processor, cfg, max_length: int | None = None,
                 verify_images: bool = False, name: str = "dataset", max_images: int | None = None):
        self.rows = rows
        self.tokenizer = tokenizer
        self.image_processor = image_processor or image_processor_for(cfg)
        self.max_length = max_length or cfg.lm_max_length
        self.max_images = max_images
        self.name = name
        self.encoder = ConversationEncoder(tokenizer, cfg.mp_image_token_length)
        self.skipped: Counter[str] = Counter()  # reason -> rows skipped while scanning
        self.skip_details: dict[str, str] = {}  # reason -> what was wrong with the first row skipped for it
        self.skipped_at_load = 0                # unreadable images met in __getitem__ (this process)
        self.indices = self._scan(verify_images)

    def _scan(self, verify_images: bool) -> list[int]:
        kept = []
        total = 0
        for i, row in enumerate(_text_rows(self.rows)):
            total += 1
            turns = row_turns(row)
            if not turns:
                self._skip("no_usable_turns", i, f"no turn with a non-empty 'user' and 'assistant' (columns "
                                                 f"{sorted(row)}, texts={str(row.get('texts'))[:80]})")
                continue
            images = row_images(row)
            if self.max_images is not None and len(images) > self.max_images:
                self._skip("too_many_images", i, f"{len(images)} images, over max_images_per_example={self.max_images}")
                continue
            if any(image is None for image in images) and not hasattr(self.rows, "text_row"):
                self._skip("unreadable_image", i, "an image is missing (None)")
                continue
            if verify_images:
                try:
                    for image in images:
                        open_image(image)
                except Exception as exc:  # PIL raises many types for broken files
                    self._skip("unreadable_image", i, f"{type(exc).__name__}: {exc}")
                    continue
            try:
                grids = self._grids(images)
            except Exception as exc:  # PIL raises many types for broken headers
                self._skip("unreadable_image", i, f"{type(exc).__name__}: {exc}")
                continue
            length = len(self.encoder.encode(tuple(turns), grids).input_ids)
            if length > self.max_length:
                self._skip("too_long", i, f"{length} tokens, over lm_max_length={self.max_length}")
                continue
            kept.append(i)
        if self.skipped:
            logger.warning("%s: kept %d of %d rows; skipped %s; first of each: %s.", self.name, len(kept), total,
                           dict(self.skipped), self.skip_details)
        else:
            logger.info("%s: %d rows.", self.name, len(kept))
        return kept

    def _grids(self, images: list[Any]) -> tuple[Grid, ...]:
        """Each image's tile grid, from its size alone (no pixel is decoded)."""
        if not self.image_processor.splits:
            return ((1, 1),) * len(images)
        return tuple(self.image_processor.grid(*self._size(image)) for image in images)

    def _size(self, image: Any) -> tuple[int, int]:
        if image is None:  # ShapesRows.text_row: its images are img_size squares
            return (self.rows.img_size, self.rows.img_size)
        if isinstance(image, Image.Image):
            return image.size
        with open_image(image, decode=False) as opened:
            return opened.size

    def _skip(self, reason: str, row: int, detail: str) -> None:
        self.skipped[reason] += 1
        self.skip_details.setdefault(reason, f"row {row}: {detail}")
        logger.debug("%s row %d skipped (%s): %s", self.name, row, reason, detail)

    def why_skipped(self) -> str:
        """The counts by reason, and the most common reason's first row and fix, in one line."""
        if not self.skipped:
            return "no row was skipped"
        reason, _ = self.skipped.most_common(1)[0]
        counts = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        fix = SKIP_FIXES.get(reason, "see the log above")
        return f"skipped {counts}; most common: {reason} (first at {self.skip_details[reason]}); {fix}"

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
                return self._item(self.rows[index])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                self.skipped_at_load += 1
                logger.warning("%s row %d: unreadable image (%s); using the next row.", self.name, index, exc)
        raise DatasetError(f"{self.name}: no row has a readable image; {SKIP_FIXES['unreadable_image']}.")

    def _item(self, row: dict[str, Any]) -> dict[str, Any]:
        images, grids = process_images(self.image_processor, [open_image(image) for image in row_images(row)])
        encoded = self.encoder.encode(tuple(row_turns(row)), tuple(grids))
        input_ids = torch.tensor(encoded.input_ids, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:-1] = torch.tensor(encoded.labels[1:], dtype=torch.long)  # position t predicts t+1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": torch.ones_like(input_ids),
            "images": images,                                                # [n_tiles, 3, H, W]
            "grids": grids,
            "prompt_ids": torch.tensor(encoded.prompt_ids, dtype=torch.long),
            "question_type": row.get("question_type") or DEFAULT_QUESTION_TYPE,
            "answer": encoded.answer,
        }

    def sample_sizes(self) -> list[tuple[int, int]]:
        """(tokens, images) of every sample, in index order, from the text and the images' sizes
        without decoding a pixel: what packing plans rows with (data/packing.py). Must count what
        `_item` makes: len(input_ids), and its images (not their tiles, as nanoVLM counts them)."""
        wanted = set(self.indices)
        sizes = {}
        for i, row in enumerate(_text_rows(self.rows)):
            if i in wanted:
                grids = self._grids(row_images(row))
                sizes[i] = (len(self.encoder.encode(tuple(row_turns(row)), grids).input_ids), len(grids))
        return [sizes[i] for i in self.indices]


# ==================================================================== row loading

def load_rows(train_cfg, img_size: int = 64) -> tuple[Sequence[dict], Sequence[dict] | None, bool]:
    """(train rows, validation rows or None, local) for TrainConfig.train_dataset_path."""
    path = train_cfg.train_dataset_path
    if path == "shapes":
        common = dict(seed=train_cfg.shapes_seed, max_objects=train_cfg.shapes_max_objects,
                      question_types=train_cfg.shapes_question_types, img_size=img_size)
        train_size = train_cfg.shapes_train_size
        if train_cfg.data_cutoff_idx is not None:
            train_size = min(train_size, train_cfg.data_cutoff_idx)
        return (ShapesRows("train", train_size, **common),
                ShapesRows("validation", train_cfg.shapes_eval_size, **common), False)
    local = Path(path).expanduser().exists()
    data = _load_local(Path(path).expanduser()) if local else _load_hub(path, train_cfg.train_dataset_name)
    train, val = _pick_splits(data, train_cfg.val_ratio, train_cfg.seed, path)
    if train_cfg.data_cutoff_idx is not None:
        train = train.select(range(min(len(train), train_cfg.data_cutoff_idx)))
    return train, val, local


def _load_local(path: Path):
    import datasets
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        parquet = [path] if path.suffix == ".parquet" and path.is_file() else sorted(path.rglob("*.parquet"))
        if parquet:
            return resolve_image_paths(datasets.load_dataset("parquet", data_files=parquet_splits(path, parquet)),
                                        parquet)
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path))
    except DatasetError:
        raise
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as exc:
        raise DatasetError(load_failure(path, exc)) from exc
    raise DatasetError(f"train_dataset_path={str(path)!r}: expected a save_to_disk directory, parquet "
                       "file(s) or an imagefolder directory with metadata.jsonl.")


def _load_hub(path: str, names: str):
    """the_cauldron-style: one config per comma-separated name, train splits concatenated."""
    import datasets
    subsets = [n.strip() for n in names.split(",") if n.strip()]
    parts = {}
    try:
        if subsets in ([], ["all"]):
            subsets = datasets.get_dataset_config_names(path)
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

    `train` is already this rank's shard, so a sampler over it must not shard again:
    `sampler_rank` / `sampler_world_size` are 0 / 1. `val` is the whole validation set (or None);
    evaluation strides over it by rank and sums the counts."""
    train: VQADataset
    val: VQADataset | None
    sampler_rank: int = 0
    sampler_world_size: int = 1

    def __iter__(self) -> Iterator[VQADataset | None]:
        return iter((self.train, self.val))


def build_datasets(vlm_cfg, train_cfg, tokenizer, rank: int = 0, world_size: int = 1,
                   image_processor=None, shard_val: bool = False) -> DataSplits:
    """Train (this rank's disjoint, equal-length shard) and validation `VQADataset`s."""
    if tokenizer.image_token_id != vlm_cfg.image_token_id:
        raise ValueError(f"The tokenizer gives {tokenizer.image_token!r} id {tokenizer.image_token_id} but "
                         f"VLMConfig.image_token_id is {vlm_cfg.image_token_id} (lm_base_vocab_size="
                         f"{vlm_cfg.lm_base_vocab_size}); set lm_base_vocab_size to the tokenizer's base "
                         "vocabulary or vlm_image_token_id to the tokenizer's id.")
    image_processor = image_processor or image_processor_for(vlm_cfg)
    train_rows, val_rows, local = load_rows(train_cfg, vlm_cfg.vit_img_size)
    common = dict(tokenizer=tokenizer, image_processor=image_processor, cfg=vlm_cfg, verify_images=local,
                  max_images=train_cfg.max_images_per_example)
    train = VQADataset(train_rows, name="train", **common)
    if len(train) < world_size:
        raise DatasetError(f"train_dataset_path={train_cfg.train_dataset_path!r} has {len(train)} usable "
                           f"training rows for {world_size} worker(s): {train.why_skipped()}.")
    train.shard(rank, world_size)
    val = None
    if val_rows is not None:
        val = VQADataset(val_rows, name="validation", **common)
        if shard_val:
            val.shard(rank, world_size)
    return DataSplits(train, val)


def train_tokenizer_for_dataset(train_cfg, vocab_size: int, out_dir: str | Path, img_size: int = 64,
                                **kwargs):
    """Train a byte-level BPE on the text of the training rows that `train_cfg.train_dataset_path`
    names (shapes, a local dir, a Hub id), without decoding any image. Point
    `TrainConfig.tokenizer_path` at `out_dir` and set `lm_base_vocab_size=vocab_size` to use it."""
    train_rows, _, _ = load_rows(train_cfg, img_size)
    return train_tokenizer_on_rows(_text_rows(train_rows), vocab_size, out_dir, **kwargs)
