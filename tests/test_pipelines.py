"""The Kubeflow pipeline: its compiled IR checked, and run end to end with kfp.local against the
session's real Ray head (token auth) and real MLflow server (PostgreSQL + S3).

The Ray jobs get a working directory that holds the presets, as the image's /opt/metaplatform does.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
# A tiny sinusoid run: trials and training take seconds; meta-validation on few tasks.
OVERRIDES = [
    "resources.workers=1",
    "optim.meta_batch=10",
    "optim.chunk=5",
    "eval.every=10",
    "eval.tasks=20",
    "log_every=10",
]
REGISTER = "Executing task \x1b[96m'register'"  # kfp.local's line, colours included


def compile_pipeline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.compile", *args], check=False, cwd=tmp_path, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    """The pipeline spec and its Kubernetes platform spec, compiled with the command."""
    folder = tmp_path_factory.mktemp("compiled")
    result = compile_pipeline(
        folder, "--output", "pipeline.yaml", "--image", "registry.example/metaplatform:9.9", "--graph", "pipeline.dot"
    )
    assert result.returncode == 0, result.stderr
    spec, platform_spec = yaml.safe_load_all((folder / "pipeline.yaml").read_text())
    return spec, platform_spec, (folder / "pipeline.dot").read_text()


def test_the_ir_has_four_steps_in_order_with_register_under_the_condition(compiled):
    spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"tune", "train", "evaluate", "condition-1"}
    assert tasks["train"]["dependentTasks"] == ["tune"]
    assert tasks["evaluate"]["dependentTasks"] == ["train"]
    condition = tasks["condition-1"]
    assert set(condition["dependentTasks"]) == {"evaluate", "train"}
    assert (
        condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    )
    inner = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"register"}
    # Steps pass ids, locations and a small config artifact between them, nothing large.
    train_inputs = tasks["train"]["inputs"]["parameters"]
    assert train_inputs["best_overrides"]["taskOutputParameter"] == {
        "outputParameterKey": "best_overrides",
        "producerTask": "tune",
    }
    assert tasks["evaluate"]["inputs"]["parameters"]["checkpoint"]["taskOutputParameter"]["producerTask"] == "train"
    assert not any(t.get("inputs", {}).get("artifacts") for t in tasks.values())
    assert set(spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]) == {"metrics"}
    assert set(spec["components"]["comp-tune"]["outputDefinitions"]["artifacts"]) == {"best_config"}


def test_the_ir_parameters_are_typed_with_defaults(compiled):
    spec, _, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "config": ("STRING", "configs/omniglot-5w1s.yaml"),
        "overrides": ("LIST", []),
        "samples": ("NUMBER_INTEGER", 8),
        "eval_tasks": ("NUMBER_INTEGER", 600),
        "train_iterations": ("NUMBER_INTEGER", 60000),
        "registered_model": ("STRING", "metaplatform-omniglot-5w1s"),
        "alias": ("STRING", "champion"),
        "ray_address": ("STRING", "http://metaplatform-head-svc:8265"),
        "mlflow_uri": ("STRING", "http://metaplatform-mlflow:5000"),
        "runtime_env": ("STRUCT", {}),
    }
    for name, (kind, default) in expected.items():
        assert params[name]["parameterType"] == kind, name
        assert params[name]["defaultValue"] == default, name
    assert all("defaultValue" in p for p in params.values())  # every parameter has a default


def test_the_ir_runs_every_step_on_the_image_without_installs_and_mounts_the_ray_token(compiled):
    spec, platform_spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 4
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == "registry.example/metaplatform:9.9"
        assert "pip install" not in " ".join(container["command"])  # the image carries kfp and the code
    k8s = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("tune", "train", "evaluate"):
        secrets = k8s[f"exec-{step}"]["secretAsEnv"]
        ray = [s for s in secrets if s["keyToEnv"] == [{"envVar": "RAY_AUTH_TOKEN", "secretKey": "auth_token"}]]
        assert ray and ray[0]["secretNameParameter"] == {"componentInputParameter": "ray_token_secret"}
    for executor in k8s.values():  # the chart's NetworkPolicy admits labelled clients
        assert executor["podMetadata"]["labels"] == {"metaplatform.io/client": "true"}
    assert "exec-register" in k8s and "RAY_AUTH_TOKEN" not in json.dumps(k8s["exec-register"])


def test_the_graph_drawn_from_the_ir(compiled):
    *_, dot = compiled
    for edge in ('"tune" -> "train"', '"train" -> "evaluate"', '"evaluate" -> "register"'):
        assert edge in dot
    cluster = dot[dot.index('subgraph "cluster_condition-1"') :]
    assert cluster.index('"register"') < cluster.index("}")  # register is drawn inside the condition


@pytest.mark.parametrize(
    ("output", "needle"), [("pipeline.json", "must end in .yaml"), ("missing/pipeline.yaml", "does not exist")]
)
def test_compile_rejects_a_bad_output_with_exit_2(tmp_path, output, needle):
    result = compile_pipeline(tmp_path, "--output", output)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [] if output.startswith("missing") else not (tmp_path / output).exists()


def test_champion_comparison_follows_the_metric_direction(mlflow_server):
    from pipelines.steps import compare_with_champion

    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"champion-{uuid.uuid4().hex[:8]}")
    name = f"model-{uuid.uuid4().hex[:8]}"
    assert compare_with_champion(client, "test/accuracy", 0.5, name, "champion") == (
        True,
        f"no version of {name!r} holds the alias 'champion' yet",
    )
    run = client.create_run(experiment).info.run_id
    for key, value in {"test/accuracy": 0.9, "test/accuracy_ci95": 0.01}.items():
        client.log_metric(run, key, value)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run}/model", run_id=run).version
    client.set_registered_model_alias(name, "champion", version)
    assert compare_with_champion(client, "test/accuracy", 0.95, name, "champion")[0] is True
    beats, reason = compare_with_champion(client, "test/accuracy", 0.85, name, "champion")
    assert beats is False and "not better than" in reason and "0.9000" in reason
    beats, reason = compare_with_champion(client, "test/loss", 0.1, name, "champion")
    assert beats is True and "has no test/loss" in reason


def test_the_champion_gate_fails_closed(mlflow_server, monkeypatch):
    """Only a missing registered model or alias means "no champion yet"; an MLflow that cannot be
    read (a request it refuses, a stopped server) fails the step instead of promoting the model."""
    from pipelines.steps import StepError, compare_with_champion

    client = MlflowClient(mlflow_server.url)
    name = f"model-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)  # registered, but no version holds the alias
    assert compare_with_champion(client, "test/accuracy", 0.5, name, "champion") == (
        True,
        f"no version of {name!r} holds the alias 'champion' yet",
    )
    with pytest.raises(StepError, match="cannot read the champion .*INVALID_PARAMETER_VALUE"):
        compare_with_champion(client, "test/accuracy", 0.5, "", "champion")  # refused by the server: 400
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on: a stopped server
        s.bind(("127.0.0.1", 0))
        stopped = MlflowClient(f"http://127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(StepError, match=f"cannot read the champion \\(alias 'champion' of {name!r}\\)"):
            compare_with_champion(stopped, "test/accuracy", 0.5, name, "champion")


def test_a_re_submitted_job_resumes_the_failed_one(tmp_path):
    """The commands a retry submits continue the sweep (`--resume`, else the first attempt's
    sweep.json refuses it) and the training (checkpoint.resume=true, else it starts from 0), in
    the pipeline run's own folders; the train command resolves to that config."""
    from pipelines.steps import train_command, tune_command
    from platform.config import load_config

    common = ("s3://bucket/pipelines/", "run-1", "http://mlflow:5000", "exp")
    tune = tune_command("configs/sinusoid.yaml", ["optim.inner_lr=0.1"], 4, "asha", 100, *common)
    assert tune[:5] == ["python", "-m", "platform.tune", "--config", "configs/sinusoid.yaml"]
    assert "--resume" in tune and "checkpoint.dir=s3://bucket/pipelines/run-1/sweep" in tune
    train = train_command("configs/sinusoid.yaml", ["checkpoint.resume=false"], ["optim.inner_lr=0.2"], 100, *common)
    assert train[:3] == ["python", "-m", "platform.train"]
    config = load_config(REPO / train[4], train[5:])
    assert config.checkpoint.resume is True and config.checkpoint.dir == "s3://bucket/pipelines/run-1/train"
    assert (config.optim.inner_lr, config.optim.iterations) == (0.2, 100)


