"""Driver side of a Ray Train run: validate, check the cluster and the tracking store, fit.

`run_training(vlm_cfg, train_cfg, preset_name=...)` is the Ray route of `nanovlm train` (also
`ray job submit ... python jobs/train.py`, which is `nanovlm train`). Everything that can fail in
a second fails here, before a worker starts: config validation, the checkpoint to resume, the
MLflow store, cluster resources. `build_trainer` is the piece Ray Tune reuses inside its
trainable (pass `callbacks=[TuneReportCallback()]` and a child-run `tracking` spec).

Scaling, storage and failure policy are declared in one place:

    ScalingConfig(num_workers, use_gpu, resources_per_worker={"CPU": cpus_per_worker})
    RunConfig(storage_path, name, CheckpointConfig(num_to_keep), FailureConfig(max_failures))

A run lives in `storage_path/name`: a local or shared path, or a URI (s3://, gs://). Ray keeps its
checkpoints there; so does this module, through `nanovlm.storage` (pyarrow.fs, as Ray), for the
run state (`nanovlm_run.json`: config and MLflow run id) and the final summary that rank 0 writes
(`nanovlm_summary.json`): the driver reads nothing back from its own disk. Running again with
the same name resumes the run from its latest checkpoint, in the same MLflow run (Train V2
reloads the checkpoint manager's snapshot; `TorchTrainer.restore` is gone).
`resume_from` (a training checkpoint, e.g. a run's output dir) starts a new Ray run from that
checkpoint instead; either way the MLflow run continues. A worker group that Ray restarts after
a failure resumes from Ray's latest checkpoint, which takes precedence over `resume_from`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from nanovlm import storage as run_storage
from nanovlm import tracking
from nanovlm.config import ConfigError, TrainConfig, VLMConfig, configs_to_dict
from nanovlm.training import checkpointing

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "nanovlm_run.json"        # in storage_path/name: config + MLflow run id, for resuming
SUMMARY_FILE = "nanovlm_summary.json"      # in storage_path/name: rank 0's summary of the finished run
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Train V2 writes it once a checkpoint exists
AUTOSCALING_ENV = "NANOVLM_AUTOSCALING"     # "1": the cluster may add nodes, do not refuse a short cluster


class ClusterResourceError(RuntimeError):
    """The Ray cluster cannot host the requested workers."""


class ClusterUnreachableError(ClusterResourceError):
    """The Ray cluster at the address found does not answer (`cluster.ensure_ray`). A cluster that
    cannot be reached cannot host the workers either: handled as a ClusterResourceError."""


# ==================================================================== configuration

def default_storage_path() -> str:
    return str(tracking.nanovlm_home() / "ray_results")


def resolve_storage_path(storage_path: Optional[str]) -> str:
    """An absolute local path, or a URI (s3://, gs://: shared storage for multi-node clusters) as given."""
    return run_storage.resolve(storage_path or default_storage_path())


def check_device_settings(train_cfg: TrainConfig) -> None:
    """Refuse a GPU request that contradicts `device` (Ray gives GPUs only to use_gpu workers)."""
    if train_cfg.use_gpu and train_cfg.device == "cpu":
        raise ConfigError("use_gpu=True but device='cpu'; set device='auto' (or 'cuda') to train on GPUs.")
    if not train_cfg.use_gpu and train_cfg.device == "cuda":
        raise ConfigError("device='cuda' needs use_gpu=True (--gpu) so that Ray gives each worker a GPU.")


def absolute_output_dir(train_cfg: TrainConfig) -> TrainConfig:
    """`output_dir` made absolute, so every worker writes where the driver meant rather than
    under Ray's per-run working directory."""
    return train_cfg.replace(output_dir=str(Path(train_cfg.output_dir).expanduser().resolve()))


def worker_config(vlm_cfg: VLMConfig, train_cfg: TrainConfig, *, preset_name: Optional[str] = None,
                  tracking_spec: Optional[dict[str, Any]] = None, resume_from: Optional[str] = None,
                  run_location: Optional[str] = None) -> dict[str, Any]:
    """The `train_loop_config` of `train_worker`: configs_to_dict plus run metadata
    (`run_location`: storage_path/name, where rank 0 writes the summary)."""
    return {**configs_to_dict(vlm_cfg, train_cfg),
            "run": {"preset": preset_name, "tracking": tracking_spec, "resume_from": resume_from,
                    "location": run_location}}


def build_trainer(vlm_cfg: VLMConfig, train_cfg: TrainConfig, *, run_name: Optional[str] = None,
                  preset_name: Optional[str] = None, tracking_spec: Optional[dict[str, Any]] = None,
                  callbacks: Sequence[Any] = (), storage_path: Optional[str] = None,
                  worker_env: Optional[dict[str, str]] = None, resume_from: Optional[str | Path] = None,
                  checkpoint_score: Optional[tuple[str, str]] = None):
    """A `TorchTrainer` for configs already validated (`run_training`, a Tune trial's
    `trial_configs`); each worker validates them again as they enter its process.

    tracking_spec: None turns MLflow off in the workers; otherwise a dict with any of `uri`,
    `experiment_name`, `run_id` (log into an existing run), `parent_run_id` (create a nested
    run, e.g. one per Tune trial), `run_name`, `tags`.
    callbacks: extra Train callbacks, e.g. `ray.tune.integration.ray_train.TuneReportCallback()`.
    worker_env: environment variables for the workers (e.g. NCCL_DEBUG, NANOVLM_KILL_RANK_AT_STEP).
    resume_from: a training checkpoint the workers start from, unless Ray has a checkpoint of
    this run (on a multi-node cluster, a path every node sees).
    checkpoint_score: (metric, "min" | "max"): keep the best `checkpoints_to_keep` checkpoints by
    that reported metric (and always the latest, to resume from) instead of the latest ones.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from nanovlm.distributed.rendezvous import LoopbackTorchConfig
    from nanovlm.distributed.worker import train_worker

    train_cfg = absolute_output_dir(train_cfg)
    storage = resolve_storage_path(storage_path or train_cfg.storage_path)
    name = run_name or tracking.default_run_name(preset_name)
    resources = {"CPU": train_cfg.cpus_per_worker, **train_cfg.custom_worker_resources()}
    if train_cfg.use_gpu:
        resources["GPU"] = 1
    score_metric, score_order = checkpoint_score or (None, "max")
    return TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config=worker_config(vlm_cfg, train_cfg, preset_name=preset_name, tracking_spec=tracking_spec,
                                        resume_from=str(Path(resume_from).resolve()) if resume_from else None,
                                        run_location=run_dir(storage, name)),
        torch_config=LoopbackTorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep,
                                               checkpoint_score_attribute=score_metric, checkpoint_score_order=score_order),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            callbacks=list(callbacks) or None,
            worker_runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
        ),
    )


# ==================================================================== the cluster

def check_cluster_resources(train_cfg: TrainConfig, resources: Optional[dict[str, float]] = None) -> None:
    """Refuse a run the cluster cannot host (it would wait forever for its placement group).

    Skipped when `NANOVLM_AUTOSCALING=1` (an autoscaling cluster adds nodes on demand)."""
    if os.environ.get(AUTOSCALING_ENV) == "1":
        return
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    need_cpu = train_cfg.num_workers * train_cfg.cpus_per_worker
    have_cpu = float(resources.get("CPU", 0))
    problems = []
    if need_cpu > have_cpu + 1e-9:
        fit = int(have_cpu // train_cfg.cpus_per_worker)
        problems.append(
            f"num_workers={train_cfg.num_workers} x cpus_per_worker={train_cfg.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs but the cluster has {have_cpu:g}. Use --num-workers {max(fit, 1)}"
            f"{'' if fit else ' with a smaller cpus_per_worker'}, lower cpus_per_worker "
            f"(--set cpus_per_worker={have_cpu / train_cfg.num_workers:g}), or add nodes.")
    if train_cfg.use_gpu:
        have_gpu = float(resources.get("GPU", 0))
        if train_cfg.num_workers > have_gpu:
            problems.append(f"num_workers={train_cfg.num_workers} with --gpu needs {train_cfg.num_workers} GPUs "
                            f"(one per worker) but the cluster has {have_gpu:g}.")
    for name, amount in train_cfg.custom_worker_resources().items():
        have = float(resources.get(name, 0))
        if train_cfg.num_workers * amount > have + 1e-9:
            problems.append(f"worker_resources asks {amount:g} {name!r} per worker, {train_cfg.num_workers * amount:g} "
                            f"in all, but the cluster's nodes offer {have:g} (`ray start --resources "
                            f"'{{\"{name}\": N}}'` gives a node some).")
    if problems:
        raise ClusterResourceError(" ".join(problems) + f" (Set {AUTOSCALING_ENV}=1 if the cluster autoscales.)")


# ==================================================================== runs

def run_dir(storage: str, name: str) -> str:
    """The run's location, `storage/name`: a path, or a URI (a string either way)."""
    return run_storage.join(run_storage.resolve(storage), name)


def can_resume(storage: str, name: str) -> bool:
    """True when `storage/name` holds a run with at least one checkpoint."""
    return run_storage.exists(run_storage.join(run_dir(storage, name), SNAPSHOT_FILE))


def _load_run_state(storage: str, name: str) -> Optional[dict[str, Any]]:
    return run_storage.read_json(run_storage.join(run_dir(storage, name), RUN_STATE_FILE))


def _save_run_state(storage: str, name: str, state: dict[str, Any]) -> None:
    run_storage.write_json(run_storage.join(run_dir(storage, name), RUN_STATE_FILE), state)


def _worker_input_error(failure: Exception) -> Optional[Exception]:
    """The lowest failing rank's own error when it is bad input or a diverged run (what the same
    run raises in one process), so that both routes report it alike; None for anything else."""
    from nanovlm.data.local_files import DatasetError
    from nanovlm.models.checkpoint import CheckpointError
    from nanovlm.training.loop import NonFiniteLossError

    errors = getattr(failure, "worker_failures", None) or {}
    first = errors[min(errors)] if errors else None
    return first if isinstance(first, (ConfigError, DatasetError, CheckpointError, NonFiniteLossError)) else None


def run_training(vlm_cfg: VLMConfig, train_cfg: TrainConfig, *, preset_name: Optional[str] = None,
                 run_name: Optional[str] = None, tracking_uri: Optional[str] = None,
                 track: bool = True, worker_env: Optional[dict[str, str]] = None,
                 resume_from: Optional[str | Path] = None) -> dict[str, Any]:
    """Train on Ray Train and return a summary dict.

    Order matters: configs, the checkpoint to resume, then the MLflow store, then the cluster's
    resources, and only then workers. `run_name` of an existing run in the storage path resumes
    it from its latest checkpoint; `resume_from` (a training checkpoint or a run's output dir)
    starts from that checkpoint. Either way the MLflow run it logged to continues."""
    import ray.train

    from nanovlm.distributed.cluster import ensure_ray

    vlm_cfg.validate()
    train_cfg.validate()
    check_device_settings(train_cfg)
    train_cfg = absolute_output_dir(train_cfg)
    checkpoint = checkpointing.resolve_checkpoint(resume_from).resolve() if resume_from is not None else None
    if checkpoint is not None:
        checkpointing.check_resumable(vlm_cfg, checkpoint)
    storage = resolve_storage_path(train_cfg.storage_path)
    checkpointing.check_output_dir(train_cfg.output_dir)
    run_storage.check_writable(storage, f"storage_path={storage!r}", "set another (--set storage_path=DIR or URI)")
    name = run_name or tracking.default_run_name(preset_name)
    uri = tracking.absolute_uri(tracking_uri or tracking.default_tracking_uri()) if track else None
    if uri is not None:
        tracking.check_tracking_store(uri)

    ensure_ray()
    check_cluster_resources(train_cfg)

    previous = _load_run_state(storage, name)
    resuming = previous is not None and can_resume(storage, name)
    if resuming:
        checkpointing.check_same_model(vlm_cfg, previous.get("config", {}).get("vlm", {}),
                                       source=f"Run {name!r} was started with",
                                       fix="Resume it with the same model settings, or choose a new --run-name.")
        logger.info("Resuming run %r from %s", name, run_dir(storage, name))
    config = configs_to_dict(vlm_cfg, train_cfg)
    spec = None
    if uri is not None:
        run_id = previous.get("mlflow_run_id") if previous else None
        if run_id is None and checkpoint is not None:
            run_id = tracking.recorded_run_id(checkpoint, uri)
        device_type = "cuda" if train_cfg.use_gpu else "cpu"
        tags = tracking.run_tags(config, preset=preset_name, world_size=train_cfg.num_workers,
                                 device_type=device_type, extra={"ray_run_name": name, "ray_storage": storage})
        run_id = tracking.start_training_run(config, uri=uri, run_name=name, tags=tags, run_id=run_id)
        spec = {"uri": uri, "run_id": run_id, "experiment_name": train_cfg.experiment_name}
    _save_run_state(storage, name, {"config": config, "preset": preset_name,
                                    "mlflow_run_id": spec and spec["run_id"], "tracking_uri": uri})

    trainer = build_trainer(vlm_cfg, train_cfg, run_name=name, preset_name=preset_name,
                            tracking_spec=spec, storage_path=storage, worker_env=worker_env, resume_from=checkpoint)
    status = "FAILED"
    pending = None
    try:
        result = trainer.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except ray.train.TrainingFailedError as exc:
        input_error = _worker_input_error(exc)
        if input_error is not None:
            raise input_error from exc
        raise RuntimeError(
            f"Training run {name!r} failed: {exc}. Its checkpoints are in {run_dir(storage, name)}; run again "
            f"with --run-name {name} to resume from the latest one.") from exc
    finally:
        if spec is not None:
            pending = end_tracked_run(spec, train_cfg.output_dir, status)

    # rank 0's, through the storage: rank 0 may have run on another node
    summary: dict[str, Any] = run_storage.read_json(run_storage.join(run_dir(storage, name), SUMMARY_FILE)) or {}
    summary.update({
        "run_name": name,
        "storage_path": storage,
        "ray_path": run_dir(storage, name),
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        # a URI on object storage (Ray's own path drops the scheme)
        "ray_checkpoint": (run_storage.join(run_dir(storage, name), run_storage.basename(result.checkpoint.path))
                           if result.checkpoint else None),
        "mlflow_run_id": spec and spec["run_id"],
        "tracking_uri": tracking.masked_uri(uri),  # printed by the CLI
        "tracking_pending": str(pending) if pending else None,
        "resumed": resuming,
    })
    return summary


def end_tracked_run(spec: dict[str, Any], output_dir: str, status: str) -> Optional[Path]:
    """End the driver's MLflow run with `status` once the workers are gone, sending first what
    rank 0's journal still holds (a rank 0 that was killed, or gave up on a store that was
    down). Returns the journal's directory if the store did not take everything (the status
    included), else None: the run is never left RUNNING without a journal that says how it ended."""
    from nanovlm.tracking_journal import JournaledRun

    try:
        run = JournaledRun(spec["run_id"], spec["uri"], output_dir)
    except OSError as exc:  # output_dir unusable here (another node's path?): end the run directly
        logger.warning("Cannot open the MLflow journal in %s (%s); ending run %s directly.", output_dir, exc,
                       spec["run_id"])
        tracking.TrackingRun(spec["run_id"], spec["uri"]).end(status)
        return None
    return run.close(status)
