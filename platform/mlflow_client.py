"""The MLflow client as the platform uses it: retries chosen per client, batched logging, experiments.

MLflow's own HTTP retries are one number per process, read from MLFLOW_HTTP_REQUEST_MAX_RETRIES at
every request (and at its default, a dead server is retried for minutes per call). So they are off
here, once, and each client retries as its caller needs: a training run's spool retries forever
in the background (`retries=0` for its client), a command's one-shot calls a few times.
"""

from __future__ import annotations

import functools
import os
import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

MAX_PARAMS = 100  # per log_batch request (MLflow's limit)
# MLflow errors that retrying cannot fix.
PERMANENT = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "INVALID_STATE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def is_permanent(error: Exception) -> bool:
    return isinstance(error, MlflowException) and error.error_code in PERMANENT


class RetryingClient:
    """An MlflowClient whose calls are tried `retries` more times (1, 2, 4 ... s apart) when they fail
    for a reason retrying can fix."""

    def __init__(self, client: MlflowClient, retries: int):
        self._client, self._retries = client, retries

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr) or self._retries == 0:
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for attempt in range(self._retries + 1):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if attempt == self._retries or is_permanent(e):
                        raise
                    time.sleep(min(2**attempt, 10))
            raise AssertionError("unreachable")

        return call


def mlflow_client(uri: str, retries: int = 0) -> MlflowClient:
    """A client for the tracking store at `uri` (see the module docstring for `retries`)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a user's own setting is kept
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return RetryingClient(MlflowClient(uri), retries)  # type: ignore[return-value]


def log_batches(
    client: MlflowClient, run_id: str, params: list[Param] = (), metrics: list[Metric] = (), tags: list[RunTag] = ()
) -> None:
    """`log_batch` within MLflow's limit of 100 params a request (our metric and tag batches are small)."""
    params = list(params)
    for i in range(0, max(1, len(params)), MAX_PARAMS):
        first = i == 0
        client.log_batch(
            run_id,
            metrics=list(metrics) if first else [],
            params=params[i : i + MAX_PARAMS],
            tags=list(tags) if first else [],
        )


def get_or_create_experiment(client: MlflowClient, name: str, artifacts: str | None) -> str:
    """The id of experiment `name`, created with `artifacts` as its artifact location when missing."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifacts)
