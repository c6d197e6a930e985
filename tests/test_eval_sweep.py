"""Benchmarks during training and sweeps: a `tiny` Tune sweep whose metric is an eval score
(`eval_mmstar_accuracy` on the offline shapes questions in MMStar's schema), each trial a
2-worker Ray Train run whose workers answer half the questions each and gather them. Its MLflow
child runs carry the scores at every evaluation, the results table ranks by them, and each
trial's summary.json keeps them."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from nanovlm import tracking

QUESTIONS = 8
SPACE = {
    "name": "eval-sweep",
    "preset": "tiny",
    "overrides": {
        "experiment_name": "eval-sweep-test",
        "max_training_steps": 4, "eval_interval": 2, "eval_samples": 4, "batch_size": 4,
        "report_interval": 1, "log_interval": 1, "checkpoint_interval": 4, "max_new_tokens_eval": 2,
        "shapes_train_size": 64, "shapes_eval_size": 8, "shapes_question_types": "colour,choice",
        "vit_img_size": 32, "vit_n_blocks": 1, "lm_n_blocks": 1, "mp_image_token_length": 4,
        "eval_tasks": f"mmstar:{QUESTIONS}", "eval_tasks_datasets": {"mmstar": "shapes"},
    },
    "space": {"lr_mp": {"grid": [1e-3, 3e-3]}},
    "metric": "eval_mmstar_accuracy",
    "mode": "max",
    "num_samples": 1,
    "max_concurrent_trials": 2,
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 0.4, "driver_cpus": 0.2},
    "time_budget_s": 300,
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import ray

    from nanovlm.distributed.cluster import start_local_ray
    from nanovlm.sweep.runner import run_sweep
    from nanovlm.sweep.space import load_space

    root = tmp_path_factory.mktemp("eval-sweep")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # fast reports (see notes)
    ray_dir = tempfile.mkdtemp(prefix="ray-")   # short: Ray's socket paths must fit in 107 bytes
    start_local_ray(num_cpus=2, temp_dir=ray_dir)
    try:
        path = root / "space.yaml"
        path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
        yield run_sweep(load_space(path), storage_path=root / "sweeps")
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _children(outcome):
    client = tracking._client(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")


def test_child_runs_carry_the_eval_scores_at_every_evaluation(sweep):
    client = tracking._client(sweep.tracking_uri)
    children = _children(sweep)
    assert len(children) == 2
    for run in children:
        assert run.data.tags["nanovlm.status"] == "completed"
        history = client.get_metric_history(run.info.run_id, "eval_mmstar_accuracy")
        assert sorted(m.step for m in history) == [2, 4]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        # both workers' answers gathered: every question scored, in its one category
        assert run.data.metrics["eval_mmstar_n"] == QUESTIONS
        assert run.data.metrics["eval_mmstar_accuracy_colour"] == run.data.metrics["eval_mmstar_accuracy"]


def test_the_sweep_ranks_trials_by_the_eval_score(sweep):
    scored = [r for r in sweep.records if r.final("eval_mmstar_accuracy") is not None]
    assert len(scored) == 2
    assert sweep.best.final("eval_mmstar_accuracy") == max(r.final("eval_mmstar_accuracy") for r in scored)
    header = sweep.files["results.md"].read_text().splitlines()[0]
    assert "eval_mmstar_accuracy" in header


def test_each_trials_summary_keeps_the_eval_scores(sweep):
    summaries = [json.loads(p.read_text()) for p in Path(sweep.sweep_dir).rglob("summary.json")]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary["eval_mmstar_n"] == QUESTIONS and 0.0 <= summary["eval_mmstar_accuracy"] <= 1.0
