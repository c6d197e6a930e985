"""The final model of a run as an MLflow model: `nanovlm train --register NAME` logs it (a pyfunc of
the run) and registers it in a local SQLite store; `mlflow.pyfunc.load_model` answers an image and
a question with what `nanovlm generate` answers; logging and registering twice adds nothing."""

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from nanovlm import tracking
from nanovlm.cli import main
from nanovlm.config import configs_to_dict
from nanovlm.export.mlflow_model import SOURCE_TAG, log_model, run_model_id, tracking_uri
from nanovlm.inference import Answerer
from training_configs import perturb_weights, set_arguments, tiny_configs

STEPS = 2
EXPERIMENT = "models"
REGISTERED = "tiny-shapes"
QUESTIONS = ["What colour is the shape?", "What shape is it?"]


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """`nanovlm train --register tiny-shapes`, 2 steps, in one process: its output dir and run id."""
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        assert main(["train", "--preset", "tiny", *set_arguments(), "--max-steps", str(STEPS), "--output", str(out),
                     "--experiment", EXPERIMENT, "--register", REGISTERED]) == 0
    (run,) = tracking.iter_runs(EXPERIMENT, store)
    return out, run.info.run_id


def _png(colour, size):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows():
    return pd.DataFrame({"image": [_png((220, 30, 30), (40, 30)), _png((30, 30, 220), (17, 50))],
                         "question": QUESTIONS})


def _expected(checkpoint, rows, max_new_tokens):
    answer = Answerer(checkpoint)
    return [answer([Image.open(io.BytesIO(image))], question, max_new_tokens=max_new_tokens, greedy=True)
            for image, question in zip(rows["image"], rows["question"])]


def test_train_with_register_logs_the_final_model_of_the_run_and_registers_it(store, trained):
    import mlflow

    out, run_id = trained
    (checkpoint,) = (out / "checkpoints").iterdir()
    client = mlflow.MlflowClient(store)
    model_id = run_model_id(store, run_id)
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run_id and logged.tags[SOURCE_TAG] == str(checkpoint.resolve())
    assert logged.params == client.get_run(run_id).data.params
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, STEPS)]
    (version,) = client.search_model_versions(f"name = '{REGISTERED}'")
    assert (version.version, version.source, version.run_id) == (1, f"models:/{model_id}", run_id)
    # the registered version loads by name and answers as the checkpoint does
    rows = _rows()
    with tracking_uri(store):
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    got = model.predict(rows, params={"max_new_tokens": 4})
    assert list(got.columns) == ["answer"]
    assert got["answer"].tolist() == _expected(checkpoint, rows, 4)


def test_the_pyfunc_answers_an_image_and_a_question_as_generate_does(store, trained, tmp_path):
    """A model whose answers are words (two training steps answer <|im_end|> at once), logged and
    loaded back with `mlflow.pyfunc.load_model`; it carries its tokenizer: nothing else is read."""
    import mlflow

    out, run_id = trained
    (checkpoint,) = (out / "checkpoints").iterdir()
    moved = tmp_path / "model"
    shutil.copytree(checkpoint, moved)
    perturb_weights(moved)
    run = tracking.create_run(configs_to_dict(*tiny_configs(tmp_path)), uri=store, experiment_name=EXPERIMENT)
    model_id = log_model(run, store, moved)
    rows = _rows()
    expected = _expected(moved, rows, 6)
    shutil.rmtree(moved)   # the logged model is all that is left
    with tracking_uri(store):
        model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert model.metadata.get_input_schema().input_names() == ["image", "question"]
    answers = model.predict(rows, params={"max_new_tokens": 6})["answer"].tolist()
    assert all(answers) and answers == expected


def test_logging_and_registering_a_checkpoint_again_adds_nothing(store, trained):
    import mlflow

    out, run_id = trained
    (checkpoint,) = (out / "checkpoints").iterdir()
    model_id = run_model_id(store, run_id)
    assert log_model(run_id, store, checkpoint, REGISTERED) == model_id
    client = mlflow.MlflowClient(store)
    assert len(client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")) == 1
    assert [v.version for v in client.search_model_versions(f"name = '{REGISTERED}'")] == [1]


def test_a_model_the_store_did_not_take_waits_in_the_journal_and_sync_logs_it(store, trained, tmp_path, monkeypatch):
    import mlflow

    import nanovlm.export.mlflow_model as mlflow_model
    from nanovlm.tracking_journal import DEADLINE_ENV, JournaledRun, RunJournal

    out, _ = trained
    (checkpoint,) = (out / "checkpoints").iterdir()
    run_id = tracking.create_run(configs_to_dict(*tiny_configs(tmp_path)), uri=store, experiment_name=EXPERIMENT)
    with monkeypatch.context() as patch:
        patch.setenv(DEADLINE_ENV, "1")
        patch.setattr(mlflow_model, "log_model", lambda *args: (_ for _ in ()).throw(ConnectionError("store down")))
        run = JournaledRun(run_id, store, tmp_path / "out")
        run.log_model(checkpoint, "waited")
        assert run.close("FINISHED") is not None
    (journal,) = (tmp_path / "out" / "mlflow_journal").iterdir()
    waiting = RunJournal(journal)
    assert waiting.describe_pending() == "1 MLflow model(s), the end status FINISHED"
    waiting.close()
    assert main(["tracking", "sync", str(tmp_path / "out")]) == 0
    client = mlflow.MlflowClient(store)
    model_id = run_model_id(store, run_id)
    assert client.get_logged_model(model_id).tags[SOURCE_TAG] == str(checkpoint.resolve())
    assert [v.source for v in client.search_model_versions("name = 'waited'")] == [f"models:/{model_id}"]
    assert client.get_run(run_id).info.status == "FINISHED"



@pytest.mark.parametrize("variable", [None, "sqlite:////elsewhere/mlflow.db"])
def test_registering_leaves_mlflows_tracking_uri_and_the_environment_as_they_were(store, monkeypatch, variable):
    import os

    import mlflow

    if variable is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", variable)
    before = mlflow.get_tracking_uri()
    with tracking_uri(store):
        assert mlflow.get_tracking_uri() == store and os.environ["MLFLOW_TRACKING_URI"] == store
    assert os.environ.get("MLFLOW_TRACKING_URI") == variable and mlflow.get_tracking_uri() == before
