"""Run a sweep: Ray Tune over a `SweepSpec`, one Ray Train run per trial, MLflow parent + child runs.

    Tune controller (this process)                    Trial actor (driver_cpus)         Train workers
    ─ SweepTracker callback: creates the child ──►    run_trial(config): builds the ──► train_worker:
      run per trial, tags its status at the end       configs; invalid -> report &      logs metrics by
    ─ ASHA, PBT or FIFO decide from the reports       return; else TorchTrainer.fit()   step into the
                                                      with TuneReportCallback           child run

Files in the sweep directory `<storage>/<name>-<timestamp>/` (a path, or a URI such as
s3://bucket/sweeps/...; `nanovlm.sweep.state`): `nanovlm_sweep.json` (the space, the parent run,
each trial's run id and status: what `--resume` needs), `tune/` (Tune's experiment directory),
`train/` (Ray Train storage), `results/` (table, best config, plots); each node's local copy of
the sweep directory holds `trials/<trial_id>/` (each trial's output_dir).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from nanovlm import storage, tracking
from nanovlm.config import ConfigError, apply_overrides, configs_to_dict
from nanovlm.distributed.cluster import ensure_ray
from nanovlm.distributed.launcher import check_cluster_resources, check_device_settings
from nanovlm.sweep.results import TrialRecord, best_trial, write_results
from nanovlm.sweep.space import SweepSpec, trial_configs
from nanovlm.sweep.state import (STATE_FILE, SweepState, as_location, default_storage, find_resumable,  # noqa: F401
                                 new_sweep_dir, trial_output_dir)
from nanovlm.sweep.pbt import donor_trial, resume_point, with_pbt_checkpoints
from nanovlm.sweep.strategies import build_scheduler, build_search
from nanovlm.tracking_journal import JournaledRun, settle

logger = logging.getLogger(__name__)

# Tune's experiment directory inside the sweep directory. Kept apart from our own files: Tune
# stages its directory elsewhere and copies it back over the original, so a file of ours in
# it would be replaced by the stale copy Tune took when a sweep is resumed.
TUNE_DIRNAME = "tune"
TRIAL_TAG = "nanovlm.trial_id"
STATUS_TAG = "nanovlm.status"
REASON_TAG = "nanovlm.status_reason"
SWEEP_TAG = "nanovlm.sweep"
EXPLORED_TAG = "nanovlm.pbt_explored"   # the configs PBT gave a trial, and the checkpoints it continued


@dataclass
class SweepOutcome:
    sweep_dir: str | Path                   # a URI on an object store
    parent_run_id: str
    tracking_uri: str
    records: list[TrialRecord]
    files: dict[str, Path]
    best: Optional[TrialRecord]
    interrupted: bool = False      # some trials did not finish (Ctrl-C, time budget): --resume continues them
    tracking_pending: list[str] = field(default_factory=list)  # journals MLflow lacks something of
    local_dir: Optional[Path] = None        # this node's files of the sweep (the sweep_dir, if a path)


# ============================================================================ the trial

def run_trial(config: dict[str, Any], *, spec: SweepSpec, sweep_dir: str, parent_run_id: str,
              tracking_uri: str) -> None:
    """One Tune trial: the sampled fields in `config` on top of the spec's base configs, trained
    by a TorchTrainer whose reports reach Tune (and ASHA) through `TuneReportCallback`."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from nanovlm.distributed.launcher import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {name: config[name] for name in spec.space}
    try:
        vlm_cfg, train_cfg = trial_configs(spec, sampled)
        check_device_settings(train_cfg)
    except ConfigError as exc:
        # Not a crash of the sweep: the controller's SweepTracker marks the trial invalid.
        ray.tune.report({"invalid": 1.0, "invalid_reason": str(exc)})
        return
    train_cfg = train_cfg.replace(output_dir=str(trial_output_dir(sweep_dir, trial_id)),
                                  storage_path=storage.join(sweep_dir, "train"),
                                  register_model=None)   # only the best trial's model is registered (_finish_parent)
    # A PBT exploit restarts the trial from another trial's checkpoint.
    train_run, start_from = resume_point(trial_id, Path(train_cfg.output_dir))
    run_id = _find_child_run(tracking_uri, parent_run_id, trial_id)
    tracking_spec = {"uri": tracking_uri, "experiment_name": train_cfg.experiment_name, "run_id": run_id,
                     "parent_run_id": parent_run_id, "run_name": trial_id,
                     "tags": {TRIAL_TAG: trial_id, SWEEP_TAG: spec.name}}
    # Train's controller polls its workers every 2 s by default and a worker blocks on its
    # pending report until then; this process only launches this trial's TorchTrainer.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    trainer = build_trainer(vlm_cfg, train_cfg, run_name=train_run, preset_name=spec.preset,
                            tracking_spec=tracking_spec, callbacks=[TuneReportCallback()], resume_from=start_from,
                            checkpoint_score=(spec.metric, spec.mode))
    trainer.fit()


