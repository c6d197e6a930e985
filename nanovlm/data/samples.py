"""One row -> one training sample: the checks a row must pass, its size, its item.

Map-style data (`VQADataset`, which checks every row before training) and streamed data
(`data.streaming`, which checks rows as it reads them) share a `SampleBuilder`, so a row is skipped
for the same reasons either way, counted under the same names (the keys of `SKIP_FIXES`).

Item keys: `input_ids` [L], `labels` [L] (already shifted: labels[t] is the target of position t,
i.e. input_ids[t+1] where it is an answer token or its end token, else -100), `attention_mask`
[L], `images` [n, 3, H, W] (the tiles of every image of the row, in order), `grids` (each image's
(rows, cols)), `prompt_ids` [P] (input_ids before the last answer, for generation),
`question_type`, `answer` (the last assistant turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from nanovlm.data.formats import open_image, row_turns
from nanovlm.data.processors import Grid, image_processor_for, process_images
from nanovlm.data.prompts import IGNORE_INDEX, ConversationEncoder

DEFAULT_QUESTION_TYPE = "default"
# Why a row is skipped -> what to do about it (the keys are the names the counts go by).
SKIP_FIXES = {
    "no_usable_turns": "each row needs texts=[{'user': ..., 'assistant': ...}] (or question/answer columns)",
    "low_rating": "lower the rating filters (relevance_min_rating, image_correspondence_min_rating, "
                  "visual_dependency_min_rating, formatting_min_rating)",
    "missing_image": "check the image paths (a relative path is read from the data file's directory)",
    "unreadable_image": "check the image files or bytes the rows hold",
    "too_long": "raise lm_max_length (or max_sample_length when packing) or shorten the texts",
    "too_many_images": "raise max_images_per_example (or max_images_per_knapsack when packing) or split the rows",
}
# What a check reads of a row's images: "size" only where the size matters (split images),
# "header" always (finds missing and garbled files without decoding), "decode" every pixel.
IMAGE_CHECKS = ("size", "header", "decode")
# Errors that mean an image cannot be read (PIL raises many types for broken files).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Inspection:
    """A row's verdict: `reason` it is skipped for (None: usable) and `detail` of what was wrong,
    or its size: `tokens` (len(input_ids) of its item) and `images` (not their tiles)."""
    reason: str | None = None
    detail: str = ""
    tokens: int = 0
    images: int = 0


class SampleBuilder:
    """Checks, sizes and items of normalised rows (`formats.normalize_row`) for one model config.

    max_length: tokens a sample may have (default `lm_max_length`); max_images: images a row may
    have (None: any); min_ratings: {rating column: minimum} (`formats.min_ratings`)."""

    def __init__(self, tokenizer, image_processor, cfg, max_length: int | None = None,
                 max_images: int | None = None, min_ratings: dict[str, int] | None = None):
        self.image_processor = image_processor or image_processor_for(cfg)
        self.encoder = ConversationEncoder(tokenizer, cfg.mp_image_token_length)
        self.max_length = max_length or cfg.lm_max_length
        self.max_images = max_images
        self.min_ratings = dict(min_ratings or {})

    def inspect(self, row: dict[str, Any], check: str = "size",
                image_size: tuple[int, int] | None = None) -> Inspection:
        """Whether `row` makes a usable sample, and its size, without decoding a pixel unless
        `check="decode"`. `image_size`: the size of images given as None (rows whose images are
        drawn later, e.g. `ShapesRows.text_row`)."""
        turns, dropped = row_turns(row, self.min_ratings)
        if not turns and dropped:
            return Inspection("low_rating", f"all {dropped} turns rated below the minimum {self.min_ratings}")
        if not turns:
            return Inspection("no_usable_turns", f"no turn with a non-empty 'user' and 'assistant' (columns "
                                                 f"{sorted(row)}, texts={str(row.get('texts'))[:80]})")
        images = row.get("images") or []
        if self.max_images is not None and len(images) > self.max_images:
            return Inspection("too_many_images", f"{len(images)} images, over max_images_per_example={self.max_images}")
        if image_size is None and any(image is None for image in images):
            return Inspection("missing_image", "an image is missing (None)")
        try:
            grids = self.grids(images, check, image_size)
        except FileNotFoundError as exc:
            return Inspection("missing_image", f"{type(exc).__name__}: {exc}")
        except UNREADABLE as exc:
            return Inspection("unreadable_image", f"{type(exc).__name__}: {exc}")
        length = len(self.encoder.encode(tuple(turns), grids).input_ids)
        if length > self.max_length:
            return Inspection("too_long", f"{length} tokens, over lm_max_length={self.max_length}")
        return Inspection(tokens=length, images=len(grids))

    def grids(self, images: list[Any], check: str = "size",
              image_size: tuple[int, int] | None = None) -> tuple[Grid, ...]:
        """Each image's tile grid, from its size alone (pixels decoded only for `check="decode"`)."""
        if check not in IMAGE_CHECKS:
            raise ValueError(f"check={check!r} must be one of {IMAGE_CHECKS}.")
        if check == "size" and not self.image_processor.splits:
            return ((1, 1),) * len(images)
        sizes = [image_size if image is None else self._size(image, check == "decode") for image in images]
        if not self.image_processor.splits:
            return ((1, 1),) * len(images)
        return tuple(self.image_processor.grid(*size) for size in sizes)

    @staticmethod
    def _size(image: Any, decode: bool) -> tuple[int, int]:
        if isinstance(image, Image.Image):
            return image.size
        if decode:
            return open_image(image).size
        with open_image(image, decode=False) as opened:
            return opened.size

    def item(self, row: dict[str, Any]) -> dict[str, Any]:
        """The training item of a usable row (its images decoded and processed now)."""
        turns, _ = row_turns(row, self.min_ratings)
        images, grids = process_images(self.image_processor, [open_image(image) for image in row.get("images") or []])
        encoded = self.encoder.encode(tuple(turns), tuple(grids))
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


def why_skipped(skipped, skip_details: dict[str, str]) -> str:
    """The counts by reason, and the most common reason's first row and fix, in one line."""
    if not skipped:
        return "no row was skipped"
    reason, _ = skipped.most_common(1)[0]
    counts = ", ".join(f"{n} {r}" for r, n in skipped.most_common())
    fix = SKIP_FIXES.get(reason, "see the log above")
    return f"skipped {counts}; most common: {reason} (first at {skip_details.get(reason, '?')}); {fix}"
