"""Tokenizer and image processor of a VLM.

`get_tokenizer(name_or_path, extra_special_tokens, chat_template)` loads an HF tokenizer (a Hub
name, a local directory, or `shapes-bpe-<N>`: a byte-level BPE trained offline on the `shapes`
text and cached on disk), adds the VLM's special tokens after the base vocabulary and exposes
one attribute per token, nanoVLM-style: `{"image_token": "<|image|>"}` gives
`tokenizer.image_token` and `tokenizer.image_token_id == len(base vocabulary)`.

The image pipeline (docs/data.md), nanoVLM's: `image_processor_for(cfg)` maps a PIL image to
its tiles [n, 3, vit_img_size, vit_img_size] and grid (rows, cols); `get_image_string(tokenizer,
grids, mp_image_token_length)` is the text that stands for them in the prompt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nanovlm.config import CHATML_TEMPLATE
from nanovlm.data.shapes import DATA_VERSION, shapes_text_rows
from nanovlm.data.tokenizer_training import train_tokenizer_on_rows

logger = logging.getLogger(__name__)

SHAPES_BPE_PATTERN = re.compile(r"^shapes-bpe-(\d+)$")
_MARKER = "nanovlm_tokenizer.json"  # what built a cached tokenizer directory (to detect stale ones)
_TOKENIZERS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    """Root of nanovlm's on-disk caches: $NANOVLM_CACHE, else ~/.cache/nanovlm."""
    return Path(os.environ.get("NANOVLM_CACHE") or "~/.cache/nanovlm").expanduser()


def get_tokenizer(name_or_path: str, extra_special_tokens: dict[str, str] | None = None,
                  chat_template: str | None = None):
    """An HF tokenizer with the VLM's special tokens, chat template and a pad token; one
    instance per argument set (shared: do not mutate it)."""
    extra = dict(extra_special_tokens or {})
    source = _resolve(name_or_path)
    key = (source, tuple(extra.items()), chat_template)
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = _load_tokenizer(source, extra, chat_template)
        return _TOKENIZERS[key]


def _load_tokenizer(source: str, extra: dict[str, str], chat_template: str | None):
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    try:
        base = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise OSError(f"Cannot load tokenizer {source!r} (VLMConfig.lm_tokenizer / TrainConfig.tokenizer_path): "
                      f"{exc}. Use a Hub name (needs network), a local tokenizer directory, or "
                      "'shapes-bpe-512' (trained offline).") from exc
    base_size = len(base)
    vocab = base.get_vocab()
    if extra and all(token in vocab for token in extra.values()):   # a VLM tokenizer saved with its tokens
        base_size -= len(extra)
    # `extra_special_tokens` as a dict names each token: tokenizer.<name> / tokenizer.<name>_id.
    tokenizer = AutoTokenizer.from_pretrained(source, extra_special_tokens=extra, **kwargs) if extra else base
    for position, (name, token) in enumerate(extra.items()):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if getattr(tokenizer, f"{name}_id", None) != token_id:
            raise RuntimeError(f"tokenizer.{name}_id is not the id of {token!r}; this transformers "
                               "version handles extra_special_tokens differently.")
        if token_id != base_size + position:
            logger.warning("Special token %r of tokenizer %s has id %d, not base vocab %d + %d: it was "
                           "already in the vocabulary; set VLMConfig.vlm_image_token_id to match.",
                           token, source, token_id, base_size, position)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("Loaded tokenizer %s: %d base tokens + %d VLM tokens.", source, base_size, len(tokenizer) - base_size)
    return tokenizer


def _resolve(name_or_path: str) -> str:
    """A local directory or Hub name to pass to AutoTokenizer; builds `shapes-bpe-<N>` if needed."""
    match = SHAPES_BPE_PATTERN.match(name_or_path)
    if match and not Path(name_or_path).exists():
        return str(ensure_shapes_tokenizer(int(match.group(1))))
    return name_or_path


