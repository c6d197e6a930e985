"""How a wrapper (Ray Train, a test) plugs into the framework-free training loop.

The loop calls these at fixed points; the default implementation is a single process that
does nothing extra. Ray Train's worker subclasses it to wrap the model in DDP, shard the data
and report metrics and checkpoints; the loop never imports Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class TrainHooks:
    # Position of this process among the data-parallel workers.
    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device | None:
        """The device to train on; None lets the loop choose from TrainConfig.device."""
        return None

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the model for data-parallel training (e.g. DDP); identity by default."""
        return model

    def resume_dir(self) -> Path | None:
        """A training checkpoint to resume from (e.g. Ray's latest after a worker failure)."""
        return None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After every optimizer step; `metrics` are plain floats (loss, lr, throughput...)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation (val_loss, val_accuracy, val_accuracy_<type>)."""

    def on_checkpoint(self, step: int, checkpoint_dir: Path | None, metrics: dict[str, float]) -> None:
        """After a training checkpoint was written at `step`. Called on every rank (Ray Train
        needs every rank to report); `checkpoint_dir` is the directory rank 0 wrote, None on
        the other ranks."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """Once, with the run's summary (also written to output_dir/summary.json)."""
