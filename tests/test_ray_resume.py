"""`nanovlm train --resume DIR --num-workers 2` continues a Ray Train run after its checkpoint, on
the trajectory of an uninterrupted run, in the same MLflow run; a worker that fails during the
resumed run restarts from Ray's own latest checkpoint, not from DIR.

Three `fit`s of 2 workers: an uninterrupted 2N-step reference, a run stopped at its step-N
checkpoint, and that run resumed to 2N, whose rank 1 kills itself after step KILL_STEP (a
checkpoint every N/2 steps, so Ray holds a newer one than DIR by then). The learning rate is
constant (no warmup, min_lr_ratio 1): the schedule then does not depend on max_training_steps,
so the first N steps of an N-step and a 2N-step run are the same maths, and with the data
position and RNG from the checkpoint so are the next N.
"""

import hashlib
import json
import shutil
import tempfile
import time

import pytest
import torch

from nanovlm import tracking
from nanovlm.cli import main
from nanovlm.distributed.worker import KILL_ENV
from nanovlm.training.checkpointing import list_checkpoints
from training_configs import set_arguments

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N = 4
KILL_STEP = N + N // 2 + 1   # after the resumed run's first checkpoint (step N + N/2)
EXPERIMENT = "ray-resume"
# constant learning rate; an evaluation every N steps, a checkpoint every N/2, one restart allowed
CHANGES = dict(eval_interval=N, checkpoint_interval=N // 2, checkpoints_to_keep=4, log_interval=1,
               report_interval=N // 2, warmup_ratio=0.0, min_lr_ratio=1.0, cpus_per_worker=1.0, max_failures=1)


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
    # Every worker of this cluster gets the kill switch; it fires once per output_dir, and the
    # reference's output_dir already holds the marker that says it fired there.
    (tmp / "reference").mkdir()
    (tmp / "reference" / f".killed-rank1-step{KILL_STEP}").touch()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # cheap reports (see notes)
        patch.setenv(KILL_ENV, f"1:{KILL_STEP}")
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


def _loss_history(uri, run):
    return sorted(tracking._client(uri).get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp)


def test_resume_continues_after_the_checkpoint_without_overwriting_it(ray_runs):
    uri, tmp, before, after, resume_start_ms = ray_runs
    assert after == before  # the step-N checkpoint is as the first part left it
    assert [p.name for p in list_checkpoints(tmp / "run")] == [f"step_{s:06d}" for s in range(N // 2, 2 * N + 1, N // 2)]
    history = _loss_history(uri, _runs_by_name(uri)["first-part"])
    assert {m.step for m in history} == set(range(1, 2 * N + 1))
    assert min(m.step for m in history if m.timestamp >= resume_start_ms) == N + 1


def test_a_worker_failure_after_the_resume_restarts_from_rays_latest_checkpoint(ray_runs):
    uri, tmp, *_ = ray_runs
    summary = json.loads((tmp / "run" / "summary.json").read_text())  # the restarted worker group's
    assert summary["resumed_from"].startswith(str(tmp / "ray_results"))  # Ray's copy of step N + N/2
    assert summary["resumed_from"].endswith(f"step_{N + N // 2:06d}")
    assert summary["steps"] == 2 * N and summary["steps_this_run"] == N - N // 2
    steps = [m.step for m in _loss_history(uri, _runs_by_name(uri)["first-part"])]
    assert all(steps.count(s) == 1 for s in range(1, N + N // 2 + 1))  # nothing before Ray's checkpoint re-ran


def test_resumed_losses_equal_the_uninterrupted_run(ray_runs):
    uri, *_ = ray_runs
    runs = _runs_by_name(uri)
    # the last value of each step: a step re-run after the restart overwrites its first try
    resumed, reference = ({m.step: m.value for m in _loss_history(uri, runs[name])} for name in ("first-part", "reference"))
    steps = list(range(1, 2 * N + 1))
    assert [resumed[s] for s in steps] == pytest.approx([reference[s] for s in steps], rel=1e-4, abs=1e-6)


def test_the_resumed_run_logs_into_the_same_mlflow_run(ray_runs, tmp_path):
    uri, *_ = ray_runs
    runs = _runs_by_name(uri)
    assert set(runs) == {"reference", "first-part"}  # the resume made no run of its own
    run = runs["first-part"]
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags[tracking.RESUMED_WITH_TAG]) == {"max_training_steps": str(2 * N)}
    assert run.data.tags["world_size"] == "2" and run.data.tags["mlflow.user"]
    client = tracking._client(uri)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == {N, 2 * N}
    state = client.download_artifacts(run.info.run_id, "checkpoint/train_state.pt", str(tmp_path))
    assert torch.load(state, weights_only=True)["step"] == 2 * N  # the final checkpoint replaced the first