def ensure_shapes_tokenizer(vocab_size: int = 512, root: Path | None = None) -> Path:
    """The directory of the `shapes-bpe-<vocab_size>` tokenizer, trained (deterministically,
    <1 s) on first use. Written to a temporary directory and renamed into place, so concurrent
    builders (several Ray workers) never see a half-written directory."""
    name = f"shapes-bpe-{vocab_size}"
    directory = (root or cache_root()) / "tokenizers" / name
    marker = {"name": name, "shapes_data_version": DATA_VERSION, "format": 1}
    if _read_marker(directory) == marker:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("Training the %s tokenizer into %s.", name, directory)
    train_tokenizer_on_rows(shapes_text_rows(), vocab_size, tmp, chat_template=CHATML_TEMPLATE)
    (tmp / _MARKER).write_text(json.dumps(marker))
    if directory.exists() and _read_marker(directory) != marker:  # stale: built from older shapes text
        stale = directory.parent / f".stale-{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # another process moved it first
    try:
        os.rename(tmp, directory)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_marker(directory) != marker:
            raise
    return directory


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


# ==================================================================== the image pipeline
# nanoVLM's (data/processors.py, data/custom_transforms.py), re-derived: resize both sides to
# multiples of the tile (vit_img_size), cut into tiles row-major, put a global view first when
# there is more than one tile, and describe each image in the prompt with get_image_string.

Grid = tuple[int, int]   # (rows, cols) of tiles


def resized_size(height: int, width: int, tile: int, max_img_size: int,
                 resize_to_max_side_len: bool = False) -> tuple[int, int]:
    """(height, width) an image is resized to before tiling: both multiples of `tile`.

    The long side becomes `max_img_size` when `resize_to_max_side_len` (up-scaling small
    images), else the smallest multiple of `tile` at or above it, capped at `max_img_size`;
    the short side keeps the aspect ratio, rounded up to a multiple of `tile` (at least one)."""
    long, short = (width, height) if width >= height else (height, width)
    target_long = max_img_size if resize_to_max_side_len else min(max_img_size, math.ceil(long / tile) * tile)
    scale = target_long / long   # in this order: the float rounding decides exact multiples as nanoVLM's does
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if width >= height else (target_long, target_short)


def split_into_tiles(pixels: torch.Tensor, tile: int) -> tuple[torch.Tensor, Grid]:
    """[3, rows * tile, cols * tile] -> tiles [rows * cols, 3, tile, tile] (row-major), (rows, cols)."""
    channels, height, width = pixels.shape
    if height % tile or width % tile:
        raise ValueError(f"An image of {height}x{width} px cannot be cut into {tile} px tiles.")
    rows, cols = height // tile, width // tile
    tiles = pixels.view(channels, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)   # [rows, cols, 3, t, t]
    return tiles.reshape(rows * cols, channels, tile, tile), (rows, cols)


def global_view(pixels: torch.Tensor, tile: int) -> torch.Tensor:
    """The whole image [3, H, W] as one tile [1, 3, tile, tile]: bilinear with antialiasing
    (what torchvision's tensor resize does, and so nanoVLM)."""
    return F.interpolate(pixels[None], size=(tile, tile), mode="bilinear", align_corners=False, antialias=True)


def tiles_with_global_view(pixels: torch.Tensor, tile: int, with_global_view: bool = True
                           ) -> tuple[torch.Tensor, Grid]:
    """Tiles of a resized image [3, H, W], the global view first when there is more than one
    tile (and `with_global_view`): ([n, 3, tile, tile], (rows, cols)), n = rows * cols (+ 1)."""
    tiles, grid = split_into_tiles(pixels, tile)
    if grid == (1, 1) or not with_global_view:
        return tiles, grid
    return torch.cat([global_view(pixels, tile), tiles]), grid


