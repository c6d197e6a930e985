"""What makes a checkpoint directory self-contained. Every `save_pretrained` (training checkpoints
too) writes these next to `config.json` and `model.safetensors`, so that `nanovlm generate
--checkpoint DIR` needs nothing else, on another machine:

    tokenizer.json, tokenizer_config.json, chat_template.jinja
                          the tokenizer the model was trained with: its base vocabulary, the
                          VLM's extra tokens at the ids the model expects, the chat template
    image_processor.json  the image pipeline's settings (docs/data.md) in nanoVLM's argument
                          names, for readers outside nanovlm; written from config.json, which
                          stays what nanovlm itself reads
    README.md             the model card (`model_card.py`)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from nanovlm.config import ConfigError, TrainConfig, VLMConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
IMAGE_PROCESSOR_FILE = "image_processor.json"
MODEL_CARD_FILE = "README.md"


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(checkpoint: str | Path, configured: str, override: Optional[str] = None) -> str:
    """Where a checkpoint's tokenizer is: `override`; else the checkpoint's own files; else its
    training config's `tokenizer_path` (training checkpoints written before they carried a
    tokenizer); else `configured` (`VLMConfig.lm_tokenizer`)."""
    if override:
        return override
    directory = Path(checkpoint)
    if directory.is_dir():
        if has_tokenizer(directory):
            return str(directory)
        train_config = directory / "train_config.json"
        if train_config.is_file():
            path = json.loads(train_config.read_text()).get("tokenizer_path")
            if path:
                return path
    return configured


def checkpoint_tokenizer(checkpoint: str | Path, cfg: VLMConfig, override: Optional[str] = None):
    """The tokenizer of the model in `checkpoint` (see `tokenizer_source`), with the VLM's extra
    tokens and chat template; `ConfigError` when its image token is not the model's."""
    from nanovlm.data.processors import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_source(checkpoint, cfg.lm_tokenizer, override), cfg.vlm_extra_tokens,
                              cfg.lm_chat_template)
    if tokenizer.image_token_id != cfg.image_token_id:
        raise ConfigError(f"The tokenizer's image token id is {tokenizer.image_token_id} but the model in {checkpoint} "
                          f"expects {cfg.image_token_id}; pass the tokenizer the model was trained with (--tokenizer).")
    return tokenizer


def image_processor_settings(cfg: VLMConfig) -> dict[str, Any]:
    """The image pipeline of `cfg` (what `image_processor_for(cfg)` builds), as plain data."""
    tokens = cfg.vlm_extra_tokens
    return {
        "processor": "nanovlm.data.processors.ImageProcessor",
        "max_img_size": cfg.max_img_size,
        "splitted_image_size": cfg.vit_img_size,
        "resize_to_max_side_len": cfg.resize_to_max_side_len,
        "resample": "bicubic (PIL), both sides rounded up to multiples of splitted_image_size",
        "with_global_view": "global_image_token" in tokens,
        "global_view": "first, bilinear with antialiasing, when an image has more than one tile",
        "pixels": "(x / 255 - mean) / std, every channel",
        "mean": cfg.vit_img_mean,
        "std": cfg.vit_img_std,
        "mp_image_token_length": cfg.mp_image_token_length,
        "image_token": tokens.get("image_token"),
        "global_image_token": tokens.get("global_image_token"),
        "tile_token": "r{i}c{j} of vlm_extra_tokens" if "r1c1" in tokens else None,
    }


def write_self_contained_files(directory: str | Path, model, *, tokenizer=None, tokenizer_path: Optional[str] = None,
                               train_cfg: Optional[TrainConfig] = None, metrics: Optional[dict[str, Any]] = None,
                               step: Optional[int] = None) -> None:
    """Write the tokenizer, `image_processor.json` and the model card into a directory that
    already holds the model's `config.json` and weights.

    The tokenizer is `tokenizer`, else the one at `tokenizer_path` or `cfg.lm_tokenizer` (a Hub
    tokenizer is downloaded); one that cannot be loaded or does not fit the model is left out,
    with a warning (the checkpoint then needs `--tokenizer`)."""
    from nanovlm.export.model_card import model_card

    directory = Path(directory)
    cfg: VLMConfig = model.cfg
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(tokenizer_path or cfg.lm_tokenizer, cfg)
    if tokenizer is not None and tokenizer.image_token_id != cfg.image_token_id:
        logger.warning("Checkpoint %s is written without a tokenizer: the given one's image token id is %s, the "
                       "model's %s.", directory, tokenizer.image_token_id, cfg.image_token_id)
        tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    (directory / IMAGE_PROCESSOR_FILE).write_text(json.dumps(image_processor_settings(cfg), indent=2) + "\n")
    (directory / MODEL_CARD_FILE).write_text(model_card(cfg, train_cfg=train_cfg, metrics=metrics, step=step))


