"""A Tune sweep over a local parquet dataset checks its rows once, not once per trial: the scan is
kept on disk (`nanovlm.data.scan_cache`) and every later trial reads it (`data_rows_scanned`)."""

import os
import shutil
import tempfile

import pytest
import yaml

from data_files import write_parquet
from nanovlm import tracking

ROWS = 120


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_trials_of_a_sweep_do_not_rescan_a_local_dataset(tmp_path):
    import ray

    from nanovlm.distributed.cluster import start_local_ray
    from nanovlm.sweep.runner import run_sweep
    from nanovlm.sweep.space import load_space

    dataset = write_parquet(tmp_path / "data" / "rows.parquet", ROWS)
    space = {
        "name": "data", "preset": "tiny",
        "overrides": {"train_dataset_path": str(dataset), "max_training_steps": 2, "eval_interval": 2,
                      "eval_samples": 2, "batch_size": 4, "checkpoint_interval": 2, "max_new_tokens_eval": 2,
                      "vit_n_blocks": 1, "lm_n_blocks": 1},
        "space": {"lr_mp": {"grid": [1e-3, 2e-3]}},
        "metric": "val_loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.4, "driver_cpus": 0.2},
        "time_budget_s": 300,
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: socket paths are length-limited
    start_local_ray(num_cpus=2, temp_dir=temp_dir)   # a private cluster, never another process's
    try:
        outcome = run_sweep(load_space(tmp_path / "space.yaml"), storage_path=tmp_path / "sweeps")
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        shutil.rmtree(temp_dir, ignore_errors=True)

    client = tracking._client(outcome.tracking_uri)
    experiment = client.get_run(outcome.parent_run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(children) == 2 and all(r.data.tags["nanovlm.status"] == "completed" for r in children)
    scanned = sorted(r.data.metrics["data_rows_scanned"] for r in children)
    # the first trial checks every row (training and validation split); the others read its scan
    assert scanned == [0, ROWS], scanned
    assert all(r.data.metrics["data_rows_streamed"] == 0 for r in children)