class ImageProcessor:
    """PIL image -> (tiles [n, 3, tile, tile] float32, (rows, cols)): RGB, bicubic resize to
    `resized_size`, x / 255, tiles with the global view first, then (x - mean) / std.

    With `max_img_size == tile` every image becomes one tile (squashed to a square), no global view."""

    def __init__(self, max_img_size: int, tile_size: int, resize_to_max_side_len: bool = False,
                 with_global_view: bool = True, mean: float = 0.0, std: float = 1.0):
        if tile_size <= 0 or max_img_size < tile_size or max_img_size % tile_size:
            raise ValueError(f"max_img_size={max_img_size} must be a positive multiple of the tile size "
                             f"(vit_img_size={tile_size}).")
        if std <= 0:
            raise ValueError(f"std={std} must be positive.")
        self.max_img_size, self.tile_size = max_img_size, tile_size
        self.resize_to_max_side_len = resize_to_max_side_len
        self.with_global_view = with_global_view
        self.mean, self.std = mean, std

    @property
    def splits(self) -> bool:
        return self.max_img_size > self.tile_size

    def grid(self, width: int, height: int) -> Grid:
        """(rows, cols) of tiles for an image of `width` x `height` px (PIL's order), without loading it."""
        if not self.splits:
            return (1, 1)
        new_h, new_w = resized_size(height, width, self.tile_size, self.max_img_size, self.resize_to_max_side_len)
        return (new_h // self.tile_size, new_w // self.tile_size)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, Grid]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        new_h, new_w = resized_size(height, width, self.tile_size, self.max_img_size, self.resize_to_max_side_len)
        if (width, height) != (new_w, new_h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())       # [H, W, 3]
        pixels = pixels.permute(2, 0, 1).float().div_(255.0)                        # [3, H, W] in [0, 1]
        tiles, grid = tiles_with_global_view(pixels, self.tile_size, self.with_global_view)
        if (self.mean, self.std) != (0.0, 1.0):
            tiles = (tiles - self.mean) / self.std
        return tiles, grid

    def __repr__(self) -> str:
        return (f"ImageProcessor(max_img_size={self.max_img_size}, tile_size={self.tile_size}, "
                f"resize_to_max_side_len={self.resize_to_max_side_len}, with_global_view={self.with_global_view}, "
                f"mean={self.mean}, std={self.std})")


def get_image_processor(max_img_size: int, splitted_image_size: int, resize_to_max_side_len: bool = False,
                        with_global_view: bool = True, mean: float = 0.0, std: float = 1.0) -> ImageProcessor:
    """nanoVLM's signature; the defaults give nanoVLM's output (pixels in [0, 1])."""
    return ImageProcessor(max_img_size, splitted_image_size, resize_to_max_side_len, with_global_view, mean, std)


def image_processor_for(cfg) -> ImageProcessor:
    """The processor a model (`VLMConfig`) was trained with: what training, generate, evaluation
    and the benchmarks all use. The global view exists only with a `global_image_token`."""
    return ImageProcessor(cfg.max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len,
                          "global_image_token" in cfg.vlm_extra_tokens, cfg.vit_img_mean, cfg.vit_img_std)


def process_images(processor: ImageProcessor, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[Grid]]:
    """Every tile of every image, concatenated in order [N, 3, tile, tile], and each image's grid."""
    processed = [processor(image) for image in images]
    if not processed:
        return torch.empty(0, 3, processor.tile_size, processor.tile_size), []
    return torch.cat([tiles for tiles, _ in processed]), [grid for _, grid in processed]


def get_image_string(tokenizer: Any, splitted_image_counts: Sequence[Grid], mp_image_token_length: int) -> str:
    """The text that stands for a sample's images, nanoVLM's: `<image: i>` before each image
    when there are several; the global view (`global_image_token` + image tokens), alone for a
    1x1 grid; then each tile's `r{i}c{j}` token and image tokens, row-major. `tokenizer` is
    anything with the `vlm_extra_tokens` as attributes (a tokenizer from `get_tokenizer`).
    A tokenizer with neither a global nor an `r1c1` token (nanoVLM before image splitting, the
    `tiny` preset) gets only the image tokens for its one tile."""
    image_tokens = tokenizer.image_token * mp_image_token_length
    global_token = getattr(tokenizer, "global_image_token", None)
    parts = []
    for index, (rows, cols) in enumerate(splitted_image_counts):
        if len(splitted_image_counts) > 1:
            parts.append(f"<image: {index}>")
        if global_token:
            parts.append(global_token + image_tokens)
            if (rows, cols) == (1, 1):
                continue
        elif (rows, cols) == (1, 1) and getattr(tokenizer, "r1c1", None) is None:
            parts.append(image_tokens)
            continue
        for i in range(1, rows + 1):
            for j in range(1, cols + 1):
                parts.append(getattr(tokenizer, f"r{i}c{j}") + image_tokens)
    return "".join(parts)
