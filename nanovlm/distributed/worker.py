"""The function every Ray Train worker runs: rebuild the configs, train with Ray-aware hooks.

`train_worker(config)` receives the one plain-dict form of the settings plus run metadata:

    {"vlm": {...}, "train": {...},                  # configs_to_dict(vlm, train)
     "run": {"preset": "tiny",                      # for MLflow tags
             "tracking": None | {"uri": ..., "experiment_name": ..., "run_id": ...,
                                 "parent_run_id": ..., "run_name": ..., "tags": {...}}}}

`tracking.run_id` set: log into that run (the driver created it and will close it). Unset:
rank 0 creates the run itself (a child of `parent_run_id` when given, e.g. a Tune trial) and
closes it at the end; its id travels in the checkpoint metadata so a restarted worker group
keeps logging into the same run. `tracking: None` turns MLflow off.

Reports: every `report_interval` steps, after every evaluation, and with every checkpoint.
Every rank calls `ray.train.report` at the same steps (Train V2 uses it as a barrier); only
rank 0 attaches the `Checkpoint` (the loop's step directory: model.safetensors, config.json,
train_state.pt with optimizer/scheduler/RNG/data position).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from nanovlm import tracking
from nanovlm.config import TrainConfig, VLMConfig, configs_from_dict
from nanovlm.training.hooks import TrainHooks

logger = logging.getLogger(__name__)

MLFLOW_RUN_ID_KEY = "mlflow_run_id"  # in the Ray checkpoint's metadata
# Fault injection for tests and drills: "RANK:STEP" makes that rank SIGKILL itself after STEP,
# once per output_dir (a marker file there remembers it across the restart).
KILL_ENV = "NANOVLM_KILL_RANK_AT_STEP"


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of `TorchTrainer(train_loop_per_worker=train_worker, train_loop_config=config)`."""
    from nanovlm.training import train

    _quiet_ray_report_log()
    run = dict(config.get("run") or {})
    vlm_cfg, train_cfg = configs_from_dict({"vlm": config["vlm"], "train": config["train"]})
    vlm_cfg.validate()
    train_cfg.validate()
    hooks = RayTrainHooks(vlm_cfg, train_cfg, preset=run.get("preset"), tracking_spec=run.get("tracking"))
    try:
        train(vlm_cfg, train_cfg, hooks=hooks)
    except BaseException:
        hooks.close(status="FAILED")
        raise


def _quiet_ray_report_log() -> None:
    """Ray Train V2 logs every report's full metrics dict at INFO from each worker, which buries
    our own step lines; keep its warnings only."""
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


