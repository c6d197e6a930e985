"""Training checkpoints: everything needed to continue a run on the same trajectory.

Layout of `output_dir/checkpoints/step_000500/`:

    config.json, model.safetensors   model.save_pretrained (so `from_pretrained(dir)` loads it), with
    tokenizer files, image_processor.json, README.md   the tokenizer, image settings and model card
    train_state.pt                   step, optimizer, scheduler, RNG states, data position
    train_config.json                the run's TrainConfig

Writes are atomic: everything goes into a hidden temporary directory next to the final one,
which is renamed into place only when complete, so a crash mid-write never leaves a
half-written `step_*` directory that `latest_checkpoint` could pick up.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanovlm.config import ConfigError, TrainConfig, VLMConfig, read_json_file

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def check_output_dir(output_dir: str | Path) -> None:
    """`ConfigError` now, before any training, when `output_dir` or its checkpoints/ directory
    cannot be created and written; otherwise the first checkpoint would fail, after the work."""
    for path in (Path(output_dir), checkpoint_root(output_dir)):
        check_writable_dir(path, f"output_dir={str(output_dir)!r}", "choose another --output (or --set output_dir=DIR)")


def check_writable_dir(path: str | Path, setting: str, fix: str) -> None:
    """`ConfigError` "<setting> cannot be written: <why>; <fix>." unless `path` is a writable
    directory or can be created as one (its nearest existing ancestor is a writable directory)."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable" + ("" if existing == path else f", so {path} cannot be created")
    else:
        return
    raise ConfigError(f"{setting} cannot be written: {problem}; {fix}.")


# ---------------------------------------------------------------------------- RNG

def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and every CUDA device), in a form that
    `torch.load(weights_only=True)` accepts (numpy's key array becomes a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save / load

def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, train_cfg: TrainConfig,
                    data_position: dict[str, int], extra: dict[str, Any] | None = None,
                    keep: int | None = None) -> Path:
    """Write `output_dir/checkpoints/step_XXXXXX` atomically and return its path.

    `model` is the unwrapped VisionLanguageModel (it must have `save_pretrained`).
    `keep`: how many step directories to keep (oldest removed first); None keeps all.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # self-contained (nanovlm/export/checkpoint_files.py): the run's tokenizer, its data and metrics in the card
        model.save_pretrained(tmp, tokenizer_path=train_cfg.tokenizer_path, train_cfg=train_cfg,
                              metrics=(extra or {}).get("metrics"), step=step)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data_position": dict(data_position),
            "extra": dict(extra or {}),
        }
        torch.save(state, tmp / TRAIN_STATE_FILE)
        train_cfg.to_json(tmp / TRAIN_CONFIG_FILE)
        _fsync_dir(tmp)
        if final.exists():  # re-writing the same step (e.g. after a resume): swap it out
            stale = root / f".stale_{final.name}_{uuid.uuid4().hex[:8]}"
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Saved checkpoint %s", final)
    if keep is not None:
        prune_checkpoints(output_dir, keep)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step directories under output_dir/checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAIN_STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        logger.debug("Removed old checkpoint %s", old)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the latest one of a run's output directory."""
    path = Path(path)
    if (path / TRAIN_STATE_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{path} is neither a training checkpoint (no {TRAIN_STATE_FILE}) nor a run directory with "
            f"checkpoints under {checkpoint_root(path)}. Pass output_dir/checkpoints/step_XXXXXX or the run's "
            "output directory.")
    return latest


def check_same_model(vlm_cfg: VLMConfig, saved: dict[str, Any], *, source: str, fix: str) -> None:
    """`ConfigError` naming each model field whose value differs from `saved` (a run's stored
    `VLMConfig.to_dict()`): weights and optimizer state only fit the model they were trained as.

    The message reads `{source} a different model: field=saved_value, .... {fix}`."""
    changed = sorted(k for k, v in vlm_cfg.to_dict().items() if k in saved and saved[k] != v)
    if changed:
        raise ConfigError(f"{source} a different model: {', '.join(f'{k}={saved[k]!r}' for k in changed)}. {fix}")


def check_resumable(vlm_cfg: VLMConfig, checkpoint_dir: str | Path) -> None:
    """Refuse to resume `checkpoint_dir` with a model config other than its own."""
    saved = read_json_file(Path(checkpoint_dir) / "config.json", what="Checkpoint config")
    check_same_model(vlm_cfg, saved, source=f"Checkpoint {checkpoint_dir} holds",
                     fix="Resume with the checkpoint's model settings (drop the --set/--config values that change "
                         "them), or start a new run without --resume.")


def load_train_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The train_state.pt of a step directory (weights are loaded with from_pretrained)."""
    path = Path(checkpoint_dir) / TRAIN_STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {checkpoint_dir} is not a training checkpoint.")
    return torch.load(path, map_location="cpu", weights_only=True)
