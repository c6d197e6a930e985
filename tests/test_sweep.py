"""A real sweep on a local 2-CPU Ray cluster: Tune trials that each run Ray Train, ASHA, MLflow
parent/child runs, an invalid trial, results and resume. One small sweep (three trials of a
4-step `tiny` run, one of them invalid) serves every slow test here."""

import json
import os
from pathlib import Path

import pytest
import yaml

from nanovlm import tracking
from nanovlm.cli import main
from nanovlm.config import configs_from_dict

SPACE = {
    "name": "t",
    "preset": "tiny",
    "overrides": {
        "experiment_name": "sweep-test", "register_model": "sweep-best",
        "max_training_steps": 4, "eval_interval": 2, "eval_samples": 8, "batch_size": 4,
        "report_interval": 1, "log_interval": 1, "checkpoint_interval": 4, "max_new_tokens_eval": 4,
        "shapes_train_size": 64, "shapes_eval_size": 16, "vit_n_blocks": 1, "lm_n_blocks": 1,
        "vit_img_size": 64, "vit_patch_size": 8,  # pinned: the 8x8 patch grid the space relies on
    },
    # 8x8 patch grid: 2 and 4 divide it, 3 does not -> one invalid trial
    "space": {"mp_pixel_shuffle_factor": {"grid": [2, 3, 4]}},
    "metric": "val_loss",
    "mode": "min",
    "scheduler": {"type": "asha", "time_attr": "step", "max_t": 4, "grace_period": 2, "reduction_factor": 2},
    "num_samples": 1,
    "max_concurrent_trials": 2,
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.4, "driver_cpus": 0.2},
    "time_budget_s": 200,
}


def _write_space(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_unknown_field_fails_before_any_trial(tmp_path, capsys, monkeypatch):
    import nanovlm.sweep.runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("the sweep started despite an unknown field")

    monkeypatch.setattr(nanovlm.sweep.runner, "run_sweep", must_not_run)
    bad = dict(SPACE, space={"mp_pixel_shufle_factor": {"grid": [2, 4]}})
    code = main(["sweep", str(_write_space(tmp_path / "bad.yaml", bad)), "--storage-path", str(tmp_path / "s")])
    assert code == 2
    assert "did you mean 'mp_pixel_shuffle_factor'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- one real sweep

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import ray

    from nanovlm.distributed.cluster import start_local_ray
    from nanovlm.sweep.runner import run_sweep
    from nanovlm.sweep.space import load_space

    root = tmp_path_factory.mktemp("sweep")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # fast reports (see notes)
    # A private 2-CPU cluster, never another process's; its dashboard frees the placement
    # groups of trials that ASHA stops.
    start_local_ray(num_cpus=2, temp_dir=str(root / "ray"))
    try:
        spec = load_space(_write_space(root / "space.yaml", SPACE))
        outcome = run_sweep(spec, storage_path=root / "sweeps")
        yield outcome
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _client(outcome):
    return tracking._client(outcome.tracking_uri)


def _children(outcome):
    client = _client(outcome)
    parent = client.get_run(outcome.parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")


pytestmark = pytest.mark.timeout(400)


@pytest.mark.slow
def test_sweep_logs_one_parent_and_a_child_run_per_trial(sweep):
    client = _client(sweep)
    parent = client.get_run(sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["nanovlm.sweep"] == "t"
    artifacts = {a.path for a in client.list_artifacts(sweep.parent_run_id)}
    assert {"space.yaml", "results.csv", "results.md", "config.json", "metric_vs_fields.png",
            "learning_curves.png"} <= artifacts
    children = _children(sweep)
    assert sorted(int(r.data.params["mp_pixel_shuffle_factor"]) for r in children) == [2, 3, 4]


@pytest.mark.slow
def test_trained_trials_have_metrics_by_step(sweep):
    client = _client(sweep)
    trained = [r for r in _children(sweep) if r.data.params["mp_pixel_shuffle_factor"] != "3"]
    assert len(trained) == 2
    for run in trained:
        assert run.data.tags["nanovlm.status"] in ("completed", "early-stopped")
        assert run.data.params["max_training_steps"] == "4"  # every config field is a param
        val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert val_steps and set(val_steps) <= {2, 4}
        assert len(client.get_metric_history(run.info.run_id, "tokens_per_second")) >= 2
        assert run.data.metrics["tokens_per_second"] > 0


@pytest.mark.slow
def test_a_config_that_cannot_be_built_is_an_invalid_trial(sweep):
    (invalid,) = [r for r in _children(sweep) if r.data.params["mp_pixel_shuffle_factor"] == "3"]
    assert invalid.data.tags["nanovlm.status"] == "invalid"
    assert "mp_pixel_shuffle_factor=3 does not divide" in invalid.data.tags["nanovlm.status_reason"]
    assert invalid.info.status == "FAILED"
    statuses = sorted(r.status for r in sweep.records)
    assert statuses.count("invalid") == 1 and len(statuses) == 3  # and the sweep went on


@pytest.mark.slow
def test_results_table_ranks_trials_and_best_config_loads(sweep):
    lines = sweep.files["results.md"].read_text().splitlines()
    assert len(lines) == 2 + 3
    assert lines[-1].split("|")[3].strip() == "invalid"  # unscored trials last
    best = sweep.best
    assert best is not None and best.config["mp_pixel_shuffle_factor"] in (2, 4)
    scored = [r for r in sweep.records if r.final("val_loss") is not None]
    assert best.final("val_loss") == min(r.final("val_loss") for r in scored if r.status == "completed") \
        or best.status != "completed"
    vlm, train = configs_from_dict(json.loads(sweep.files["config.json"].read_text()))
    assert vlm.mp_pixel_shuffle_factor == best.config["mp_pixel_shuffle_factor"]
    assert vlm.mp_image_token_length == (8 // vlm.mp_pixel_shuffle_factor) ** 2
    assert train.max_training_steps == 4 and train.output_dir == "runs/tiny"  # no trial-specific paths


@pytest.mark.slow
def test_the_best_trials_final_model_is_the_one_registered(sweep):
    from nanovlm.export.mlflow_model import SOURCE_TAG, run_model_id
    from nanovlm.training.checkpointing import latest_checkpoint

    client = _client(sweep)
    model_id = run_model_id(sweep.tracking_uri, sweep.parent_run_id)   # an MLflow model of the parent run
    best_checkpoint = latest_checkpoint(sweep.sweep_dir / "trials" / sweep.best.trial_id)
    assert client.get_logged_model(model_id).tags[SOURCE_TAG] == str(best_checkpoint.resolve())
    (version,) = client.search_model_versions("name = 'sweep-best'")
    assert version.source == f"models:/{model_id}"
    # every trial's run holds its own final model; only the best one is registered, once
    assert [m.name for m in client.search_registered_models()] == ["sweep-best"]


@pytest.mark.slow
def test_resuming_a_finished_sweep_runs_no_trial_again(sweep):
    from nanovlm.sweep.runner import run_sweep

    before = {r.info.run_id for r in _children(sweep)}
    again = run_sweep(None, resume_dir=sweep.sweep_dir)
    assert {r.info.run_id for r in _children(sweep)} == before
    assert sorted((r.trial_id, r.status) for r in again.records) == sorted((r.trial_id, r.status) for r in sweep.records)