# A driver that needs 5 s after SIGTERM to finish (more than Ray's default 3 s before SIGKILL): it
# says when it runs, and writes "done" into its argument's file once it has finished.
SLOW_TO_STOP = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(5)
    pathlib.Path(sys.argv[1]).write_text("done")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("running", flush=True)
time.sleep(600)
"""
STEP = """
import sys
from pipelines.steps import run_ray_job, run_step
run_step(run_ray_job, sys.argv[1], ["python", "-c", sys.argv[2], sys.argv[3]], sys.argv[4])
"""


def test_a_terminated_step_gives_its_job_s_driver_time_to_checkpoint(ray_cluster, tmp_path):
    """SIGTERM to a step stops its Ray job, and the driver gets the step's stop wait
    (RAY_JOB_STOP_WAIT_TIME_S in the job's runtime_env), not Ray's 3 s, before SIGKILL."""
    done = tmp_path / "done"
    argv = [sys.executable, "-c", STEP, ray_cluster.dashboard_url, SLOW_TO_STOP, str(done), f"stop-{uuid.uuid4().hex[:8]}"]  # fmt: skip
    step = subprocess.Popen(argv, env=ray_cluster.subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in step.stdout:  # the step prints the job's log as it comes
        lines.append(line)
        if line.strip() == "running":
            break
    step.send_signal(signal.SIGTERM)
    out = "".join(lines) + step.communicate(timeout=60)[0]
    assert step.returncode == 1 and "stopped: the step was terminated" in out, out[-3000:]
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done.exists() and done.read_text() == "done", "the driver was killed before it had finished"


def test_a_job_server_that_never_answers_fails_the_step_in_bounded_time(monkeypatch):
    """A head that accepts connections and never answers (a real socket on loopback that nobody
    reads): each request times out, and after UNREACHABLE_S the step fails with a clear message."""
    from pipelines import steps

    monkeypatch.setattr(steps, "REQUEST_TIMEOUT_S", 0.5, raising=False)  # without the fix: no such constant, and a hang
    monkeypatch.setattr(steps, "UNREACHABLE_S", 2.0)
    monkeypatch.setattr(steps, "POLL_S", 0.2)
    errors = []

    def step():
        try:
            steps.run_ray_job(address, ["true"], "silent-1")
        except steps.StepError as e:
            errors.append(str(e))

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # the kernel completes the connections; nothing ever reads or answers
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
        thread = threading.Thread(target=step, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the step hangs on a job server that never answers"
    assert errors and errors[0].startswith(f"the Ray job server at {address} did not answer for 2 s"), errors


def run_local(ray_cluster, mlflow_server, tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    workdir = tmp_path / "image-workdir"  # what the image's /opt/metaplatform holds
    if not workdir.exists():
        shutil.copytree(REPO / "configs", workdir / "configs")
    command = [
        sys.executable, "-m", "pipelines.run_local",
        "--ray-address", ray_cluster.dashboard_url,
        "--mlflow-uri", mlflow_server.url,
        "--config", "configs/sinusoid.yaml",
        "--samples", "2", "--scheduler", "fifo", "--tune-iterations", "10",
        "--eval-tasks", "100",
        "--registered-model", name,
        "--experiment", name,
        "--storage", str(tmp_path / "checkpoints"),
        "--pipeline-root", str(tmp_path / "kfp"),
        "--runtime-env", json.dumps({"working_dir": str(workdir)}),
        *args,
    ]  # fmt: skip
    return subprocess.run(
        command,
        check=False,
        env=ray_cluster.subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def runs_of(client: MlflowClient, experiment: str, step: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.pipeline_step = '{step}'", order_by=["attributes.start_time ASC"])  # fmt: skip


def test_the_pipeline_registers_a_better_model_and_keeps_the_champion_otherwise(ray_cluster, mlflow_server, tmp_path):
    name = f"pipeline-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)

    first = run_local(ray_cluster, mlflow_server, tmp_path, name, "--train-iterations", "40", "--overrides", *OVERRIDES)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-6000:]
    (trained,) = runs_of(client, name, "train")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.run_id == trained.info.run_id
    assert trained.data.tags["champion_comparison"] == f"no version of {name!r} holds the alias 'champion' yet"
    assert trained.data.params["optim.iterations"] == "40"
    # The sweep's best hyperparameters were trained: the same values as in the sweep's best.yaml.
    (sweep,) = [r for r in runs_of(client, name, "tune") if "mlflow.parentRunId" not in r.data.tags]
    best = yaml.safe_load(Path(client.download_artifacts(sweep.info.run_id, "best.yaml", str(tmp_path))).read_text())
    assert float(trained.data.params["optim.inner_lr"]) == pytest.approx(best["optim"]["inner_lr"])
    assert int(trained.data.params["optim.inner_steps"]) == best["optim"]["inner_steps"]
    # The KFP metrics of evaluate: the meta-test MSE with its 95% CI, as logged into the run.
    (evaluated,) = (tmp_path / "kfp").glob("*/evaluate/executor_output.json")
    output = json.loads(evaluated.read_text())
    assert output["parameterValues"] == {"Output": True}
    (metrics,) = output["artifacts"]["metrics"]["artifacts"]
    assert metrics["metadata"] == {
        "loss": pytest.approx(trained.data.metrics["test/loss"]),
        "loss_ci95": pytest.approx(trained.data.metrics["test/loss_ci95"]),
    }
    (best_config,) = (tmp_path / "kfp").glob("*/tune/best_config")  # tune's artifact is the sweep's best.yaml
    assert yaml.safe_load(best_config.read_text()) == best
    assert REGISTER in out
    assert f"registered MLflow run {trained.info.run_id}'s model as {name!r} version 1" in out

    # Two iterations instead of 40: a worse model, so register is skipped and the alias stays.
    second = run_local(ray_cluster, mlflow_server, tmp_path, name, "--train-iterations", "2", "--overrides", *OVERRIDES)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    _, worse = runs_of(client, name, "train")
    # The sweep is seeded by the config: the same trials, so the same hyperparameters were trained.
    for key in ("optim.inner_lr", "optim.outer_lr", "optim.inner_steps"):
        assert worse.data.params[key] == trained.data.params[key], key
    assert worse.data.metrics["test/loss"] > trained.data.metrics["test/loss"]
    reason = worse.data.tags["champion_comparison"]
    assert reason.startswith("test/loss") and f"is not better than {name!r} version 1 (champion)" in reason
    assert REGISTER not in out
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_a_failing_ray_job_fails_its_step_with_the_job_error(ray_cluster, mlflow_server, tmp_path):
    name = f"pipeline-{uuid.uuid4().hex[:8]}"
    result = run_local(
        ray_cluster, mlflow_server, tmp_path, name, "--train-iterations", "5",
        "--overrides", *OVERRIDES, "optim.inner_lr=-1",
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-4000:]
    assert "error: Ray job" in out and "-tune failed" in out
    assert "optim.inner_lr = -1" in out  # the job's own message names the field
    assert "Inner task failed" in out and "Executing task \x1b[96m'train'" not in out
    assert MlflowClient(mlflow_server.url).get_experiment_by_name(name) is None  # nothing trained or tracked
