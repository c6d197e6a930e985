"""`scheduler: pbt` with trials that are TorchTrainer runs.

Population based training (Jaderberg et al., 2017): every `perturbation_interval` steps, a trial
in the bottom quantile of the population by the sweep's metric stops, copies the latest
checkpoint of a trial in the top quantile, and continues from it with that trial's config
mutated (each `mutate` field x0.8 or x1.2, or resampled from the space).

Tune's PBT moves state with `Trainable.save()` and `restore()`. Our trial is a function that
fits a TorchTrainer, and Train passes its checkpoints to Tune only as the reported metric
`checkpoint_path` (TuneReportCallback), so:

    strong trial                     Tune's PBT (controller)               weak trial
    reports step k, checkpoint_path  asks it to save(): PBTCheckpointMixin
                                     returns that Train checkpoint    ──►  restarted with the mutated
                                                                           config; resume_point() finds
                                                                           the checkpoint in the trial's
                                                                           context: a new Train run
                                                                           `<trial>-pbt-<hash>` starts
                                                                           from it

A new Train run, since Train would otherwise resume the weak trial's own latest checkpoint;
`load_optimizer_state` applies the new config's learning rates to the restored optimizer, so
the mutation acts from the first step after the exploit. The MLflow child run stays the trial's
own: it shows the jump, and the sweep state records each exploit (`donor_trial`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import ray.tune
from ray.train._internal.session import _TrainingResult
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

logger = logging.getLogger(__name__)

RUN_INFIX = "-pbt-"   # Train run of a trial restarted from a checkpoint: <trial_id>-pbt-<hash of the checkpoint>
START_DIRNAME = "pbt_start"   # in a trial's output_dir: the copy of the checkpoint its current Train run started from


class ExploitOnlyPBT(PopulationBasedTraining):
    """Tune's PBT, asynchronous, which also pauses a trial that reaches a perturbation while
    another waits (pending or paused), to share the cluster among a population larger than it.
    Pausing one of our trials stops its TorchTrainer and restarts it (tens of seconds), so with
    `time_share` False (the whole population runs at once) a trial pauses only to be exploited."""

    def __init__(self, *, time_share: bool, **kwargs):
        super().__init__(**kwargs)
        self.time_share = time_share

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        # An exploited trial is paused already (NOOP); PAUSE is only the time-sharing decision.
        if decision == TrialScheduler.PAUSE and not self.time_share:
            return TrialScheduler.CONTINUE
        return decision


def with_pbt_checkpoints(trainable, scheduler_type: str):
    """The trial function, able to hand PBT its latest Train checkpoint when the sweep uses PBT."""
    if scheduler_type == "pbt":
        trainable.__mixins__ = (PBTCheckpointMixin,)
    return trainable


class PBTCheckpointMixin:
    """Mixed into the trial's FunctionTrainable. `save()` (asked by PBT of a strong trial) returns
    the latest checkpoint the trial's TorchTrainer reported (TuneReportCallback's `checkpoint_path`),
    instead of the nothing a function trainable has. `restore()` (of the weak trial) accepts that
    checkpoint even when the strong trial's Train run has since deleted it (it keeps the latest
    and the best): the newest one next to it stands in, a later state of the same strong trial."""

    _latest_checkpoint: Optional[tuple[str, dict[str, Any]]] = None

    def step(self):
        result = super().step()
        path = result.get("checkpoint_path")
        if isinstance(path, str) and path:
            self._latest_checkpoint = (path, dict(result))
        return result

    def save_checkpoint(self, checkpoint_dir: str = ""):
        if self._latest_checkpoint is None:
            return super().save_checkpoint(checkpoint_dir)  # none yet: PBT skips this trial as a donor
        path, metrics = self._latest_checkpoint
        return _TrainingResult(checkpoint=ray.tune.Checkpoint.from_directory(path), metrics=dict(metrics))

    def restore(self, checkpoint_path):
        if isinstance(checkpoint_path, _TrainingResult) and not Path(checkpoint_path.checkpoint.path).exists():
            given = Path(checkpoint_path.checkpoint.path)
            newer = sorted(given.parent.glob("step_*"))
            if newer:
                logger.warning("PBT checkpoint %s was deleted; starting from %s, its run's newest.", given, newer[-1])
                checkpoint_path = _TrainingResult(checkpoint=ray.tune.Checkpoint.from_directory(str(newer[-1])),
                                                  metrics=checkpoint_path.metrics)
        return super().restore(checkpoint_path)


def resume_point(trial_id: str, output_dir: Path) -> tuple[str, Optional[str]]:
    """(Train run name, checkpoint to start from) of a trial: its own run and none, or, when Tune
    restarts it from a checkpoint (a PBT exploit), a run named after that checkpoint starting from
    a copy of it in `output_dir/pbt_start/` (hard links: instant, and kept when the donor's Train
    run deletes its own). A restored sweep restarts the trial under the same name, and Train then
    resumes that run's own latest checkpoint."""
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return trial_id, None
    given = Path(checkpoint.path)
    start = output_dir / START_DIRNAME / given.parent.name / given.name
    shutil.rmtree(output_dir / START_DIRNAME, ignore_errors=True)  # the previous start: its run has ended
    try:
        shutil.copytree(given, start, copy_function=os.link)
    except OSError:  # another filesystem: a real copy
        shutil.rmtree(start, ignore_errors=True)
        shutil.copytree(given, start)
    digest = hashlib.sha1(checkpoint.path.encode()).hexdigest()[:8]
    return f"{trial_id}{RUN_INFIX}{digest}", str(start)


def donor_trial(trial_id: str, checkpoint_path: str) -> Optional[str]:
    """The trial whose Train run wrote `checkpoint_path` (`.../train/<run>/step_N`), or None
    when that is `trial_id` itself (a paused trial resuming, or a restored sweep)."""
    donor = Path(checkpoint_path).parent.name.split(RUN_INFIX)[0]
    return None if donor == trial_id else donor
