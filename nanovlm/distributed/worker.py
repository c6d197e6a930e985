"""The function every Ray Train worker runs: rebuild the configs, train with Ray-aware hooks.

`train_worker(config)` receives the one plain-dict form of the settings plus run metadata:

    {"vlm": {...}, "train": {...},                  # configs_to_dict(vlm, train)
     "run": {"preset": "tiny",                      # for MLflow tags
             "tracking": None | {"uri": ..., "experiment_name": ..., "run_id": ...,
                                 "parent_run_id": ..., "run_name": ..., "tags": {...}},
             "resume_from": None | "/abs/.../checkpoints/step_000500",
             "location": None | "s3://bucket/runs/<name>"}}   # storage_path/name

The configs are validated here, where they enter the worker's process. `resume_from` is the
checkpoint to start from unless Ray has one of this run (a restarted worker group resumes from
Ray's latest checkpoint).

MLflow is `MlflowHooks` on rank 0 (the same logging as a single-process run). `tracking.run_id`
set: log into that run (the driver created it and will close it). Unset: rank 0 creates the run
itself (a child of `parent_run_id` when given, e.g. a Tune trial) and closes it at the end; its
id travels in the checkpoint's run record, so a restarted worker group keeps logging into the
same run. `tracking: None` turns MLflow off. Rank 0 only appends each step to the run's journal
in output_dir (`nanovlm.tracking_journal`), so the other ranks never wait in the all-reduce for
the store, and a restarted rank 0 logs only the steps its predecessors did not.

At the end rank 0 also writes the loop's summary to `location/nanovlm_summary.json` through
`nanovlm.storage`, where the driver reads it (rank 0 may have run on another node).

Reports: every `report_interval` steps, after every evaluation, and with every checkpoint.
Every rank calls `ray.train.report` at the same steps (Train V2 uses it as a barrier); only
rank 0 attaches the `Checkpoint` (the loop's step directory: model.safetensors, config.json,
train_state.pt with optimizer/scheduler/RNG/data position, and the MLflow run record).

A report waits until Train's controller has read the previous one (it polls each worker every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reports are made on a thread of their own, in order, and
training goes on meanwhile. Checkpoint reports are waited for (the checkpoint is persisted before
the next step, as with a plain call). A metric-only report that falls due while an earlier one is
still waiting is skipped, on every rank alike (the ranks agree through the all-reduce of the
loss), so reports reach Ray at most as often as it reads them and never pile up. Evaluation
reports are never skipped. MLflow gets every step's metrics from rank 0 regardless.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from nanovlm import tracking
from nanovlm.config import TrainConfig, VLMConfig, configs_from_dict
from nanovlm.tracking_journal import JournaledRun
from nanovlm.training.metrics import global_sum
from nanovlm.training.tracked import MlflowHooks

logger = logging.getLogger(__name__)

# Fault injection for tests and drills: "RANK:STEP[,RANK:STEP...]" makes that rank SIGKILL itself
# after STEP, each once per output_dir (a marker file there remembers it across the restarts).
KILL_ENV = "NANOVLM_KILL_RANK_AT_STEP"
FAILURE_DEADLINE_S = 5.0  # for MLflow when a worker fails: its journal keeps the rest for the next attempt


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of `TorchTrainer(train_loop_per_worker=train_worker, train_loop_config=config)`."""
    from nanovlm.training import train

    _quiet_ray_report_log()
    run = dict(config.get("run") or {})
    vlm_cfg, train_cfg = configs_from_dict({"vlm": config["vlm"], "train": config["train"]})
    vlm_cfg.validate()
    train_cfg.validate()
    hooks = RayTrainHooks(vlm_cfg, train_cfg, preset=run.get("preset"), tracking_spec=run.get("tracking"),
                          run_location=run.get("location"))
    try:
        train(vlm_cfg, train_cfg, hooks=hooks, resume_from=run.get("resume_from"), validate=False)
    except BaseException:
        hooks.close(status="FAILED", deadline=FAILURE_DEADLINE_S)
        raise


def _quiet_ray_report_log() -> None:
    """Ray Train V2 logs every report's full metrics dict at INFO from each worker, which buries
    our own step lines; keep its warnings only."""
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def kill_points(spec: str) -> set[tuple[int, int]]:
    """`KILL_ENV`'s value "0:3,0:7" -> {(0, 3), (0, 7)}: (rank, step) pairs."""
    points = set()
    for item in spec.split(","):
        rank, _, step = item.strip().partition(":")
        if not (rank.isdigit() and step.isdigit()):
            raise ValueError(f"{KILL_ENV}={spec!r}: expected RANK:STEP[,RANK:STEP...], e.g. 0:3,0:7.")
        points.add((int(rank), int(step)))
    return points


