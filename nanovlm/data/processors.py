"""Tokenizer and image processor of a VLM.

`get_tokenizer(name_or_path, extra_special_tokens, chat_template)` loads an HF tokenizer (a Hub
name, a local directory, or `shapes-bpe-<N>`: a byte-level BPE trained offline on the `shapes`
text and cached on disk), adds the VLM's special tokens after the base vocabulary and exposes
one attribute per token, nanoVLM-style: `{"image_token": "<|image|>"}` gives
`tokenizer.image_token` and `tokenizer.image_token_id == len(base vocabulary)`.

`get_image_processor(img_size)` maps a PIL image to a normalised float tensor [3, H, W].
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
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


class ImageProcessor:
    """PIL image -> float tensor [3, img_size, img_size]: RGB, bicubic resize, (x/255 - mean) / std.
    SigLIP uses mean = std = 0.5 (pixels in [-1, 1])."""

    def __init__(self, img_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)):
        if img_size <= 0:
            raise ValueError(f"img_size={img_size} must be positive.")
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.img_size, self.img_size):
            image = image.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
        pixels = pixels.permute(2, 0, 1).float().div_(255.0)                  # [3, H, W]
        return (pixels - self.mean) / self.std

    def __repr__(self) -> str:
        return f"ImageProcessor(img_size={self.img_size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def get_image_processor(img_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                        std: Sequence[float] = (0.5, 0.5, 0.5)) -> ImageProcessor:
    return ImageProcessor(img_size, mean, std)
