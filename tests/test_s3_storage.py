"""Training runs and sweeps whose storage is `s3://`, against an S3-compatible server on 127.0.0.1
(moto's, started here; tests/s3_server.py). Nothing a run or a sweep needs later is on a local disk:
checkpoints, the run state with its MLflow run id, the summary, the sweep's state, Tune's
experiment and the results are all objects in the bucket, read back through it.

One module-wide server and Ray cluster (with its dashboard, as sweeps need) serve three
workloads: a 2-worker run whose rank 0 SIGKILLs itself after step 3 (checkpoints every 2 steps,
one restart allowed), the same run resumed by name to one more step, and a two-trial sweep
resumed by its URI after its local directory was deleted. Run under `flock /tmp/nanovlm-ray.lock`.
"""

import json
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import yaml

from nanovlm import storage, tracking
from nanovlm.distributed.worker import KILL_ENV
from s3_server import s3_keys, s3_server
from training_configs import tiny_configs, tiny_sweep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BUCKET = "nanovlm"
RUNS, SWEEPS = f"s3://{BUCKET}/runs", f"s3://{BUCKET}/sweeps"
STEPS, KILL_STEP = 6, 3
SWEEP = tiny_sweep("s3", [0.001, 0.002], max_concurrent_trials=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(tmp dir, MLflow store) with the S3 server up and a private Ray cluster that inherited its
    environment (AWS_ENDPOINT_URL and the keys)."""
    import ray

    from nanovlm.distributed.cluster import start_local_ray

    from nanovlm.data import get_tokenizer

    get_tokenizer("shapes-bpe-512", {"image_token": "<|image|>"})  # train + cache it once, before the workers
    tmp = tmp_path_factory.mktemp("s3")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.check_tracking_store(store)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    with s3_server(BUCKET), pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # cheap reports (see notes)
        patch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        start_local_ray(num_cpus=2, temp_dir=temp_dir)
        try:
            yield tmp, store
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(cluster):
    """The killed-and-restarted run, then the same run resumed by name for one more step."""
    from nanovlm.distributed import run_training

    tmp, store = cluster
    vlm, train = tiny_configs(tmp / "out", max_training_steps=STEPS, checkpoint_interval=2, log_interval=1,
                              report_interval=2, num_workers=2, cpus_per_worker=0.5, max_failures=1,
                              storage_path=RUNS, experiment_name="s3-runs")
    killed = run_training(vlm, train, preset_name="tiny", run_name="on-s3", tracking_uri=store,
                          worker_env={KILL_ENV: f"0:{KILL_STEP}"})
    longer = run_training(vlm, train.replace(max_training_steps=STEPS + 1), preset_name="tiny", run_name="on-s3",
                          tracking_uri=store)
    return SimpleNamespace(killed=killed, longer=longer, store=store)


def _steps(store, run_id, key="loss"):
    return sorted(m.step for m in tracking._client(store).get_metric_history(run_id, key))


def test_a_run_keeps_its_checkpoints_state_and_summary_in_the_bucket(runs):
    keys = s3_keys(f"{RUNS}/on-s3/")
    for name in ("nanovlm_run.json", "nanovlm_summary.json", "checkpoint_manager_snapshot.json",
                 f"step_{STEPS + 1:06d}/model.safetensors", f"step_{STEPS + 1:06d}/train_state.pt"):
        assert f"runs/on-s3/{name}" in keys, name
    state = storage.read_json(f"{RUNS}/on-s3/nanovlm_run.json")
    assert state["mlflow_run_id"] == runs.killed["mlflow_run_id"]
    assert runs.longer["ray_checkpoint"] == f"{RUNS}/on-s3/step_{STEPS + 1:06d}"
    assert storage.read_json(f"{RUNS}/on-s3/nanovlm_summary.json")["steps"] == STEPS + 1


def test_a_killed_worker_resumes_from_the_checkpoint_in_the_bucket(runs):
    killed = runs.killed
    assert killed["steps"] == STEPS and not killed["resumed"]
    # rank 0 died after step 3; the restarted group downloaded Ray's step-2 checkpoint from S3
    assert killed["steps_this_run"] == STEPS - (KILL_STEP - 1)
    assert "nanovlm-resume-" in killed["resumed_from"]
    # steps 3 (logged before the kill) and 4-6 (after the restart) once each; 7 is the resumed run's
    assert _steps(runs.store, killed["mlflow_run_id"])[:STEPS] == list(range(1, STEPS + 1))


def test_a_stopped_run_resumes_by_name_in_the_same_mlflow_run(runs):
    longer = runs.longer
    assert longer["resumed"] and longer["steps"] == STEPS + 1 and longer["steps_this_run"] == 1
    assert longer["mlflow_run_id"] == runs.killed["mlflow_run_id"]  # the run id came back from the bucket
    assert _steps(runs.store, longer["mlflow_run_id"]) == list(range(1, STEPS + 2))
    assert tracking._client(runs.store).get_run(longer["mlflow_run_id"]).info.status == "FINISHED"


@pytest.fixture(scope="module")
def sweeps(cluster):
    """A two-trial sweep stored in the bucket, then resumed by its URI with its local directory gone."""
    from nanovlm.sweep.runner import find_resumable, run_sweep
    from nanovlm.sweep.space import load_space

    tmp, store = cluster
    (tmp / "space.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    first = run_sweep(load_space(tmp / "space.yaml"), storage_path=SWEEPS, tracking_uri=store)
    found = find_resumable("s3", SWEEPS)
    shutil.rmtree(first.local_dir)  # as on another machine: only the bucket knows the sweep
    again = run_sweep(None, resume_dir=found, tracking_uri=store)
    return SimpleNamespace(first=first, again=again, found=found, store=store)


def test_a_sweep_keeps_its_state_tune_experiment_runs_and_results_in_the_bucket(sweeps):
    first = sweeps.first
    assert str(first.sweep_dir).startswith(f"{SWEEPS}/s3-")
    assert sorted(r.status for r in first.records) == ["completed", "completed"]
    prefix = str(first.sweep_dir)[len(f"s3://{BUCKET}/"):]
    keys = s3_keys(f"{first.sweep_dir}/")
    assert f"{prefix}/nanovlm_sweep.json" in keys
    assert any(k.startswith(f"{prefix}/tune/experiment_state") for k in keys)
    assert {f"{prefix}/results/{name}" for name in ("results.csv", "results.md", "config.json")} <= set(keys)
    for record in first.records:
        assert f"{prefix}/train/{record.trial_id}/step_000002/model.safetensors" in keys
        assert f"{prefix}/train/{record.trial_id}/nanovlm_summary.json" in keys  # rank 0's, for the printout
    state = storage.read_json(f"{first.sweep_dir}/nanovlm_sweep.json")
    assert {e["status"] for e in state["trials"].values()} == {"completed"}


def test_a_sweep_resumes_from_the_bucket_alone_without_running_a_trial_again(sweeps):
    first, again = sweeps.first, sweeps.again
    assert sweeps.found == first.sweep_dir
    assert sorted((r.trial_id, r.status) for r in again.records) == sorted((r.trial_id, r.status) for r in first.records)
    client = tracking._client(sweeps.store)
    parent = client.get_run(first.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")
    assert len(children) == 2 and all(len(_steps(sweeps.store, c.info.run_id)) == 2 for c in children)
    assert json.loads(again.files["config.json"].read_text())["train"]["max_training_steps"] == 2