class RayTrainHooks(MlflowHooks):
    """TrainHooks for a Ray Train worker: device, DDP, resume checkpoint, reports; MLflow on rank 0
    through `MlflowHooks` (every rank calls them; the others have no run and log nothing)."""

    def __init__(self, vlm_cfg: VLMConfig, train_cfg: TrainConfig, *, preset: Optional[str] = None,
                 tracking_spec: Optional[dict[str, Any]] = None, run_location: Optional[str] = None):
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.vlm_cfg, self.train_cfg = vlm_cfg, train_cfg
        self.preset = preset
        self.run_location = run_location
        self._pending: dict[str, float] = {}  # this step's metrics, waiting for the report
        self._download_dir: Optional[tempfile.TemporaryDirectory] = None
        self._ray_checkpoint_dir = self._local_checkpoint(ray.train.get_checkpoint())
        self._reporter = ReportThread()
        self.reports_skipped = 0
        run, owns_run = None, False
        if self.rank == 0 and tracking_spec is not None:
            run, owns_run = self._open_mlflow_run(tracking_spec)
        super().__init__(run, train_cfg.output_dir, owns_run=owns_run, register_model=train_cfg.register_model,
                         system_metrics_s=train_cfg.system_metrics_interval, use_cuda=train_cfg.use_gpu)

    # ------------------------------------------------------------------ loop contract

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # The loop has already moved the model; DDP (gloo on CPU, nccl on GPU) when world_size > 1.
        # find_unused_parameters: a batch without images leaves the ViT and the projector out of
        # that rank's graph, and plain DDP then waits forever for their gradients (or fails at the
        # next step). With it, DDP counts a parameter a rank did not use as a zero gradient from that
        # rank (exact: that rank's loss does not depend on it), so the mean is the gradient of the
        # global batch as one process computes it; a parameter no rank used keeps grad None and
        # AdamW skips it, as one process would. Cost: a walk of the autograd graph per forward and
        # one small all-reduce per step (about 1 ms a step for `tiny` on 2 CPU workers).
        return ray.train.torch.prepare_model(model, move_to_device=False,
                                             parallel_strategy_kwargs={"find_unused_parameters": True})

    def resume_dir(self) -> Optional[Path]:
        """Ray's latest checkpoint: after a worker failure, or when a stopped run is resumed."""
        if self._ray_checkpoint_dir is not None:
            logger.info("Rank %d resumes from Ray checkpoint %s", self.rank, self._ray_checkpoint_dir)
        return self._ray_checkpoint_dir

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._maybe_kill_self(step)
        metrics = dict(metrics)
        reporter_busy = self._reporter.busy()
        if self.world_size > 1:
            # The loop's loss is this rank's; report the mean over ranks, the loss of the global batch.
            # The same all-reduce counts the ranks whose previous report is still waiting.
            loss_sum, busy_ranks = global_sum([metrics["loss"], float(reporter_busy)], self.device())
            metrics["loss"] = loss_sum / self.world_size
            reporter_busy = busy_ranks > 0
        self._pending = metrics
        super().on_step(step, metrics)
        # An evaluation or a checkpoint follows at this step: report once, there.
        if self._is_eval_step(step) or self._is_checkpoint_step(step):
            return
        if step % self.train_cfg.report_interval == 0:
            if reporter_busy:
                self.reports_skipped += 1
            else:
                self._report(step, self._pending)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        super().on_eval(step, metrics)
        self._pending = {**self._pending, **metrics}
        if not self._is_checkpoint_step(step):
            self._report(step, self._pending)

    def on_checkpoint(self, step: int, checkpoint_dir: Optional[Path], metrics: dict[str, float]) -> None:
        from ray.train import Checkpoint

        super().on_checkpoint(step, checkpoint_dir, metrics)  # the run record, before Ray copies the directory
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        # Every rank waits: the checkpoint is persisted before the next step, as with a plain call.
        self._report(step, {**metrics, **self._pending}, checkpoint, wait=True)

    def on_end(self, summary: dict[str, Any]) -> None:
        # Train finishes a worker once its function returns: hand over every report first.
        self._reporter.wait()
        if self.reports_skipped:
            logger.info("Rank %d skipped %d metric-only reports (Ray had not read the previous one yet).",
                        self.rank, self.reports_skipped)
        if self.rank == 0 and self.run_location is not None:
            from nanovlm import storage
            from nanovlm.distributed.launcher import SUMMARY_FILE

            storage.write_json(storage.join(self.run_location, SUMMARY_FILE), summary)
        super().on_end(summary)  # artifacts, then close

    # ------------------------------------------------------------------ helpers

    def close(self, status: str, deadline: Optional[float] = None) -> None:
        self._reporter.stop()
        super().close(status, deadline)
        if self._download_dir is not None:
            self._download_dir.cleanup()
            self._download_dir = None

    def _maybe_kill_self(self, step: int) -> None:
        target = os.environ.get(KILL_ENV)
        if not target or (self.rank, step) not in kill_points(target):
            return
        marker = Path(self.train_cfg.output_dir) / f".killed-rank{self.rank}-step{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        # Let the controller poll the reports already sent, so the latest checkpoint is registered
        # before the worker dies (otherwise the restart could start from an older one).
        poll_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
        time.sleep(max(1.0, 5 * poll_s))
        logger.warning("%s=%s: rank %d kills its own process after step %d.", KILL_ENV, target, self.rank, step)
        os.kill(os.getpid(), signal.SIGKILL)

    def _is_eval_step(self, step: int) -> bool:
        return step % self.train_cfg.eval_interval == 0 or step == self.train_cfg.max_training_steps

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.train_cfg.checkpoint_interval == 0 or step == self.train_cfg.max_training_steps

    def _report(self, step: int, metrics: dict[str, float], checkpoint=None, wait: bool = False) -> None:
        plain = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        plain["step"] = step
        kwargs = {"checkpoint_dir_name": f"step_{step:06d}"} if checkpoint is not None else {}
        self._reporter.submit(plain, checkpoint=checkpoint, **kwargs)
        if wait:
            self._reporter.wait()

    def _local_checkpoint(self, checkpoint) -> Optional[Path]:
        """Ray's checkpoint as a local directory (downloaded once from cloud storage), or None."""
        if checkpoint is None:
            return None
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(checkpoint.path)
        self._download_dir = tempfile.TemporaryDirectory(prefix="nanovlm-resume-")
        return Path(checkpoint.to_directory(self._download_dir.name))

    def _open_mlflow_run(self, spec: dict[str, Any]) -> tuple[Optional[JournaledRun], bool]:
        """Rank 0's MLflow run and whether this worker owns it (created it, so ends it)."""
        uri = spec.get("uri") or tracking.default_tracking_uri()
        run_id = spec.get("run_id")
        owns_run = False
        if run_id is None and self._ray_checkpoint_dir is not None:
            # a restarted worker group: the run that rank 0 created before the failure
            run_id = tracking.recorded_run_id(self._ray_checkpoint_dir, uri)
            owns_run = run_id is not None
        if run_id is None:
            from nanovlm.config import configs_to_dict

            config = configs_to_dict(self.vlm_cfg, self.train_cfg)
            tags = tracking.run_tags(config, preset=self.preset, world_size=self.world_size,
                                     device_type=self.device().type, extra=spec.get("tags"))
            try:
                run_id = tracking.create_run(config, uri=uri, experiment_name=spec.get("experiment_name"),
                                             run_name=spec.get("run_name"), tags=tags,
                                             parent_run_id=spec.get("parent_run_id"))
            except Exception as exc:  # noqa: BLE001 - the driver checked the store; do not kill training now
                logger.warning("Could not create an MLflow run in %s (training continues untracked): %s",
                               tracking.masked_uri(uri), exc)
                return None, False
            owns_run = True
        # The journal's thread opens the store (importing MLflow takes about a second) and
        # tells, in a warning, if this node cannot reach it; training does not wait for it.
        run = JournaledRun(run_id, uri, self.train_cfg.output_dir, flush_every=self.train_cfg.log_interval)
        if self._ray_checkpoint_dir is not None:
            # what a predecessor (perhaps on a lost node) journalled up to the checkpoint but had not sent
            run.adopt(self._ray_checkpoint_dir)
        return run, owns_run


