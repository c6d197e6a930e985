"""Streamed data on Ray Train: two workers each read their own rows, and the run's data counts in
summary.json are the sums over the workers."""

import json
import shutil
import tempfile

import pytest

from data_files import write_parquet
from nanovlm.cli import main
from training_configs import set_arguments


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ray_workers_stream_their_own_rows_and_sum_the_counts(tmp_path):
    import ray

    dataset = write_parquet(tmp_path / "rows.parquet", 640, row_group_size=64)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    try:
        code = main(["train", "--dataset", str(dataset), "--num-workers", "2", *set_arguments(),
                     "--set", "cpus_per_worker=0.5", "--set", "val_ratio=0", "--set", "stream_dataset=true",
                     "--set", f"storage_path={tmp_path / 'ray_results'}", "--max-steps", "3", "--no-tracking",
                     "--output", str(tmp_path / "out")])
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert code == 0
    data = json.loads((tmp_path / "out" / "summary.json").read_text())["data"]
    # each worker: its first usable row at start-up, then one window of 4 batches of 4 rows
    assert data["streaming"] and data["rows_scanned"] == 2 and data["rows_streamed"] == 2 * 16, data
    assert data["skipped_total"] == 0