def _find_child_run(uri: str, parent_run_id: str, trial_id: str) -> Optional[str]:
    """The child run the controller created for this trial (before the trial started); None
    lets the worker create one itself."""
    try:
        client = tracking._client(uri)
        parent = client.get_run(parent_run_id)
        runs = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{tracking.PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception as exc:  # noqa: BLE001 - the worker then creates the child run itself
        logger.warning("Could not look up the MLflow run of trial %s: %s", trial_id, exc)
        return None


# ============================================================================ MLflow + status bookkeeping

class SweepTracker(Callback):
    """Tune callback on the controller: a child MLflow run per trial (all config fields as params,
    tagged with the parent), and each trial's final status as tags and in the state file:

    completed      trained to the end
    early-stopped  stopped by the scheduler before its last step
    invalid        the sampled config cannot be built (reason: the ConfigError)
    failed         the trial raised (reason: the error's last line)
    stopped        still running when the sweep ended (time budget, Ctrl-C)
    """

    def __init__(self, spec: SweepSpec, state: SweepState, uri: str, experiment_name: str):
        self.spec, self.state, self.uri, self.experiment_name = spec, state, uri, experiment_name
        self._scheduler_stopped: set[str] = set()

    def __getstate__(self):  # Tune pickles callbacks with its experiment state
        return {k: v for k, v in self.__dict__.items() if k != "state"} | {"sweep_dir": str(self.state.sweep_dir)}

    def __setstate__(self, data):
        sweep_dir = data.pop("sweep_dir")
        self.__dict__.update(data)
        self.state = SweepState.load(sweep_dir)

    # ---- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        entry = self.state.trial(trial.trial_id)
        sampled = {name: trial.config.get(name) for name in self.spec.space}
        tags = {STATUS_TAG: "running"}
        restored = getattr(trial.checkpoint, "path", None)  # PBT's: an exploit, or a paused trial resuming
        explored = entry.setdefault("explored", [])
        donor = donor_trial(trial.trial_id, restored) if restored else None
        if donor is not None and (not explored or explored[-1]["from_checkpoint"] != restored):
            explored.append({"config": sampled, "from_trial": donor, "from_checkpoint": restored})
            tags[EXPLORED_TAG] = json.dumps(explored)[:5000]
        entry.update(config=sampled, status="running")
        if entry.get("run_id"):  # resumed trial: keep logging into its run
            tracking.TrackingRun(entry["run_id"], self.uri).set_tags(tags)
            self._reopen(entry["run_id"])
        else:
            entry["run_id"] = self._create_child_run(trial.trial_id, sampled)
        self.state.save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self.state.trial(trial.trial_id)
        if result.get("invalid"):
            entry.update(status="invalid", reason=str(result.get("invalid_reason", "")))
            self.state.save()
        elif result.get("done"):
            # `done` on a reported result: the scheduler (or a stopper) decided to stop here.
            self._scheduler_stopped.add(trial.trial_id)
            entry["stopped_at_step"] = result.get("step")

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self.state.trial(trial.trial_id)
        if entry.get("status") != "invalid":
            entry["status"], entry["reason"] = self._finished_status(trial)
        self._close(trial.trial_id, "FAILED" if entry["status"] == "invalid" else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        entry = self.state.trial(trial.trial_id)
        entry.update(status="failed", reason=_error_reason(trial))
        self._close(trial.trial_id, "FAILED")

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            entry = self.state.trial(trial.trial_id)
            if entry.get("status") in (None, "running"):
                entry.update(status="stopped", reason="still running when the sweep ended (time budget or interrupt)")
                self._close(trial.trial_id, "KILLED")

    # ---- helpers
    def _finished_status(self, trial) -> tuple[str, str]:
        if trial.trial_id not in self._scheduler_stopped:
            return "completed", ""
        step = self.state.trial(trial.trial_id).get("stopped_at_step")
        total = self._max_steps(trial)
        if step is not None and total is not None and step >= total:
            return "completed", ""
        return "early-stopped", f"stopped by {self.spec.scheduler.type} at step {step} of {total}"

    def _max_steps(self, trial) -> Optional[int]:
        try:
            vlm, train = self.spec.base_configs()
            _, train = apply_overrides(vlm, train, {k: trial.config[k] for k in self.spec.space})
            return train.max_training_steps
        except (ConfigError, KeyError):
            return None

    def _create_child_run(self, trial_id: str, sampled: dict[str, Any]) -> Optional[str]:
        vlm, train = self.spec.base_configs()
        try:  # types were checked up front; values may still be invalid (then tagged so)
            vlm, train = apply_overrides(vlm, train, sampled)
        except ConfigError:
            pass
        config = configs_to_dict(vlm, train)
        label = " ".join(f"{k}={_short(v)}" for k, v in sampled.items())
        tags = tracking.run_tags(config, preset=self.spec.preset, world_size=train.num_workers,
                                 device_type="cuda" if train.use_gpu else "cpu",
                                 extra={TRIAL_TAG: trial_id, SWEEP_TAG: self.spec.name, STATUS_TAG: "running",
                                        "nanovlm.varied": json.dumps(sampled)})
        try:
            return tracking.create_run(config, uri=self.uri, experiment_name=self.experiment_name,
                                       run_name=f"{trial_id} {label}", tags=tags,
                                       parent_run_id=self.state.data["parent_run_id"])
        except Exception as exc:  # noqa: BLE001 - the sweep goes on; the worker creates the run
            logger.warning("Could not create the MLflow run of trial %s: %s", trial_id, exc)
            return None

    def _reopen(self, run_id: str) -> None:
        tracking.TrackingRun(run_id, self.uri)._guard(
            "update_run", lambda c: c.update_run(run_id, status="RUNNING"))

    def _close(self, trial_id: str, mlflow_status: str) -> None:
        entry = self.state.trial(trial_id)
        self.state.save()
        if not entry.get("run_id"):
            return
        # Through the trial's journal: it first sends what a stopped trial's rank 0 left there,
        # and keeps the status for `nanovlm tracking sync` if the store is down.
        # A stopped trial's workers may not have exited yet: write beside them rather than wait (the
        # sweep settles every trial's journal at its end).
        run = JournaledRun(entry["run_id"], self.uri, trial_output_dir(self.state.sweep_dir, trial_id), lock_wait_s=0.0)
        # the reason is always set, so that a resumed trial loses its earlier "stopped" reason
        run.set_tags({STATUS_TAG: entry["status"], REASON_TAG: (entry.get("reason") or "")[:5000]})
        run.close(mlflow_status)


def _error_reason(trial) -> str:
    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be missing
        error = None
    text = str(error) if error else "unknown error (see the trial's error.txt)"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ============================================================================ the sweep

def run_sweep(spec: SweepSpec, *, resume_dir: Optional[str | Path] = None,
              storage_path: Optional[str | Path] = None, tracking_uri: Optional[str] = None,
              ray_address: Optional[str] = None) -> SweepOutcome:
    """Run `spec` (or resume the sweep in `resume_dir`) and write its results."""
    from ray import tune

    root = None if resume_dir is not None else storage_path or spec.storage_path or default_storage()
    if root is not None and spec.scheduler.type == "pbt" and storage.is_uri(storage.resolve(root)):
        raise ConfigError(f"scheduler pbt hands checkpoints between trials by path: the sweep storage {root} "
                          "must be a filesystem path (local, or NFS on several nodes), not object storage.")
    uri = tracking.check_tracking_store(tracking_uri)
    # Tune checks that every result holds the metric; Train reports between evaluations hold
    # only step metrics, and invalid trials none. ASHA itself skips results without it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray before any file or MLflow run of the sweep exists: a dead cluster leaves nothing behind.
    # The dashboard stays on (ensure_ray's default): with it off, the workers of trials that ASHA
    # stops are never freed and later trials wait forever.
    ensure_ray(ray_address)
    if resume_dir is not None:
        sweep_dir = as_location(resume_dir)
        state = SweepState.load(sweep_dir)
        spec = state.spec()  # the space as it was when the sweep started
    else:
        storage.check_writable(storage.resolve(root), f"sweep storage {root}", "pass another --storage-path")
        sweep_dir = new_sweep_dir(root, spec.name)
        state = SweepState(storage.join(sweep_dir, STATE_FILE), {
            "spec_name": spec.name, "space_path": spec.source_path, "space_text": spec.source_text or "",
            "extra_overrides": spec.extra_overrides, "trials": {}})
        if not spec.source_text:  # built in code: keep an equivalent file
            state.data["space_text"] = _spec_as_yaml(spec)
    _, base_train = spec.base_configs()
    experiment_name = base_train.experiment_name

    if "parent_run_id" not in state.data:
        state.data["parent_run_id"] = _create_parent_run(spec, state.local_dir, uri, experiment_name,
                                                         location=sweep_dir)
        state.data["tracking_uri"] = uri
        state.save()
    parent = tracking.TrackingRun(state.data["parent_run_id"], uri)
    if resume_dir is not None:
        parent._guard("update_run", lambda c: c.update_run(parent.run_id, status="RUNNING"))

    check_cluster_resources(base_train, _resources_minus_driver(spec.driver_cpus))

    trainable = tune.with_resources(with_pbt_checkpoints(
        tune.with_parameters(run_trial, spec=spec, sweep_dir=str(sweep_dir),
                             parent_run_id=state.data["parent_run_id"], tracking_uri=uri), spec.scheduler.type),
        {"cpu": spec.driver_cpus})
    tracker = SweepTracker(spec, state, uri, experiment_name)
    interrupted = False
    try:
        if resume_dir is not None and tune.Tuner.can_restore(storage.join(sweep_dir, TUNE_DIRNAME)):
            logger.info("Resuming sweep %s (finished trials are kept, unfinished ones continue)", sweep_dir)
            tuner = tune.Tuner.restore(storage.join(sweep_dir, TUNE_DIRNAME), trainable=trainable,
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space(),
                tune_config=tune.TuneConfig(
                    num_samples=spec.num_samples,
                    scheduler=build_scheduler(spec), search_alg=build_search(spec), time_budget_s=spec.time_budget_s,
                    reuse_actors=False),
                run_config=tune.RunConfig(
                    name=TUNE_DIRNAME, storage_path=str(sweep_dir), callbacks=[tracker],
                    failure_config=tune.FailureConfig(max_failures=0), verbose=1),
            )
        grid = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C
        interrupted = True
        grid = None

    state = SweepState.load(sweep_dir)  # the tracker wrote it (possibly a restored copy)
    records = _records(grid, state, sweep_dir)
    # Ctrl-C (Tune catches the first one and returns) or the time budget: trials left unfinished.
    interrupted = interrupted or any(r.status == "stopped" for r in records)
    if interrupted:
        logger.warning("Not every trial finished; resume with: nanovlm sweep --resume %s", sweep_dir)
    files = write_results(records, spec, state.local_dir / "results")
    storage.upload_dir(state.local_dir / "results", storage.join(sweep_dir, "results"))
    best = best_trial(records, spec.metric, spec.mode)
    _finish_parent(JournaledRun(parent.run_id, uri, state.local_dir), spec, records, best, files, interrupted,
                   state.local_dir)
    pending = settle(state.local_dir)
    if pending:
        logger.warning("MLflow store %s did not take everything; the rest waits in %d journal(s) under %s. "
                       "Send it with: nanovlm tracking sync %s", tracking.masked_uri(uri), len(pending),
                       state.local_dir, state.local_dir)
    return SweepOutcome(sweep_dir, state.data["parent_run_id"], uri, records, files, best, interrupted,
                        tracking_pending=[str(p) for p in pending], local_dir=state.local_dir)


def _resources_minus_driver(driver_cpus: float) -> dict[str, float]:
    """Cluster resources left for one trial's workers once its driver holds `driver_cpus`."""
    import ray

    resources = dict(ray.cluster_resources())
    resources["CPU"] = float(resources.get("CPU", 0)) - driver_cpus
    return resources


def _records(grid, state: SweepState, sweep_dir: Path) -> list[TrialRecord]:
    """Trial records from Tune's results (history of reports, wall time) and the state file
    (status, reason, run id); trials known only to one of them are kept too."""
    by_id: dict[str, TrialRecord] = {}
    for trial_id, entry in state.data.get("trials", {}).items():
        by_id[trial_id] = TrialRecord(trial_id, dict(entry.get("config") or {}), entry.get("status") or "stopped",
                                      entry.get("reason") or "", run_id=entry.get("run_id"))
    for result in (grid or []):
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") or next(
            (known for known in by_id if known in Path(result.path).name), Path(result.path).name)
        record = by_id.setdefault(trial_id, TrialRecord(trial_id, {}, "completed"))
        record.config = record.config or dict(config)
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            record.history = [{k: v for k, v in row.items() if not _is_nan(v)}
                              for row in frame.to_dict("records")]
        elif result.metrics:
            record.history = [dict(result.metrics)]
        record.wall_time_s = (result.metrics or {}).get("time_total_s")
        if result.error is not None and record.status in ("running", "completed"):
            record.status, record.reason = "failed", str(result.error).strip().splitlines()[-1]
    return list(by_id.values())


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _create_parent_run(spec: SweepSpec, sweep_dir: Path, uri: str, experiment_name: str, *,
                       location: Optional[str | Path] = None) -> str:
    """The sweep's MLflow parent run; `sweep_dir` is where space.yaml is written (the local
    directory), `location` the sweep directory to tag it with (default `sweep_dir`)."""
    from mlflow.entities import Param

    vlm, train = spec.base_configs()
    config = configs_to_dict(vlm, train)
    tags = tracking.run_tags(config, preset=spec.preset, world_size=train.num_workers,
                             device_type="cuda" if train.use_gpu else "cpu",
                             extra={SWEEP_TAG: spec.name, "nanovlm.kind": "sweep",
                                    "nanovlm.sweep_dir": str(location or sweep_dir), "nanovlm.metric": spec.metric,
                                    "nanovlm.mode": spec.mode})
    client = tracking._client(uri)
    experiment_id = tracking.get_or_create_experiment(uri, experiment_name)
    run = client.create_run(experiment_id, tags={**tracking.context_tags(), **tags}, run_name=sweep_dir.name)
    params = {"preset": spec.preset, "metric": spec.metric, "mode": spec.mode, "num_samples": spec.num_samples,
              "max_concurrent_trials": spec.max_concurrent_trials, "scheduler": spec.scheduler.type,
              "search": spec.search.type,
              **{f"space.{k}": d.describe() for k, d in spec.space.items()},
              **{f"fixed.{k}": v for k, v in spec.overrides.items()}}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    space_file = sweep_dir / "space.yaml"
    space_file.write_text(spec.source_text or _spec_as_yaml(spec))
    client.log_artifact(run.info.run_id, str(space_file))
    logger.info("MLflow parent run %s (experiment %r) in %s", run.info.run_id, experiment_name,
                tracking.masked_uri(uri))
    return run.info.run_id


def _finish_parent(parent: JournaledRun, spec: SweepSpec, records: list[TrialRecord],
                   best: Optional[TrialRecord], files: dict[str, Path], interrupted: bool, local_dir: Path) -> None:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    tags = {f"nanovlm.trials_{status}": str(n) for status, n in counts.items()}
    if best is not None:
        tags["nanovlm.best_trial"] = best.trial_id
        if best.run_id:
            tags["nanovlm.best_run_id"] = best.run_id
        metrics = {f"best_{spec.metric}": best.final(spec.metric)}
        metrics.update({f"best.{k}": v for k, v in best.config.items() if isinstance(v, (int, float))})
        # by trials finished: a resumed sweep logs its new best, and nothing twice
        finished = sum(r.status in ("completed", "early-stopped") for r in records)
        parent.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=finished)
    best_checkpoint = json.loads(files["best_checkpoint.json"].read_text())["best"]
    if best_checkpoint is not None:
        tags["nanovlm.best_checkpoint"] = best_checkpoint["copy"] or best_checkpoint["path"]
    parent.set_tags(tags)
    for path in files.values():
        parent.log_artifact(path)
    register = spec.base_configs()[1].register_model
    if register and best is not None:
        # The best trial's final model, as an MLflow model of the parent run, registered under that name
        # (from this node's copy of the trial: on object storage, a trial that ran on this node).
        from nanovlm.training.checkpointing import latest_checkpoint

        checkpoint = latest_checkpoint(local_dir / "trials" / best.trial_id)
        if checkpoint is not None:
            parent.log_model(checkpoint, register)
    parent.close("KILLED" if interrupted else "FINISHED")


def _spec_as_yaml(spec: SweepSpec) -> str:
    import yaml

    data = {"name": spec.name, "preset": spec.preset, "overrides": spec.overrides,
            "space": {k: {d.kind: list(d.args)} for k, d in spec.space.items()},
            "metric": spec.metric, "mode": spec.mode,
            "search": spec.search.to_dict(), "scheduler": spec.scheduler.to_dict(), "num_samples": spec.num_samples,
            "max_concurrent_trials": spec.max_concurrent_trials,
            "resources": {"driver_cpus": spec.driver_cpus}, "time_budget_s": spec.time_budget_s,
            "seed": spec.seed}
    return yaml.safe_dump(data, sort_keys=False)
