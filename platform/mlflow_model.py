"""An MLflow model that adapts: a `mlflow.pyfunc` model whose `predict` takes a whole task, adapts the
meta-learned initialisation to its support set and predicts its queries (platform/learner.py).

    mlflow models serve -m runs:/<run id>/model --env-manager local
    POST /invocations  {"inputs": {"support_x": [...], "support_y": [...], "query_x": [...]},
                        "params": {"steps": 3, "bn_stats": "support"}}
    -> {"predictions": {"labels": [...], "classes": [...], "probabilities": [[...], ...]}}   (regression: "values")

`support_x`/`query_x` are float32 tensors (n, C, S, S) in [0, 1], the run's task.channels and
task.image_size (Omniglot: (n, 1, 28, 28) with ink high; the model applies the run's task.mean/std
itself; regression: (n, 1)),
`support_y` the label names, strings or integers (regression: float32 (n, 1)). The signature has
these tensor specs and a param schema (`steps`: default the run's optim.test_inner_steps;
`bn_stats`: default support); the input example is a real task. The artifacts are the meta-trained
parameters (`params.pt`, torch.save) and the run config (`config.yaml`); `learner.module()` of the
loaded model is the raw network. A bad request is an MlflowException with INVALID_PARAMETER_VALUE
(HTTP 400) whose message names the field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from platform.algorithms import BN_STATS
from platform.config import ConfigError, RunConfig, with_values
from platform.learner import Learner, learner_from
from platform.tasks import task_sampler

ARTIFACTS = {"params": "params.pt", "config": "config.yaml"}

# What MLflow prints at every save of this model, which tells a user of a run nothing: the pickling
# warning (the pickled object is AdaptingModel, this module's own class, loaded by this code) and the
# input example's validation notice (a schema check of a few ms); and a progress bar for each local
# artifact copy (params.pt, config.yaml: a few KB). Kept quiet for every process that saves or loads
# it (a user's MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins).
QUIET_NOTICES = ("Passing a Python object as `python_model`", "Validating input example against model signature")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("mlflow.pyfunc").addFilter(lambda record: not record.getMessage().startswith(QUIET_NOTICES))


def requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}", "metaplatform"]


class AdaptingModel(mlflow.pyfunc.PythonModel):
    """predict(task) -> predictions for its queries; one Learner per normalisation rule, built at load."""

    # No type hints on `predict`, and no warning asking for them at every import: the inputs are
    # checked against the tensor signature this model logs (MLflow's own switch, as its ChatModel uses).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        config = RunConfig.model_validate(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        params = torch.load(context.artifacts["params"], map_location="cpu", weights_only=True)
        self.learners = {bn: learner_from(config, params, bn) for bn in BN_STATS}

    @property
    def learner(self) -> Learner:
        return self.learners["support"]

    def predict(self, context, model_input, params: dict | None = None) -> dict:
        params = params or {}
        bn_stats = params.get("bn_stats", "support")
        if bn_stats not in BN_STATS:  # the fields' presence, shapes and dtypes MLflow checks against the signature
            message = f"params.bn_stats = {bn_stats!r}: must be one of {', '.join(BN_STATS)}"
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
        learner = self.learners[bn_stats]
        try:
            adapted = learner.adapt(model_input["support_x"], _labels(model_input["support_y"]), params.get("steps"))
            predictions = adapted.predict(model_input["query_x"])
        except ConfigError as e:  # InputError: bad fields, one problem each
            raise MlflowException("; ".join(e.problems), error_code=INVALID_PARAMETER_VALUE) from None
        if not learner.classification:
            return {"values": predictions}
        return {
            "labels": np.array(predictions.labels, dtype=object),
            "classes": np.array(predictions.classes, dtype=object),
            "probabilities": predictions.probabilities,
        }


def _labels(y):
    """Classification labels arrive as an object array (strings or integers); regression targets as floats."""
    return y.tolist() if isinstance(y, np.ndarray) and y.dtype == object else y


def signature(config: RunConfig) -> ModelSignature:
    shape = (-1, *config.task.image_format.shape) if config.classification else (-1, 1)
    labels = TensorSpec(np.dtype(object), (-1,), "support_y") if config.classification else None
    inputs = [
        TensorSpec(np.dtype(np.float32), shape, "support_x"),
        labels or TensorSpec(np.dtype(np.float32), (-1, 1), "support_y"),
        TensorSpec(np.dtype(np.float32), shape, "query_x"),
    ]
    param_specs = [
        ParamSpec("steps", "long", config.optim.test_inner_steps),
        ParamSpec("bn_stats", "string", "support"),
    ]
    return ModelSignature(inputs=Schema(inputs), params=ParamSchema(param_specs))


def input_example(config: RunConfig) -> dict:
    """A real small task: held-out (test split) task 0 at 1 shot and 1 query per class (K shots for regression)."""
    small = {"task.query": 1, "task.shots": 1} if config.classification else {"task.query": 5}
    task = task_sampler(with_values(config, small, "input example").task, "test").sample(0)
    labels = task.support_y.numpy().astype(object) if config.classification else task.support_y.numpy()
    return {"support_x": task.support_x.numpy(), "support_y": labels, "query_x": task.query_x.numpy()}


def save_model(config: RunConfig, params: dict[str, torch.Tensor], path: Path) -> Path:
    """The adapting model in MLflow's pyfunc format at `path`, with its signature, input example and
    artifacts (no server needed; replaces platform.tracking.save_model's body)."""
    path = Path(path)
    staging = path.parent / f".{path.name}.artifacts"  # copied into the model by save_model, then removed
    staging.mkdir(parents=True, exist_ok=True)
    try:
        torch.save({k: v.detach().cpu() for k, v in params.items()}, staging / ARTIFACTS["params"])
        (staging / ARTIFACTS["config"]).write_text(config.to_yaml())
        mlflow.pyfunc.save_model(
            str(path),
            python_model=AdaptingModel(),
            artifacts={k: str(staging / name) for k, name in ARTIFACTS.items()},
            signature=signature(config),
            input_example=input_example(config),
            pip_requirements=requirements(),
        )
    finally:
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return path


def log_saved_model(saved: Path, registered_model_name: str | None = None):
    """Log a model saved by save_model into the active run as `model` (what the tracking Delivery
    uploads from its spool); returns MLflow's ModelInfo (its registered_model_version when registered)."""
    info = mlflow.models.Model.load(saved)
    artifacts = {k: str(Path(saved) / "artifacts" / name) for k, name in ARTIFACTS.items()}
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=AdaptingModel(),
        artifacts=artifacts,
        signature=info.signature,
        input_example=info.load_input_example(str(saved)),
        registered_model_name=registered_model_name,
        pip_requirements=requirements(),
    )


def load_run_state(uri: str) -> dict:
    """{"config", "params"} of an adapting model in MLflow (runs:/..., models:/..., or a saved folder)."""
    learner = mlflow.pyfunc.load_model(uri).unwrap_python_model().learner
    return {"config": learner.config.model_dump(mode="json"), "params": learner.params}