class ReportThread:
    """Calls `ray.train.report` on a thread of its own, one report at a time, in submission order.

    `ray.train.report` returns once Ray's one-slot result queue has taken the report, which
    happens when the controller has read the previous one; the training thread goes on meanwhile.
    An error from Ray is raised again in the training thread at its next `submit`, `wait` or `busy`.
    """

    def __init__(self):
        self._todo: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._submitted = 0
        self._finished = 0
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def submit(self, metrics: dict[str, float], **report_kwargs) -> None:
        self._raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nanovlm-ray-report", daemon=True)
            self._thread.start()
        with self._lock:
            self._submitted += 1
        self._todo.put((metrics, report_kwargs))

    def busy(self) -> bool:
        """True while a submitted report has not been taken by Ray yet."""
        self._raise_error()
        with self._lock:
            return self._finished < self._submitted

    def wait(self) -> None:
        """Until every submitted report has been handed to Ray."""
        with self._done:
            self._done.wait_for(lambda: self._finished >= self._submitted)
        self._raise_error()

    def stop(self) -> None:
        """Let the thread end after its current report (it is a daemon: a report blocked on a
        controller that is gone does not keep the process alive)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread = None

    def _run(self) -> None:
        import ray.train

        while (item := self._todo.get()) is not None:
            metrics, report_kwargs = item
            try:
                if self._error is None:
                    ray.train.report(metrics, **report_kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc
            finally:
                with self._done:
                    self._finished += 1
                    self._done.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
