"""The MLflow model's code (MLflow "models from code"): loading the model runs this file, which
names the pyfunc; `nanovlm.export.mlflow_model` holds it."""

import mlflow

from nanovlm.export.mlflow_model import VisionLanguagePyfunc

mlflow.models.set_model(VisionLanguagePyfunc())
