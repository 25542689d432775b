"""The MLflow model that adapts (platform/mlflow_model.py): saved, logged and registered, loaded back by
the learner API, and served by a real `mlflow models serve` process over HTTP on loopback."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from conftest import free_port
from test_adapt import folder, folder_config, trained, worker_threads  # noqa: F401 - fixtures

from platform.config import RunConfig
from platform.learner import learner_from, load_learner
from platform.mlflow_model import input_example, log_saved_model, save_model
from platform.tasks import task_sampler

MLFLOW = Path(sys.executable).parent / "mlflow"


@pytest.fixture(scope="module")
def classifier(folder, tmp_path_factory):  # noqa: F811 - the imported fixture
    """(saved model folder, config, params) of a tiny 3-way MAML model on a generated folder data set."""
    config = folder_config(folder, "maml")
    params = trained(config)
    return save_model(config, params, tmp_path_factory.mktemp("classifier") / "model"), config, params


@pytest.fixture(scope="module")
def server(classifier):
    """`mlflow models serve` of the classifier on a free loopback port: its /invocations URL."""
    port = free_port()
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", classifier[0], "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        # It runs `uvicorn`; one torch thread, like the library's side of the comparisons (worker_threads):
        # bit-for-bit equal predictions need the same kernels' summation order.
        env=os.environ | {"PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mlflow models serve did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    yield f"{url}/invocations"
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def request_body(task, labels, steps: int | None = None) -> dict:
    body = {"inputs": {"support_x": task.support_x.tolist(), "support_y": labels, "query_x": task.query_x.tolist()}}
    return body | ({"params": {"steps": steps}} if steps is not None else {})


def test_the_server_answers_a_task_with_the_librarys_predictions(server, classifier, worker_threads):  # noqa: F811
    _, config, params = classifier
    task = task_sampler(config.task, "test").sample(2)
    names = ["cat", "dog", "emu"]
    labels = [names[i] for i in task.support_y]
    status, answer = post(server, request_body(task, labels, steps=3))
    expected = learner_from(config, params).adapt(task.support_x, labels, steps=3).predict(task.query_x)
    assert status == 200, answer
    predictions = answer["predictions"]
    assert predictions["classes"] == names and predictions["labels"] == expected.labels
    # JSON carries float32 values exactly (shortest repr round-trips), so the same bits as the library's
    assert np.array_equal(np.float32(predictions["probabilities"]), expected.probabilities)
    status, default = post(server, request_body(task, labels))  # steps: the param schema's default
    assert status == 200 and config.optim.test_inner_steps == 2
    expected = learner_from(config, params).adapt(task.support_x, labels).predict(task.query_x)
    assert np.array_equal(np.float32(default["predictions"]["probabilities"]), expected.probabilities)


def test_bad_requests_get_400_naming_the_field(server, classifier):
    _, config, _ = classifier
    task = task_sampler(config.task, "test").sample(2)
    good = request_body(task, ["a", "b", "c"])["inputs"]
    cases = {
        "support_y: 2 labels for 3 support examples": good | {"support_y": ["a", "b"]},
        "support_y: 4 labels, but this maml model's classifier head has 3 outputs": good
        | {"support_x": good["support_x"] + good["support_x"][:1], "support_y": ["a", "b", "c", "d"]},
        "query_x: holds NaN or infinite values": good | {"query_x": [[[[float("nan")] * 28] * 28]]},
        "Model is missing inputs ['query_x']": {k: v for k, v in good.items() if k != "query_x"},  # MLflow's check
    }
    for expected, inputs in cases.items():
        status, answer = post(server, {"inputs": inputs})
        assert status == 400 and expected in answer["message"], (expected, status, answer)
    # Shapes and dtypes against the signature are MLflow's own check: 400, naming the expected shape, but
    # not the field (its message lists the whole schema); the fields it lets through are ours.
    status, answer = post(server, {"inputs": good | {"query_x": []}})
    assert status == 400 and "Shape of input (0,) does not match expected shape (-1, 1, 28, 28)" in answer["message"]
    status, answer = post(server, {"inputs": good, "params": {"steps": -1}})
    assert status == 400 and "steps = -1: must be an integer >= 0" in answer["message"]
    status, answer = post(server, {"inputs": good, "params": {"bn_stats": "query"}})
    assert status == 400 and "params.bn_stats = 'query'" in answer["message"]


def test_saved_model_has_its_signature_input_example_and_artifacts(classifier):
    path, config, params = classifier
    model = mlflow.pyfunc.load_model(str(path))
    inputs = {s.name: (s.type, s.shape) for s in model.metadata.signature.inputs.inputs}
    assert inputs == {
        "support_x": (np.dtype("float32"), (-1, 1, 28, 28)),
        "support_y": (np.dtype("O"), (-1,)),
        "query_x": (np.dtype("float32"), (-1, 1, 28, 28)),
    }
    assert {p.name: p.default for p in model.metadata.signature.params.params} == {"steps": 2, "bn_stats": "support"}
    example = model.metadata.load_input_example(str(path))
    task = task_sampler(config.task.model_copy(update={"query": 1}), "test").sample(0)  # a real held-out task
    assert np.array_equal(example["support_x"], task.support_x.numpy())
    assert np.array_equal(example["query_x"], task.query_x.numpy())
    assert example["support_y"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in (path / "artifacts").iterdir()) == ["config.yaml", "params.pt"]
    module = model.unwrap_python_model().learner.module()  # the raw network stays available
    assert all(torch.equal(v, params[k]) for k, v in module.state_dict().items())


def test_regression_model_predicts_as_the_library(tmp_path):
    config = RunConfig()
    params = trained(config)
    model = mlflow.pyfunc.load_model(str(save_model(config, params, tmp_path / "model")))
    example = input_example(config)
    values = model.predict(example, params={"steps": 4})["values"]
    expected = (
        learner_from(config, params).adapt(example["support_x"], example["support_y"], 4).predict(example["query_x"])
    )
    assert values.shape == (5,) and np.array_equal(values, expected)


def test_logged_and_registered_models_load_through_runs_and_models_uris(classifier, tmp_path):
    """log_saved_model (what tracking's Delivery uploads) into a run; load_learner takes runs:/ and models:/ URIs."""
    path, config, params = classifier
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        with mlflow.start_run() as run:
            info = log_saved_model(path, registered_model_name="adapting")
        mlflow.MlflowClient().set_registered_model_alias("adapting", "champion", info.registered_model_version)
        task = task_sampler(config.task, "test").sample(3)
        expected = learner_from(config, params).adapt(task.support_x, task.support_y).predict(task.query_x)
        for uri in (f"runs:/{run.info.run_id}/model", "models:/adapting@champion"):
            got = load_learner(uri).adapt(task.support_x, task.support_y).predict(task.query_x)
            assert np.array_equal(got.probabilities, expected.probabilities), uri
    finally:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
