"""Ray Train on CPU: 2-worker DDP follows the single-process trajectory of the same global batch,
and a run survives rank 0 killed twice by resuming from its latest checkpoint, with every step
logged to MLflow exactly once.

The reference is built here, independently of the Ray path: one process, one model, and at each
step the union of the samples that rank 0 and rank 1 see (their shards and batch samplers),
collated into one batch of 2 x batch_size. With 2 answer tokens per sample (colour and shape
questions), the mean of the two ranks' losses is the loss of that global batch, so DDP's
averaged gradients equal the single-process gradients up to float rounding.
"""

import os
import shutil
import tempfile

import pytest

from nanovlm import tracking
from nanovlm.config import preset
from nanovlm.distributed import run_training
from nanovlm.distributed.worker import KILL_ENV
from training_configs import train_on_global_batches

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 6
BATCH = 4     # per worker; the global batch is 2 x BATCH
WORKERS = 2


def configs(tmp, **overrides):
    settings = dict(
        shapes_question_types="colour,shape", shapes_train_size=64, shapes_eval_size=8, eval_samples=8,
        eval_interval=1000, batch_size=BATCH, max_training_steps=STEPS, checkpoint_interval=STEPS,
        report_interval=2, log_interval=1, num_workers=WORKERS, checkpoints_to_keep=2,
        storage_path=str(tmp / "ray_results"), output_dir=str(tmp / "out"), experiment_name="ray-train-tests",
        peak_flops=1e12)  # skip measuring the matmul peak in every worker
    settings.update(overrides)
    return preset("tiny", **settings)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """Per-step losses of one process trained on the global batch of a 2-worker run."""
    vlm, train = configs(tmp_path_factory.mktemp("reference"))
    return train_on_global_batches(vlm, train, WORKERS, STEPS)[0]


@pytest.fixture(scope="module")
def ray_cluster(reference_losses):
    """One 2-CPU Ray instance for the module, loopback only, in its own temp dir."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"  # cheap reports (see notes)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def last_value_per_step(uri, run_id, key):
    history = tracking._client(uri).get_metric_history(run_id, key)
    by_step = {}
    for metric in sorted(history, key=lambda m: m.timestamp):
        by_step[metric.step] = metric.value  # a step re-run after a restart overwrites the first try
    return by_step


def test_two_worker_ddp_follows_the_single_process_trajectory(ray_cluster, store, reference_losses, tmp_path):
    vlm, train = configs(tmp_path)
    summary = run_training(vlm, train, preset_name="tiny", run_name="ddp", tracking_uri=store)

    assert summary["steps"] == STEPS
    losses = last_value_per_step(store, summary["mlflow_run_id"], "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(reference_losses, rel=1e-4, abs=1e-5)
    # throughput is global and per worker
    tps = last_value_per_step(store, summary["mlflow_run_id"], "tokens_per_second")[STEPS]
    per_worker = last_value_per_step(store, summary["mlflow_run_id"], "tokens_per_second_per_worker")[STEPS]
    assert tps == pytest.approx(WORKERS * per_worker, rel=0.5)


@pytest.fixture(scope="module")
def fault_run(ray_cluster, store, tmp_path_factory):
    """A 2-worker run whose rank 0 (the one that logs to MLflow) SIGKILLs itself after step 4 and
    after step 6; checkpoints every 2 steps. Each time it has logged a step after the checkpoint
    the restart resumes from (3, then 5), which the restarted run computes again."""
    tmp = tmp_path_factory.mktemp("fault")
    vlm, train = configs(tmp, checkpoint_interval=2, max_failures=2)
    summary = run_training(vlm, train, preset_name="tiny", run_name="fault", tracking_uri=store,
                           worker_env={KILL_ENV: "0:4,0:6"})
    return vlm, train, summary


def test_killed_worker_resumes_from_the_latest_checkpoint(fault_run, store, reference_losses):
    from nanovlm.training.checkpointing import load_train_state

    _, _, summary = fault_run
    # the last restart resumed from step 4 and ran steps 5..6: none skipped, none counted twice
    assert summary["steps"] == STEPS
    assert summary["steps_this_run"] == STEPS - 4
    assert summary["resumed_from"] is not None
    state = load_train_state(summary["ray_checkpoint"])
    assert state["step"] == STEPS
    assert state["data_position"]["batches_consumed"] == STEPS  # one batch per step on each rank
    # every step's loss equals the uninterrupted reference: weights, optimizer, schedule, data position restored
    losses = last_value_per_step(store, summary["mlflow_run_id"], "loss")
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(reference_losses, rel=1e-4, abs=1e-5)


def test_every_step_is_logged_exactly_once_through_two_kills_of_rank_0(fault_run, store):
    _, _, summary = fault_run
    client = tracking._client(store)
    for key in ("loss", "grad_norm", "step_time"):
        steps = sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], key))
        assert steps == list(range(1, STEPS + 1)), key
    assert sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "val_loss")) == [STEPS]
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert summary["tracking_pending"] is None


def test_final_checkpoint_loads_with_from_pretrained(fault_run):
    from nanovlm.models import VisionLanguageModel

    vlm, _, summary = fault_run
    model = VisionLanguageModel.from_pretrained(summary["ray_checkpoint"])
    assert model.cfg.to_dict() == vlm.to_dict()


def test_a_stopped_run_resumes_from_its_storage_path(fault_run, store):
    vlm, train, first = fault_run
    longer = train.replace(max_training_steps=STEPS + 1)
    second = run_training(vlm, longer, preset_name="tiny", run_name="fault", tracking_uri=store)
    assert second["resumed"] and second["steps"] == STEPS + 1 and second["steps_this_run"] == 1
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # one MLflow run per training run


def test_report_thread_hands_reports_to_ray_in_order_without_blocking_the_caller(monkeypatch):
    import threading

    import ray.train

    from nanovlm.distributed.worker import ReportThread

    ray_reads = threading.Event()  # stands for the controller's poll that frees Ray's one-slot queue
    handed = []

    def report(metrics, checkpoint=None, **kwargs):
        ray_reads.wait(timeout=60)
        handed.append(metrics["step"])

    monkeypatch.setattr(ray.train, "report", report)
    reporter = ReportThread()
    for step in (2, 4, 6):
        reporter.submit({"step": step})  # returns at once although Ray has not read anything
    assert reporter.busy() and handed == []
    ray_reads.set()
    reporter.wait()
    assert handed == [2, 4, 6] and not reporter.busy()
    reporter.stop()


def test_report_thread_raises_ray_errors_in_the_training_thread(monkeypatch):
    import ray.train

    from nanovlm.distributed.worker import ReportThread

    def report(metrics, checkpoint=None, **kwargs):
        raise ValueError("metrics must be plain numbers")

    monkeypatch.setattr(ray.train, "report", report)
    reporter = ReportThread()
    reporter.submit({"step": 1})
    with pytest.raises(ValueError, match="plain numbers"):
        reporter.wait()
    reporter.stop()
