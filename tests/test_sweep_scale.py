"""Sweeps at scale on a private 2-CPU Ray cluster and a real `mlflow server` (SQLite behind it,
artifacts served by it into a bucket of a local S3 server, moto's): two trials writing through the server at once lose no run and no
step, rank 0 records system metrics, `search: optuna`, `scheduler: pbt` exploiting through a
checkpoint, the best checkpoints kept, and a benchmark grid measuring its points in parallel.

Starts Ray, an MLflow server and moto: run under `flock /tmp/nanovlm-ray.lock`."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanovlm import tracking
from nanovlm.commands.dashboard import MlflowServer
from nanovlm.sweep.results import TrialRecord

pytestmark = pytest.mark.timeout(600)

FIXED = {
    "max_training_steps": 4, "eval_interval": 2, "checkpoint_interval": 2, "eval_samples": 8, "batch_size": 4,
    "report_interval": 1, "log_interval": 1, "max_new_tokens_eval": 4, "shapes_train_size": 64,
    "shapes_eval_size": 16, "vit_n_blocks": 1, "lm_n_blocks": 1, "system_metrics_interval": 0.5,
}
RESOURCES = {"workers_per_trial": 1, "cpus_per_worker": 0.4, "driver_cpus": 0.2}


def _spec(name, **changes):
    from nanovlm.sweep.space import parse_space

    data = {"name": name, "preset": "tiny", "overrides": {**FIXED, "experiment_name": name},
            "metric": "val_loss", "mode": "min", "scheduler": "none", "max_concurrent_trials": 2,
            "resources": RESOURCES, "time_budget_s": 300, **changes}
    return parse_space(data, where=name)


# ----------------------------------------------------------------------------- without Ray

def test_a_trials_best_checkpoint_is_its_best_scored_one_that_still_exists(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step_{step}").mkdir()
    history = [{"step": 2, "val_loss": 1.5, "checkpoint_path": str(tmp_path / "step_2")},
               {"step": 3, "loss": 1.0},
               {"step": 4, "val_loss": 1.2, "checkpoint_path": str(tmp_path / "step_4")},
               {"step": 5, "val_loss": 1.1, "checkpoint_path": str(tmp_path / "step_5")},  # deleted by Train
               {"step": 6, "val_loss": 1.3, "checkpoint_path": str(tmp_path / "step_6")}]
    record = TrialRecord("t1", {}, "completed", history=history)
    assert record.best_checkpoint("val_loss", "min") == {"path": str(tmp_path / "step_4"), "step": 4,
                                                         "val_loss": 1.2}
    assert record.best_checkpoint("val_loss", "max")["step"] == 2
    assert TrialRecord("t2", {}, "completed", history=[{"step": 1, "loss": 1.0}]).best_checkpoint("loss", "min") is None


# ----------------------------------------------------------------------------- a cluster and a server

def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket():
    """moto's S3 server on 127.0.0.1 with a bucket `mlflow`: the tracking server's artifact store.
    The AWS variables point boto3 (the server's S3 client) at it, in this process's environment
    while the module runs, which the server inherits."""
    port = _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert moto.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
                    time.sleep(0.2)
            import boto3

            boto3.client("s3").create_bucket(Bucket="mlflow")
            yield "mlflow"
        finally:
            moto.terminate()
            moto.wait(timeout=10)


def _s3_keys(bucket):
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_bucket):
    import ray

    from nanovlm.distributed.cluster import start_local_ray

    root = tmp_path_factory.mktemp("scale")
    db = root / "server" / "mlflow.db"
    tracking.check_tracking_store(f"sqlite:///{db}")  # tables first: the server starts faster
    server = MlflowServer(f"sqlite:///{db}", _free_port(), artifacts=f"s3://{s3_bucket}/artifacts")
    server.start()
    start_local_ray(num_cpus=2, temp_dir=str(root / "ray"))
    try:
        yield {"root": root, "uri": server.address, "bucket": s3_bucket}
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        server.stop()


def _children(uri, outcome):
    client = tracking._client(uri)
    parent = client.get_run(outcome.parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")


@pytest.fixture(scope="module")
def optuna_sweep(cluster):
    from nanovlm.sweep.runner import run_sweep

    # mode max on val_loss, which falls as the model learns: the best checkpoint is the first one,
    # not the latest, and Train (keeping 1 by the metric, and the latest) deletes the one between.
    spec = _spec("scale-optuna", search={"type": "optuna", "startup_trials": 1}, num_samples=2, mode="max",
                 overrides={**FIXED, "experiment_name": "scale-optuna", "max_training_steps": 6,
                            "checkpoints_to_keep": 1},
                 space={"lr_mp": {"loguniform": [1.0e-4, 1.0e-2]}, "mp_pixel_shuffle_factor": {"choice": [1, 2]}})
    return run_sweep(spec, storage_path=cluster["root"] / "sweeps", tracking_uri=cluster["uri"])


@pytest.mark.slow
def test_two_trials_writing_through_the_server_at_once_lose_no_step(cluster, optuna_sweep):
    client = tracking._client(cluster["uri"])
    children = _children(cluster["uri"], optuna_sweep)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for run in children:
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]  # every step, once
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [2, 4, 6]
    first, second = (r.info for r in children)
    assert first.start_time < second.end_time and second.start_time < first.end_time  # open at the same time
    for run in children:  # artifacts went through the server (mlflow-artifacts:) into its bucket
        assert {"checkpoint", "summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    keys = _s3_keys(cluster["bucket"])
    for run in children:
        assert any(k.startswith("artifacts/") and run.info.run_id in k and k.endswith("summary.json") for k in keys)
        assert any(run.info.run_id in k and "/checkpoint/" in k and k.endswith(".safetensors") for k in keys)


@pytest.mark.slow
def test_rank_0_records_system_metrics_in_its_run(cluster, optuna_sweep):
    client = tracking._client(cluster["uri"])
    for run in _children(cluster["uri"], optuna_sweep):
        cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert cpu and all(0 <= m.value <= 100 for m in cpu)
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
        assert run.data.metrics["system/process_memory_rss_megabytes"] > 50  # a process with torch in it


@pytest.mark.slow
def test_optuna_samples_every_trial_inside_the_space(cluster, optuna_sweep):
    parent = tracking._client(cluster["uri"]).get_run(optuna_sweep.parent_run_id)
    assert parent.data.params["search"] == "optuna"
    configs = [r.config for r in optuna_sweep.records]
    assert len(configs) == 2 and all(1e-4 <= c["lr_mp"] <= 1e-2 and c["mp_pixel_shuffle_factor"] in (1, 2)
                                     for c in configs)
    assert configs[0] != configs[1]


@pytest.mark.slow
def test_the_best_checkpoint_of_each_trial_is_kept_and_the_sweeps_best_is_written_out(optuna_sweep):
    from nanovlm.training.checkpointing import TRAIN_STATE_FILE

    data = json.loads(optuna_sweep.files["best_checkpoint.json"].read_text())
    assert set(data["trials"]) == {r.trial_id for r in optuna_sweep.records}
    for record in optuna_sweep.records:
        reported = {h["step"]: h for h in record.history if "checkpoint_path" in h}
        assert sorted(reported) == [2, 4, 6]
        best_step = max(reported, key=lambda step: reported[step]["val_loss"])  # mode max
        assert best_step < 6  # val_loss fell: the best is not the latest
        chosen = data["trials"][record.trial_id]
        assert chosen["step"] == best_step and chosen["path"] == reported[best_step]["checkpoint_path"]
        kept = {step for step, h in reported.items() if Path(h["checkpoint_path"], TRAIN_STATE_FILE).exists()}
        assert kept == {best_step, 6}  # the best by the metric and the latest; the other one deleted
    best = data["best"]
    assert best["trial_id"] == optuna_sweep.best.trial_id
    assert optuna_sweep.best.final("val_loss") == max(r.final("val_loss") for r in optuna_sweep.records)
    copy = Path(best["copy"])
    assert copy.parent == optuna_sweep.files["results.csv"].parent
    assert (copy / "model.safetensors").read_bytes() == (Path(best["path"]) / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def pbt_sweep(cluster):
    from nanovlm.sweep.runner import run_sweep

    # The language model learns at 3e-3 and barely at 1e-6 (the ViT frozen): the weak trial's
    # val_loss stays behind by far, so at a perturbation after both have one it copies the other.
    # 20 steps keep the two trials training at once although their TorchTrainers start apart.
    spec = _spec("scale-pbt", overrides={**FIXED, "experiment_name": "scale-pbt", "max_training_steps": 20,
                                         "lr_vision_backbone": 0.0, "lr_mp": 1.0e-3, "system_metrics_interval": 0},
                 space={"lr_language_backbone": {"grid": [1.0e-6, 3.0e-3]}},
                 scheduler={"type": "pbt", "perturbation_interval": 2, "resample_probability": 0.0})
    return run_sweep(spec, storage_path=cluster["root"] / "sweeps", tracking_uri=cluster["uri"])


@pytest.mark.slow
def test_pbt_restarts_a_weak_trial_from_a_strong_trials_checkpoint_with_a_mutated_rate(cluster, pbt_sweep):
    state = json.loads((pbt_sweep.sweep_dir / "nanovlm_sweep.json").read_text())["trials"]
    sampled = {r.data.tags["nanovlm.trial_id"]: json.loads(r.data.tags["nanovlm.varied"])["lr_language_backbone"]
               for r in _children(cluster["uri"], pbt_sweep)}
    weak = next(tid for tid, lr in sampled.items() if lr == 1.0e-6)
    strong = next(tid for tid, lr in sampled.items() if lr == 3.0e-3)
    assert state[weak]["explored"], state
    # The first exploit of the sweep: the weak trial continues from the strong one's Train
    # checkpoint with the strong one's rate x0.8 or x1.2 (PBT's perturbation; resampling off).
    first = state[weak]["explored"][0]
    assert first["from_trial"] == strong and Path(first["from_checkpoint"]).parent.name == strong
    new_lr = first["config"]["lr_language_backbone"]
    assert new_lr in (pytest.approx(3.0e-3 * 0.8), pytest.approx(3.0e-3 * 1.2))
    assert not state[strong]["explored"]  # the strong trial kept its own rate

    # Its last Train run started from a copy of the strong trial's checkpoint (the one PBT chose,
    # or that run's newer one when Train had deleted it), counting on from the step after it.
    last = state[weak]["explored"][-1]
    assert last["from_trial"] == strong
    summary = json.loads((pbt_sweep.sweep_dir / "trials" / weak / "summary.json").read_text())
    start = Path(summary["resumed_from"])
    assert start.parent.parent.name == "pbt_start" and start.parent.name == strong
    start_step = int(start.name.split("_")[1])
    assert start_step >= int(Path(last["from_checkpoint"]).name.split("_")[1])
    assert summary["steps"] == 20 and summary["steps_this_run"] == 20 - start_step
    history = [h for r in pbt_sweep.records if r.trial_id == weak for h in r.history if "step" in h]
    restart = max(i for i, h in enumerate(history) if h["step"] == start_step + 1)  # Tune may keep earlier reports
    weak_steps = {h["step"]: h for h in history[restart:]}
    assert sorted(weak_steps) == list(range(start_step + 1, 21))

    # The restored optimizer runs at the mutated rate: at every step, the strong trial's schedule
    # scaled by the new rate / 3e-3.
    strong_steps = {h["step"]: h for r in pbt_sweep.records if r.trial_id == strong for h in r.history if "step" in h}
    assert sorted(strong_steps) == list(range(1, 21))
    scale = last["config"]["lr_language_backbone"] / 3.0e-3
    assert scale in (pytest.approx(0.8), pytest.approx(1.2))
    for step, report in weak_steps.items():
        assert report["lr_language_backbone"] == pytest.approx(strong_steps[step]["lr_language_backbone"] * scale)
    # ...on the strong trial's weights: two steps later the two losses are close (a rate x0.8 or
    # x1.2 apart), where the weak trial's own weights (a rate of 1e-6) were far behind.
    evaluated = start_step + 2
    assert weak_steps[evaluated]["val_loss"] == pytest.approx(strong_steps[evaluated]["val_loss"], rel=0.1)
    assert all(r.status == "completed" for r in pbt_sweep.records)


@pytest.mark.slow
def test_a_benchmark_grid_measures_its_points_in_parallel(cluster, tmp_path):
    from nanovlm.bench.grid import parse_grid, run_grid

    grid = parse_grid({
        "name": "parallel", "preset": "tiny", "overrides": {"vit_img_size": 64, "lm_n_blocks": 1, "vit_n_blocks": 1},
        "grid": {"mp_pixel_shuffle_factor": [2, 4]},
        "measure": {"inference": {"batch_size": 1, "prompt_tokens": 8, "new_tokens": 32}, "training": {"text_tokens": 32},
                    "warmup": 1, "repeats": 5},
        "resources": {"cpu": 1}, "max_concurrent": 2})
    run = run_grid(grid, tmp_path, tracking=False)
    assert [r["status"] for r in run.rows] == ["ok", "ok"]
    trials = [json.loads(p.read_text())["trial"] for p in sorted((tmp_path / "cache").glob("*.json"))]
    assert len({t["trial_id"] for t in trials}) == 2  # one Tune trial per point...
    assert all(t["resources"] == {"CPU": 1.0} for t in trials)  # ...with the grid's resources each
    assert all(r["torch_threads"] == 1 for r in run.rows)  # and as many torch threads as its CPUs
    assert max(t["started"] for t in trials) < min(t["finished"] for t in trials)  # measured at the same time
