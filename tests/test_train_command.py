"""`nanovlm train` in one process is tracked in MLflow like a Ray run, resumes into the same MLflow
run, and answers bad input in one line. Everything is read back from the MLflow store."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from nanovlm import tracking
from nanovlm.cli import main
from nanovlm.config import configs_to_dict
from nanovlm.training import TrainHooks, train
from nanovlm.training.checkpointing import list_checkpoints
from training_configs import set_arguments, tiny_configs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
EXPERIMENT = "front-door"


class LossRecorder(TrainHooks):
    def __init__(self):
        self.losses = {}

    def on_step(self, step, metrics):
        self.losses[step] = metrics["loss"]


@pytest.fixture
def tracked_to(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


@pytest.fixture(scope="module")
def first_run(store, tmp_path_factory):
    """`nanovlm train` for 3 steps into a fresh experiment, and the run it logged."""
    out = tmp_path_factory.mktemp("single") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        assert main(["train", "--preset", "tiny", *set_arguments(), "--max-steps", str(STEPS), "--output", str(out),
                     "--experiment", EXPERIMENT, "--run-name", "single"]) == 0
    runs = list(tracking.iter_runs(EXPERIMENT, store))
    assert len(runs) == 1
    return out, runs[0].info.run_id


def loss_history(uri, run_id):
    return {m.step: m.value for m in tracking._client(uri).get_metric_history(run_id, "loss")}


def test_single_process_run_records_params_metrics_artifacts_and_tags(store, first_run, tmp_path):
    out, run_id = first_run
    client = tracking._client(store)
    run = client.get_run(run_id)
    vlm, train_cfg = tiny_configs(out, max_training_steps=STEPS, experiment_name=EXPERIMENT)
    assert run.data.params == tracking.flatten_config(configs_to_dict(vlm, train_cfg))
    assert run.info.run_name == "single" and run.info.status == "FINISHED"

    # the loss by step is what the loop computes without MLflow
    reference = LossRecorder()
    train(*tiny_configs(tmp_path / "reference", max_training_steps=STEPS), hooks=reference)
    losses = loss_history(store, run_id)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([reference.losses[s] for s in range(1, STEPS + 1)],
                                                                rel=1e-6, abs=1e-7)
    for key in ("tokens_per_second", "grad_norm", "lr_mp"):
        assert {m.step for m in client.get_metric_history(run_id, key)} == set(range(1, STEPS + 1)), key
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [STEPS]

    checkpoint = {Path(f.path).name for f in client.list_artifacts(run_id, "checkpoint")}
    assert {"model.safetensors", "config.json", "train_state.pt", "train_config.json"} <= checkpoint
    assert "summary.json" in {f.path for f in client.list_artifacts(run_id)}

    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["preset"] == "tiny" and tags["world_size"] == "1" and tags["device_type"] == "cpu"
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_resume_continues_the_checkpoint_in_the_same_mlflow_run(store, first_run, tracked_to):
    out, run_id = first_run
    assert main(["train", "--resume", str(out), "--max-steps", str(STEPS + 2)]) == 0

    assert [p.name for p in list_checkpoints(out)] == ["step_000003", "step_000005"]
    runs = list(tracking.iter_runs(EXPERIMENT, store))
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = tracking._client(store).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # steps 4 and 5 added, none repeated
    assert json.loads(run.data.tags[tracking.RESUMED_WITH_TAG]) == {"max_training_steps": "5"}


def test_resume_with_another_model_is_one_clear_error(first_run, tracked_to, capsys):
    out, _ = first_run
    assert main(["train", "--resume", str(out), "--set", "lm_n_blocks=2"]) == 2
    err = capsys.readouterr().err
    assert "holds a different model: lm_n_blocks=1" in err and "Traceback" not in err


def test_resume_from_a_directory_without_checkpoints_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "neither a training checkpoint" in err


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"nanovlm {version('nanovlm-ray')}"


def test_jobs_train_takes_every_nanovlm_train_flag():
    shown = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    for flag in ("--preset", "--config", "--set", "--dataset", "--max-steps", "--output", "--resume",
                 "--num-workers", "--gpu", "--experiment", "--run-name", "--no-tracking"):
        assert flag in shown.stdout, flag
