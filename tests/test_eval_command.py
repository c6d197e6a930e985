"""`nanovlm train` a small `tiny` model on the shapes multiple-choice questions, then
`nanovlm eval --task mmstar` on a local parquet file of other shapes questions in MMStar's
published schema: a real benchmark score, well above chance, every question scored, per
category in --json, and the evaluation an MLflow run nested in the training run, with the
table and the predictions as artifacts."""

import json

import pytest
import torch

from nanovlm import tracking
from nanovlm.cli import main
from nanovlm.eval.benchmark_data import shapes_mmstar_rows, write_parquet

# A 64-wide, 2-block model on 32 px images learns colour questions in MMStar's format in a few
# hundred steps (600 steps scored 0.96 on 128 questions with seed 1234; 400 steps 0.55-0.67 with
# seeds 1-3): ~30 s on 2 busy cores.
MODEL = dict(vit_img_size=32, vit_patch_size=8, mp_image_token_length=4, vit_hidden_dim=64, vit_inter_dim=128,
             vit_n_blocks=2, vit_n_heads=4, lm_hidden_dim=64, lm_inter_dim=192, lm_n_blocks=2)
TRAIN = dict(shapes_question_types="colour,choice", max_training_steps=600, batch_size=32, lr_mp=2e-3,
             lr_vision_backbone=2e-3, lr_language_backbone=2e-3, shapes_train_size=20000, shapes_eval_size=8,
             eval_samples=8, eval_interval=10000, checkpoint_interval=10000, log_interval=10000, peak_flops=1e12)
QUESTIONS = 96
CHANCE = 0.25   # four options


@pytest.fixture(scope="module")
def evaluated(store, tmp_path_factory):
    """(run dir, eval output dir, --json results, the training run id)."""
    root = tmp_path_factory.mktemp("e2e")
    overrides = [arg for k, v in {**MODEL, **TRAIN}.items() for arg in ("--set", f"{k}={v}")]
    # MMStar-schema questions the model never saw: the validation split's own scenes
    benchmark = write_parquet(shapes_mmstar_rows(QUESTIONS, question_types="colour", img_size=32),
                              root / "mmstar-shapes" / "val.parquet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: one thread is faster on a shared machine (no OpenMP waits)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", store)
            assert main(["train", "--preset", "tiny", *overrides, "--output", str(root / "run"),
                         "--experiment", "eval-e2e"]) == 0
            assert main(["eval", "--checkpoint", str(root / "run"), "--task", "mmstar", "--dataset", str(benchmark),
                         "--batch-size", "32", "--json", str(root / "scores.json"), "--output", str(root / "eval")]) == 0
    finally:
        torch.set_num_threads(threads)
    runs = list(tracking.iter_runs("eval-e2e", store))
    training = [r for r in runs if r.data.tags.get("nanovlm.kind") != "eval"]
    assert len(training) == 1
    return root / "run", root / "eval", json.loads((root / "scores.json").read_text()), training[0].info.run_id


def test_a_model_trained_on_shapes_scores_well_above_chance_on_mmstar_questions(evaluated):
    _, _, scores, _ = evaluated
    mmstar = scores["mmstar"]
    assert mmstar["n"] == QUESTIONS
    assert mmstar["accuracy"] >= 2 * CHANCE
    assert set(mmstar["by_category"]) == {"colour"} and mmstar["by_category"]["colour"] >= 2 * CHANCE


def test_every_question_has_a_prediction_line(evaluated):
    _, out, scores, _ = evaluated
    lines = [json.loads(line) for line in (out / "predictions" / "mmstar.jsonl").read_text().splitlines()]
    assert [p["id"] for p in lines] == [r["index"] for r in shapes_mmstar_rows(QUESTIONS, question_types="colour",
                                                                               img_size=32)]
    assert all(p["parsed"] in "ABCD" and p["correct"] == (p["score"] == 1.0) for p in lines)
    assert sum(p["correct"] for p in lines) / len(lines) == pytest.approx(scores["mmstar"]["accuracy"])
    assert lines[0]["prompt"].endswith("\nAnswer with the option's letter from the given choices directly")


def test_the_evaluation_is_an_mlflow_run_nested_in_the_training_run(evaluated, store):
    _, _, scores, training_id = evaluated
    client = tracking._client(store)
    evals = [r for r in tracking.iter_runs("eval-e2e", store) if r.data.tags.get("nanovlm.kind") == "eval"]
    assert len(evals) == 1
    run = client.get_run(evals[0].info.run_id)
    assert run.data.tags[tracking.PARENT_RUN_TAG] == training_id and run.info.status == "FINISHED"
    assert run.data.metrics["eval_mmstar_accuracy"] == pytest.approx(scores["mmstar"]["accuracy"])
    assert run.data.metrics["eval_mmstar_accuracy_colour"] == pytest.approx(scores["mmstar"]["by_category"]["colour"])
    assert run.data.metrics["eval_mmstar_n"] == QUESTIONS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "results.md", "predictions"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == ["predictions/mmstar.jsonl"]


def test_dataset_shapes_asks_the_checkpoints_own_kind_of_question(evaluated, tmp_path):
    run, _, _, _ = evaluated
    out = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", str(run), "--task", "mmstar", "--dataset", "shapes", "--limit", "32",
                 "--json", str(out), "--output", str(tmp_path / "eval"), "--no-tracking"]) == 0
    mmstar = json.loads(out.read_text())["mmstar"]
    # the training config's question types (colour) and image size, read from the checkpoint
    assert mmstar["n"] == 32 and set(mmstar["by_category"]) == {"colour"} and mmstar["accuracy"] >= 2 * CHANCE
