"""The final model of a training run as an MLflow model: a pyfunc that answers a question about an
image, carrying everything it needs (docs/export.md, MLflow models).

    mlflow.pyfunc.load_model("models:/NAME/1").predict(
        pandas.DataFrame({"image": [png_bytes], "question": ["What colour is the shape?"]}),
        params={"max_new_tokens": 16})                       -> DataFrame with one column, "answer"

The logged model holds, as the artifact `checkpoint`, the model's self-contained directory
(`copy_model_files`: config, weights, tokenizer with its chat template, image processor settings,
model card; no training state), and the nanovlm package as code, so that it loads where only the
pip requirements are installed. `nanovlm.inference.Answerer` answers, as `nanovlm generate` does.

It is an MLflow 3 logged model of the training run, in the run's experiment, with the run's params
and linked to the run as an output at the checkpoint's step (`log_model`). A registry name registers it as a new version. Training logs it through the run's journal
(`tracking_journal`), after the artifacts and before the end status: a store that is down delays
it, and `nanovlm tracking sync` sends it later; a model already logged from the same checkpoint
(status READY) is not logged twice.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import mlflow.pyfunc
import pandas as pd

logger = logging.getLogger(__name__)

MODEL_NAME = "model"
CHECKPOINT_ARTIFACT = "checkpoint"
SOURCE_TAG = "nanovlm.checkpoint"        # the checkpoint directory the model was logged from
DEFAULT_PARAMS = {"max_new_tokens": 32, "greedy": True, "temperature": 0.5, "top_k": 50, "top_p": 0.9, "seed": 0}


class VisionLanguagePyfunc(mlflow.pyfunc.PythonModel):
    """Rows of (image: encoded image bytes, question: str) -> their answers."""

    def load_context(self, context) -> None:
        from nanovlm.inference import Answerer

        self.answerer = Answerer(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        import io

        import torch
        from PIL import Image

        settings = {**DEFAULT_PARAMS, **(params or {})}
        torch.manual_seed(int(settings.pop("seed")))
        answers = []
        for image, question in zip(model_input["image"], model_input["question"]):
            pil = Image.open(io.BytesIO(_image_bytes(image)))
            answers.append(self.answerer([pil], str(question), **settings))
        return pd.DataFrame({"answer": answers})


def _image_bytes(value: Any) -> bytes:
    """An image cell: bytes, or base64 text (how JSON carries MLflow's binary columns)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    import base64

    return base64.b64decode(value)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", bool: "boolean", float: "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec(name, kinds[type(value)], value) for name, value in DEFAULT_PARAMS.items()]))


def pip_requirements() -> list[str]:
    """What the pyfunc imports, at the versions it was logged with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas")]


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's default client (what its fluent functions and its SQL registry use) on `uri`,
    then MLflow's setting and `$MLFLOW_TRACKING_URI` as they were (`mlflow.set_tracking_uri`
    writes the variable: restoring with it would leave MLflow's default, a store in the working
    directory, to every later caller)."""
    import os

    from mlflow.tracking._tracking_service import utils

    previous, variable = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def log_model(run_id: str, uri: str, checkpoint: str | Path, registered_model_name: Optional[str] = None) -> str:
    """Log the model in `checkpoint` as a pyfunc model of run `run_id` (unless one logged from it
    is there already, READY), register it under `registered_model_name` if given; its model id.

    MLflow's own `log_model` logs into the active run and the active experiment; here the run is
    named, so the steps are its: a logged model in the run's experiment, linked to the run as an
    output, its artifacts a saved pyfunc model, then READY (FAILED if a step fails)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from nanovlm.export.checkpoint_files import copy_model_files, training_details

    checkpoint = str(Path(checkpoint).resolve())
    client = mlflow.MlflowClient(uri)
    model_id = _logged_model_id(client, run_id, checkpoint)
    if model_id is None:
        run = client.get_run(run_id)
        logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                            tags={SOURCE_TAG: checkpoint}, params=dict(run.data.params))
        try:
            with tempfile.TemporaryDirectory(prefix="nanovlm-mlflow-model-") as tmp:
                staged = copy_model_files(checkpoint, Path(tmp) / CHECKPOINT_ARTIFACT)
                local = _save_pyfunc(Path(tmp) / MODEL_NAME, staged, Path(tmp) / "code",
                                     Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                           run_id=run_id, model_id=logged.model_id))
                client.log_model_artifacts(logged.model_id, str(local))
            step = training_details(checkpoint)[2] or 0
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException:
            with contextlib.suppress(Exception):
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        model_id = logged.model_id
        logger.info("Logged the model of %s as MLflow model %s of run %s.", checkpoint, model_id, run_id)
    if registered_model_name:
        register(uri, model_id, registered_model_name)
    return model_id


def _save_pyfunc(local: Path, checkpoint: Path, code: Path, mlflow_model) -> Path:
    """The MLflow model directory: the pyfunc (from code), the checkpoint as its artifact, the package."""
    with warnings.catch_warnings():   # the signature is given; an input example would be loaded to check it
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        mlflow.pyfunc.save_model(str(local), python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                 artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, code_paths=[str(_package_copy(code))],
                                 signature=signature(), pip_requirements=pip_requirements(), mlflow_model=mlflow_model)
    return local


def register(uri: str, model_id: str, name: str) -> str:
    """Register logged model `model_id` under `name`, once (a version per model); the version."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    source = f"models:/{model_id}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
        if existing:
            return existing[0].version
    logged = client.get_logged_model(model_id)
    with tracking_uri(uri):   # the SQL registry looks the logged model up through MLflow's default client
        version = client.create_model_version(name, source, run_id=logged.source_run_id, model_id=model_id).version
    logger.info("Registered MLflow model %s as %s version %s.", model_id, name, version)
    return version


def run_model_id(uri: str, run_id: str) -> Optional[str]:
    """The last model (status READY) that run `run_id` logged, or None."""
    models = _run_models(mlflow.MlflowClient(uri), run_id)
    return models[-1].model_id if models else None


def _logged_model_id(client, run_id: str, checkpoint: str) -> Optional[str]:
    found = [m for m in _run_models(client, run_id) if m.tags.get(SOURCE_TAG) == checkpoint]
    return found[-1].model_id if found else None


def _run_models(client, run_id: str) -> list:
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return sorted((m for m in models if m.status == LoggedModelStatus.READY), key=lambda m: m.creation_timestamp)


def _package_copy(directory: Path) -> Path:
    """The nanovlm package's source, without caches, for the model's `code_paths`."""
    import nanovlm

    source = Path(nanovlm.__file__).parent
    target = directory / "nanovlm"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build"))
    return target