class RayTrainHooks(TrainHooks):
    """TrainHooks for a Ray Train worker: device, DDP, resume checkpoint, reports, MLflow (rank 0)."""

    def __init__(self, vlm_cfg: VLMConfig, train_cfg: TrainConfig, *, preset: Optional[str] = None,
                 tracking_spec: Optional[dict[str, Any]] = None):
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.vlm_cfg, self.train_cfg = vlm_cfg, train_cfg
        self.preset = preset
        self._spec = tracking_spec
        self._mlflow: Optional[tracking.TrackingRun] = None
        self._owns_mlflow_run = False
        self._pending: dict[str, float] = {}  # this step's metrics, waiting for the report
        self._download_dir: Optional[tempfile.TemporaryDirectory] = None
        self._ray_checkpoint = ray.train.get_checkpoint()
        if self.rank == 0 and tracking_spec is not None:
            self._start_mlflow()

    # ------------------------------------------------------------------ loop contract

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # The loop has already moved the model; DDP (gloo on CPU, nccl on GPU) when world_size > 1.
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def resume_dir(self) -> Optional[Path]:
        """Ray's latest checkpoint: after a worker failure, or when a stopped run is resumed."""
        checkpoint = self._ray_checkpoint
        if checkpoint is None:
            return None
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            path = Path(checkpoint.path)
        else:  # cloud storage: download once per worker
            self._download_dir = tempfile.TemporaryDirectory(prefix="nanovlm-resume-")
            path = Path(checkpoint.to_directory(self._download_dir.name))
        logger.info("Rank %d resumes from Ray checkpoint %s", self.rank, path)
        return path

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._maybe_kill_self(step)
        metrics = dict(metrics)
        if self.world_size > 1:
            # The loop's loss is this rank's; report the mean over ranks, the loss of the global batch.
            metrics["loss"] = _mean_over_ranks(metrics["loss"], self.device())
        self._pending = metrics
        if self._mlflow is not None:
            self._mlflow.log_metrics(metrics, step)
        # An evaluation or a checkpoint follows at this step: report once, there.
        if self._is_eval_step(step) or self._is_checkpoint_step(step):
            return
        if step % self.train_cfg.report_interval == 0:
            self._report(step, self._pending)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics(metrics, step)
        self._pending = {**self._pending, **metrics}
        if not self._is_checkpoint_step(step):
            self._report(step, self._pending)

    def on_checkpoint(self, step: int, checkpoint_dir: Optional[Path], metrics: dict[str, float]) -> None:
        from ray.train import Checkpoint

        checkpoint = None
        if checkpoint_dir is not None:  # rank 0
            checkpoint = Checkpoint.from_directory(str(checkpoint_dir))
            if self._mlflow is not None:
                checkpoint.set_metadata({MLFLOW_RUN_ID_KEY: self._mlflow.run_id, "step": step})
        self._report(step, {**metrics, **self._pending}, checkpoint)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self._mlflow is None:
            return
        output_dir = Path(self.train_cfg.output_dir)
        final = summary.get("checkpoint")
        if final:
            self._mlflow.log_artifacts(final, "checkpoint")
        if (output_dir / "summary.json").exists():
            self._mlflow.log_artifact(output_dir / "summary.json")
        self.close(status="FINISHED")

    # ------------------------------------------------------------------ helpers

    def close(self, status: str) -> None:
        if self._mlflow is not None:
            if self._owns_mlflow_run:
                self._mlflow.end(status)
            else:
                self._mlflow.flush()
            self._mlflow = None
        if self._download_dir is not None:
            self._download_dir.cleanup()
            self._download_dir = None

    def _maybe_kill_self(self, step: int) -> None:
        target = os.environ.get(KILL_ENV)
        if not target:
            return
        rank, at_step = (int(x) for x in target.split(":"))
        marker = Path(self.train_cfg.output_dir) / f".killed-rank{rank}-step{at_step}"
        if rank != self.rank or step != at_step or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        # Let the controller poll the reports already sent, so the latest checkpoint is registered
        # before the worker dies (otherwise the restart could start from an older one).
        poll_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
        time.sleep(max(1.0, 5 * poll_s))
        logger.warning("%s=%s: rank %d kills its own process after step %d.", KILL_ENV, target, rank, step)
        os.kill(os.getpid(), signal.SIGKILL)

    def _is_eval_step(self, step: int) -> bool:
        return step % self.train_cfg.eval_interval == 0 or step == self.train_cfg.max_training_steps

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.train_cfg.checkpoint_interval == 0 or step == self.train_cfg.max_training_steps

    def _report(self, step: int, metrics: dict[str, float], checkpoint=None) -> None:
        import ray.train

        plain = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        plain["step"] = step
        kwargs = {"checkpoint_dir_name": f"step_{step:06d}"} if checkpoint is not None else {}
        ray.train.report(plain, checkpoint=checkpoint, **kwargs)

    def _start_mlflow(self) -> None:
        spec = self._spec or {}
        uri = spec.get("uri") or tracking.default_tracking_uri()
        run_id = spec.get("run_id")
        if run_id is None and self._ray_checkpoint is not None:
            run_id = self._ray_checkpoint.get_metadata().get(MLFLOW_RUN_ID_KEY)
            self._owns_mlflow_run = run_id is not None
        if run_id is None:
            from nanovlm.config import configs_to_dict

            config = configs_to_dict(self.vlm_cfg, self.train_cfg)
            device_type = self.device().type
            tags = tracking.run_tags(config, preset=self.preset, world_size=self.world_size,
                                     device_type=device_type, extra=spec.get("tags"))
            try:
                run_id = tracking.create_run(config, uri=uri, experiment_name=spec.get("experiment_name"),
                                             run_name=spec.get("run_name"), tags=tags,
                                             parent_run_id=spec.get("parent_run_id"))
            except Exception as exc:  # noqa: BLE001 - the driver checked the store; do not kill training now
                logger.warning("Could not create an MLflow run in %s (training continues untracked): %s", uri, exc)
                return
            self._owns_mlflow_run = True
        self._mlflow = tracking.TrackingRun(run_id, uri, flush_every=self.train_cfg.log_interval)


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()
