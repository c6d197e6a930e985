"""`nanovlm train --resume DIR --num-workers 2` continues a Ray Train run after its checkpoint, on
the trajectory of an uninterrupted run, in the same MLflow run.

Three `fit`s of 2 workers: an uninterrupted 2N-step reference, a run stopped at its step-N
checkpoint, and that run resumed to 2N. The learning rate is constant (no warmup, min_lr_ratio
1): the schedule then does not depend on max_training_steps, so the first N steps of an N-step
and a 2N-step run are the same maths, and with the data position and RNG from the checkpoint so
are the next N.
"""

import hashlib
import shutil
import tempfile
import time

import pytest
import torch

from nanovlm import tracking
from nanovlm.cli import main
from nanovlm.training.checkpointing import list_checkpoints
from training_configs import set_arguments

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N = 3
EXPERIMENT = "ray-resume"
# constant learning rate; an evaluation and a checkpoint every N steps
CHANGES = dict(eval_interval=N, checkpoint_interval=N, checkpoints_to_keep=4, log_interval=1, report_interval=N,
               warmup_ratio=0.0, min_lr_ratio=1.0, cpus_per_worker=1.0)


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory):
    """(tracking uri, the runs' directory, the step-N checkpoint's digest before and after the resume, the
    resume's start time in ms)."""
    import ray

    from nanovlm.data import get_tokenizer

    get_tokenizer("shapes-bpe-512", {"image_token": "<|image|>"})  # train + cache it once, before the workers
    tmp = tmp_path_factory.mktemp("ray-resume")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sets = set_arguments(**CHANGES, storage_path=tmp / "ray_results")
    common = ["--num-workers", "2", "--experiment", EXPERIMENT]
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # cheap reports (see notes)
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
        try:
            assert main(["train", "--preset", "tiny", *sets, *common, "--max-steps", str(2 * N),
                         "--output", str(tmp / "reference"), "--run-name", "reference"]) == 0
            assert main(["train", "--preset", "tiny", *sets, *common, "--max-steps", str(N),
                         "--output", str(tmp / "run"), "--run-name", "first-part"]) == 0
            step_n = tmp / "run" / "checkpoints" / f"step_{N:06d}"
            before = _digest(step_n)
            resume_start_ms = int(time.time() * 1000)
            assert main(["train", "--resume", str(tmp / "run"), "--num-workers", "2", "--max-steps", str(2 * N)]) == 0
            after = _digest(step_n)
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    return uri, tmp, before, after, resume_start_ms


def _digest(checkpoint):
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def _runs_by_name(uri):
    return {run.info.run_name: run for run in tracking.iter_runs(EXPERIMENT, uri)}


def test_resume_continues_after_the_checkpoint_without_overwriting_it(ray_runs):
    uri, tmp, before, after, resume_start_ms = ray_runs
    assert after == before  # the step-N checkpoint is as the first part left it
    assert [p.name for p in list_checkpoints(tmp / "run")] == [f"step_{N:06d}", f"step_{2 * N:06d}"]

    run = _runs_by_name(uri)["first-part"]
    history = tracking._client(uri).get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * N + 1))  # each step logged once
    assert min(m.step for m in history if m.timestamp >= resume_start_ms) == N + 1


def test_resumed_losses_equal_the_uninterrupted_run(ray_runs):
    uri, *_ = ray_runs
    runs = _runs_by_name(uri)
    client = tracking._client(uri)
    resumed, reference = ({m.step: m.value for m in client.get_metric_history(runs[name].info.run_id, "loss")}
                          for name in ("first-part", "reference"))
    steps = list(range(1, 2 * N + 1))
    assert [resumed[s] for s in steps] == pytest.approx([reference[s] for s in steps], rel=1e-4, abs=1e-6)


def test_the_resumed_run_logs_into_the_same_mlflow_run(ray_runs, tmp_path):
    uri, *_ = ray_runs
    runs = _runs_by_name(uri)
    assert set(runs) == {"reference", "first-part"}  # the resume made no run of its own
    run = runs["first-part"]
    assert run.info.status == "FINISHED"
    assert '"max_training_steps": "6"' in run.data.tags[tracking.RESUMED_WITH_TAG]
    assert run.data.tags["world_size"] == "2" and run.data.tags["mlflow.user"]
    client = tracking._client(uri)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == {N, 2 * N}
    state = client.download_artifacts(run.info.run_id, "checkpoint/train_state.pt", str(tmp_path))
    assert torch.load(state, weights_only=True)["step"] == 2 * N  # the final checkpoint replaced the first