def _load_tokenizer(source: str, cfg: VLMConfig):
    from nanovlm.data.processors import get_tokenizer

    if not source:
        logger.warning("The model's config names no tokenizer (lm_tokenizer is empty); the checkpoint is written "
                       "without one.")
        return None
    try:
        return get_tokenizer(source, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    except (OSError, ValueError) as exc:
        logger.warning("The checkpoint is written without its tokenizer (%s): %s", source,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def model_directory(checkpoint: str | Path) -> str:
    """A training run's output directory stands for its latest checkpoint; anything else (a model
    directory, a Hub repo id) is returned as given."""
    from nanovlm.training.checkpointing import latest_checkpoint

    checkpoint = str(checkpoint)
    latest = latest_checkpoint(checkpoint) if Path(checkpoint).is_dir() else None
    return str(latest) if latest is not None and not (Path(checkpoint) / "config.json").is_file() else checkpoint


def training_details(checkpoint: str | Path) -> tuple[Optional[TrainConfig], Optional[dict[str, Any]], Optional[int]]:
    """(TrainConfig, metrics, step) of a training checkpoint (`train_config.json`, `train_state.pt`);
    None for what a directory does not hold."""
    from nanovlm.training.checkpointing import TRAIN_CONFIG_FILE, TRAIN_STATE_FILE, load_train_state

    directory = Path(checkpoint)
    train_cfg = metrics = step = None
    if (directory / TRAIN_CONFIG_FILE).is_file():
        try:
            train_cfg = TrainConfig.from_json(directory / TRAIN_CONFIG_FILE, strict=False)
        except ConfigError as exc:   # written by another version: the card then omits the data
            logger.warning("%s: %s", directory / TRAIN_CONFIG_FILE, exc)
    if (directory / TRAIN_STATE_FILE).is_file():
        state = load_train_state(directory)
        step, metrics = int(state["step"]), dict(state.get("extra", {}).get("metrics") or {})
    return train_cfg, metrics, step


def copy_model_files(checkpoint: str | Path, output: str | Path, tokenizer: Optional[str] = None) -> Path:
    """A self-contained copy of the model in `checkpoint` (ours, or nanoVLM's) in `output`: config,
    weights, tokenizer, `image_processor.json`, model card; not the training state (optimizer,
    RNG, data position) nor the MLflow run record. What `nanovlm export --format nanovlm` writes
    and `nanovlm push` uploads."""
    import shutil

    from nanovlm.export.model_card import model_card
    from nanovlm.models.vision_language_model import CONFIG_NAME, WEIGHTS_NAME

    source, output = Path(checkpoint), Path(output)
    if not (source / CONFIG_NAME).is_file() or not (source / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{source} is not a model directory (it needs {CONFIG_NAME} and {WEIGHTS_NAME}).")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists and is not an empty directory; choose a new one.")
    cfg = VLMConfig.from_json(source / CONFIG_NAME, strict=False)
    output.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(source / name, output / name)
    checkpoint_tokenizer(source, cfg, tokenizer).save_pretrained(str(output))
    (output / IMAGE_PROCESSOR_FILE).write_text(json.dumps(image_processor_settings(cfg), indent=2) + "\n")
    if (source / MODEL_CARD_FILE).is_file():
        shutil.copy2(source / MODEL_CARD_FILE, output / MODEL_CARD_FILE)
    else:
        train_cfg, metrics, step = training_details(source)
        (output / MODEL_CARD_FILE).write_text(model_card(cfg, train_cfg=train_cfg, metrics=metrics, step=step))
    return output
