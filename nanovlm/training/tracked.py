"""Training tracked in MLflow: `MlflowHooks`, the MLflow part of every training run, and
`train_tracked`, the single-process front door behind `nanovlm train`.

A run is tracked the same way on both routes: the process that starts it checks the store,
then creates the MLflow run (or, resuming, reopens the one the checkpoint's run record names);
the loop's hooks log metrics by step, write the run record into each checkpoint, and log the
data counts (`data_*` metrics at the last step), the final checkpoint and summary.json as
artifacts, and the final model as an MLflow model (registered under `TrainConfig.register_model`
if set; nanovlm/export/mlflow_model.py). In one process `MlflowHooks` are the hooks; on Ray
Train, `RayTrainHooks` extends them (rank 0 logs, the driver creates and closes the run).
The loop itself (loop.py) knows nothing of MLflow.

Logging goes through the run's journal in output_dir (`nanovlm.tracking_journal`): a step costs
one appended line, a background thread sends, each step is logged once through restarts. The
run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM); if the store does not take
everything before the deadline, the summary's `tracking_pending` names the journal that holds
the rest, and `nanovlm train` exits 3 and says how to send it (`nanovlm tracking sync`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from nanovlm import tracking
from nanovlm.tracking_journal import JournaledRun
from nanovlm.config import TrainConfig, VLMConfig, configs_to_dict
from nanovlm.training import checkpointing, system_metrics
from nanovlm.training.hooks import TrainHooks
from nanovlm.training.loop import resolve_device, train
from nanovlm.training.system_metrics import SystemMetricsSampler

logger = logging.getLogger(__name__)


class MlflowHooks(TrainHooks):
    """Log the loop's metrics into `run` by step, a run record into each checkpoint, and the final
    checkpoint and `summary.json` as artifacts. `run` None logs nothing (an untracked run, or a
    Ray rank other than 0). `owns_run`: end the run at the end (else its creator ends it).
    `system_metrics_s` > 0: CPU, memory (and GPU with `use_cuda`) samples at that period, logged
    with the steps (`system_metrics`), and one more at the end.
    After `close`, `pending` is the journal directory holding what the store did not take, or None."""

    def __init__(self, run: Optional[JournaledRun], output_dir: str | Path, *, owns_run: bool,
                 register_model: Optional[str] = None, system_metrics_s: float = 0.0, use_cuda: bool = False):
        self.run = run
        self.output_dir = Path(output_dir)
        self.owns_run = owns_run
        self.register_model = register_model   # MLflow registry name for the final model, if any
        self.pending: Optional[Path] = None
        self.use_cuda = use_cuda
        self.sampler = SystemMetricsSampler(system_metrics_s, use_cuda) if run is not None else None
        self.last_step = 0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.last_step = step
            self.run.log_metrics({**metrics, **(self.sampler.take() or {})}, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def on_checkpoint(self, step: int, checkpoint_dir: Path | None, metrics: dict[str, float]) -> None:
        if self.run is not None:
            if checkpoint_dir is not None:
                tracking.write_run_record(checkpoint_dir, self.run.run_id, self.run.uri)
                self.run.save_unsent(checkpoint_dir)  # for a successor on another node
            self.run.checkpoint()

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            if self.sampler.interval_s > 0:
                self.run.log_metrics(system_metrics.sample(self.use_cuda), self.last_step)
            if summary.get("data"):
                self.run.log_metrics(data_metrics(summary["data"]), summary["steps"])
            if summary.get("checkpoint"):
                self.run.log_artifacts(summary["checkpoint"], "checkpoint")
                self.run.log_model(summary["checkpoint"], self.register_model)   # a pyfunc (docs/export.md)
            if (self.output_dir / "summary.json").exists():
                self.run.log_artifact(self.output_dir / "summary.json")
        self.close("FINISHED")

    def close(self, status: str, deadline: Optional[float] = None) -> None:
        """Send what is journalled (waiting up to `deadline` s, default the journal's); end the
        run with `status` if this process owns it."""
        if self.run is not None:
            self.sampler.stop()
            self.pending = self.run.close(status if self.owns_run else None, deadline)
            self.run = None


def data_metrics(data: dict[str, Any]) -> dict[str, float]:
    """The summary's data counts as MLflow metrics: `data_rows_scanned`, `data_rows_streamed`,
    `data_skipped_total` and `data_skipped_<reason>` (every reason, 0 included)."""
    from nanovlm.data.samples import SKIP_FIXES

    metrics = {f"data_{key}": float(data[key]) for key in ("rows_scanned", "rows_streamed", "skipped_total")}
    metrics.update({f"data_skipped_{reason}": float(data["skipped"].get(reason, 0)) for reason in SKIP_FIXES})
    return metrics


def train_tracked(vlm_cfg: VLMConfig, train_cfg: TrainConfig, *, preset_name: Optional[str] = None,
                  run_name: Optional[str] = None, tracking_uri: Optional[str] = None, track: bool = True,
                  resume_from: Optional[str | Path] = None) -> dict[str, Any]:
    """Train in this process, tracked in MLflow; return the loop's summary plus `mlflow_run_id`
    and `tracking_uri`.

    Everything that can fail in a second fails before training: the configs (`ConfigError`), the
    checkpoint to resume and its model (`FileNotFoundError`, `ConfigError`), the MLflow store
    (`TrackingError`). `resume_from` (a run's output dir or a step dir) continues that checkpoint
    in the MLflow run its run record names. `run_name`: the MLflow run's name (default
    `<preset>-<date>-<time>`); `track=False` logs nothing to MLflow.
    """
    vlm_cfg.validate()
    train_cfg.validate()
    device = resolve_device(train_cfg.device)  # ConfigError now, not after the run was created
    # Absolute, like a Ray run's: the summary, the params and the run record name one place.
    train_cfg = train_cfg.replace(output_dir=str(Path(train_cfg.output_dir).expanduser().resolve()))
    checkpointing.check_output_dir(train_cfg.output_dir)
    checkpoint = checkpointing.resolve_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        checkpointing.check_resumable(vlm_cfg, checkpoint)

    run, uri = None, None
    if track:
        uri = tracking.check_tracking_store(tracking.absolute_uri(tracking_uri or tracking.default_tracking_uri()))
        config = configs_to_dict(vlm_cfg, train_cfg)
        tags = tracking.run_tags(config, preset=preset_name, world_size=1, device_type=device.type)
        run_id = tracking.start_training_run(
            config, uri=uri, run_name=run_name or tracking.default_run_name(preset_name), tags=tags,
            run_id=tracking.recorded_run_id(checkpoint, uri) if checkpoint is not None else None)
        run = JournaledRun(run_id, uri, train_cfg.output_dir, flush_every=train_cfg.log_interval)
    hooks = MlflowHooks(run, train_cfg.output_dir, owns_run=True, register_model=train_cfg.register_model,
                        system_metrics_s=train_cfg.system_metrics_interval, use_cuda=device.type == "cuda")
    try:
        summary = train(vlm_cfg, train_cfg, hooks=hooks, resume_from=checkpoint, validate=False)
    except KeyboardInterrupt:
        hooks.close("KILLED")
        raise
    except BaseException:
        hooks.close("FAILED")
        raise
    return {**summary, "mlflow_run_id": run and run.run_id, "tracking_uri": tracking.masked_uri(uri),
            "tracking_pending": str(hooks.pending) if hooks.pending else None}
