"""What the pipeline's steps do (pipelines/pipeline.py wraps each in a KFP component).

Each step is a client: it submits a Ray job to the cluster (`platform.tune`, `platform.train`,
`platform.evaluate`, the same commands a user types), follows it to the end while printing its
logs, and then reads what the job left in MLflow. Steps pass ids and locations, never data.

Every Ray job is found again in MLflow by two tags the step sets on it through overrides:
`pipeline_run` (the KFP run) and `pipeline_step`. Ray submission ids are `<pipeline run>-<step>`,
so a retried step follows the job it already started (or that finished) instead of running it
twice; only a failed or stopped job is submitted again, under a new id. Every job resumes what is in
its folder (`--resume`, `checkpoint.resume=true`; a fresh folder starts from nothing), so a
re-submitted job continues the failed one's sweep or training instead of being refused or
starting over.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

POLL_S = 2.0
UNREACHABLE_S = 120.0
# Ray's job client sets no timeout: a job server that accepts and never answers would hang the step.
REQUEST_TIMEOUT_S = 30.0
# What a stopped job's driver gets between SIGTERM and SIGKILL (Ray's default is 3 s); the driver
# finishes its iteration and writes the final checkpoint in that time. The jobs' runtime_env may
# set RAY_JOB_STOP_WAIT_TIME_S itself.
STOP_WAIT_S = 120
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The meta-test metric of each kind of task, and whether higher is better.
TEST_METRICS = {"test/accuracy": True, "test/loss": False}


class StepError(RuntimeError):
    """A step cannot finish; its message says why (shown as the step's error in KFP)."""


def run_step(step, *args):
    """`step(*args)`; a StepError ends the step with its message and exit status 1, no traceback."""
    try:
        return step(*args)
    except StepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# -- Ray jobs ---------------------------------------------------------------------------------------


def ray_client(address: str):
    """A job client for `address` with the cluster's token ($RAY_AUTH_TOKEN, from the Secret on
    Kubernetes) whose every request times out after REQUEST_TIMEOUT_S."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # read by Ray when it is imported: hence the import here
    from ray.job_submission import JobSubmissionClient

    class BoundedClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):  # every request of the SDK goes through here
            return super()._do_request(method, endpoint, timeout=kwargs.pop("timeout", REQUEST_TIMEOUT_S), **kwargs)

    return _answered(address, BoundedClient, address)


def _answered(address: str, call, *args, **kwargs):
    """`call(*args, **kwargs)`, retried while the job server does not answer (a head pod restarting,
    a request timing out), for up to UNREACHABLE_S; then a StepError."""
    since = time.monotonic()
    while True:
        try:
            return call(*args, **kwargs)
        except OSError as e:  # requests' errors, timeouts included, are OSErrors
            if time.monotonic() - since > UNREACHABLE_S:
                raise StepError(
                    f"the Ray job server at {address} did not answer for {UNREACHABLE_S:.0f} s: {e}"
                ) from None
            time.sleep(POLL_S)


def job_runtime_env(runtime_env: dict | None) -> dict:
    """The jobs' runtime_env: `runtime_env` with the driver's stop wait (RAY_JOB_STOP_WAIT_TIME_S,
    read by Ray's job supervisor) unless it sets one."""
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), **runtime_env.get("env_vars", {})}
    return runtime_env


def run_ray_job(address: str, entrypoint: list[str], submission_id: str, runtime_env: dict | None = None) -> str:
    """Submit (or follow again) a Ray job, print its logs as they come, and return its submission id.

    Raises StepError when the job fails or is stopped, with the job's last lines in the message.
    Stops the job when this step is terminated (SIGTERM from Kubeflow, Ctrl-C here); its driver then
    has STOP_WAIT_S to checkpoint. A job server that stops answering for a while (a head pod
    restarting) is waited for, up to UNREACHABLE_S.
    """
    client = ray_client(address)
    submission_id, existing = _answered(address, _resumable_id, client, submission_id)
    command = shlex.join(entrypoint)
    if existing is not None:
        print(f"following Ray job {submission_id} (already submitted): {command}", flush=True)
    else:
        print(f"submitting Ray job {submission_id} to {address}: {command}", flush=True)
        _answered(
            address,
            client.submit_job,
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=job_runtime_env(runtime_env),
        )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    printed, logs, unreachable_since = 0, "", None
    try:
        while True:
            try:
                info = client.get_job_info(submission_id)
                logs = client.get_job_logs(submission_id)
                unreachable_since = None
            except (RuntimeError, OSError) as e:  # the SDK raises RuntimeError for failed requests
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_S:
                    raise StepError(
                        f"the Ray job server at {address} did not answer for {UNREACHABLE_S:.0f} s: {e}"
                    ) from None
                time.sleep(POLL_S)
                continue
            print(logs[printed:], end="", flush=True)
            printed = len(logs)
            if str(info.status.value) in TERMINAL:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        try:
            client.stop_job(submission_id)
        except (RuntimeError, OSError) as e:
            raise StepError(f"the step was terminated, and stopping Ray job {submission_id} failed: {e}") from None
        raise StepError(f"Ray job {submission_id} stopped: the step was terminated") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    status = str(info.status.value)
    if status != "SUCCEEDED":
        # Ray's message repeats the logs after its first line: the end of the logs is enough.
        summary = (info.message or "").strip().splitlines()[:1]
        tail = "\n".join(logs.strip().splitlines()[-15:])
        raise StepError(f"Ray job {submission_id} {status.lower()}: {' '.join(summary)}\n{tail}")
    return submission_id


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _job(client, submission_id: str):
    """The job's details, or None when the job server has no such job."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as e:
        if "404" in str(e):
            return None
        raise


def _resumable_id(client, submission_id: str):
    """`submission_id`, or the first `-retryN` after it that names no failed or stopped job, with
    the details of the job it names (None when there is none yet)."""
    candidate, n = submission_id, 1
    while (job := _job(client, candidate)) is not None and str(job.status.value) in ("FAILED", "STOPPED"):
        n += 1
        candidate = f"{submission_id}-retry{n}"
    return candidate, job


def platform_command(command: str, config: str, overrides: list[str], extra: list[str], step: str, pipeline_run: str,
                     mlflow_uri: str, experiment: str, options: list[str] = ()) -> list[str]:  # fmt: skip
    """`python -m platform.<command> --config <config> <options> <overrides> <extra>`, tracked for this step."""
    tracking = [
        f"tracking.uri={mlflow_uri}",
        f"tracking.experiment={experiment}",
        f"tracking.tags.pipeline_run={pipeline_run}",
        f"tracking.tags.pipeline_step={step}",
    ]
    return ["python", "-m", f"platform.{command}", "--config", config, *options, *overrides, *extra, *tracking]


def tune_command(config: str, overrides: list[str], samples: int, scheduler: str, iterations: int, storage: str,
                 pipeline_run: str, mlflow_uri: str, experiment: str) -> list[str]:  # fmt: skip
    """The tune job's command: the sweep in `<storage>/<pipeline run>/sweep`, continued if it is there
    (`--resume`: a re-submitted job would otherwise be refused by the first attempt's sweep.json)."""
    extra = [f"optim.iterations={iterations}", f"checkpoint.dir={storage.rstrip('/')}/{pipeline_run}/sweep"]
    options = ["--samples", str(samples), "--scheduler", scheduler, "--resume"]
    return platform_command("tune", config, overrides, extra, "tune", pipeline_run, mlflow_uri, experiment, options)


def train_folder(storage: str, pipeline_run: str) -> str:
    return f"{storage.rstrip('/')}/{pipeline_run}/train"


def train_command(config: str, overrides: list[str], best_overrides: list[str], iterations: int, storage: str,
                  pipeline_run: str, mlflow_uri: str, experiment: str) -> list[str]:  # fmt: skip
    """The train job's command: checkpoints in `<storage>/<pipeline run>/train`, resumed from the
    newest one there (a re-submitted job continues the failed one's training, not from iteration 0)."""
    folder = train_folder(storage, pipeline_run)
    extra = [*best_overrides, f"optim.iterations={iterations}", f"checkpoint.dir={folder}", "checkpoint.resume=true"]
    return platform_command("train", config, overrides, extra, "train", pipeline_run, mlflow_uri, experiment)


# -- MLflow -----------------------------------------------------------------------------------------


def mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    from mlflow import MlflowClient

    return MlflowClient(uri)


def find_run(client, experiment: str, pipeline_run: str, step: str):
    """The MLflow run of this pipeline run's `step` (the sweep's parent run for tune)."""
    found = client.get_experiment_by_name(experiment)
    runs = []
    if found is not None:
        runs = client.search_runs(
            [found.experiment_id],
            f"tags.pipeline_run = '{pipeline_run}' and tags.pipeline_step = '{step}'",
            order_by=["attributes.start_time DESC"],
        )
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # not a sweep's trials
    if not runs:
        raise StepError(f"no MLflow run of step {step} of pipeline run {pipeline_run} in experiment {experiment!r}")
    return runs[0]


def _dotted(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


# -- the steps --------------------------------------------------------------------------------------


def tune(ray_address: str, mlflow_uri: str, experiment: str, config: str, overrides: list[str], samples: int,
         scheduler: str, iterations: int, storage: str, runtime_env: dict, pipeline_run: str,
         best_config_path: str) -> tuple[str, list[str]]:  # fmt: skip
    """Run a sweep; write the best trial's config to `best_config_path`.

    Returns the sweep's MLflow parent run id and the best trial's hyperparameters as overrides."""
    command = tune_command(config, overrides, samples, scheduler, iterations, storage, pipeline_run, mlflow_uri,
                           experiment)  # fmt: skip
    run_ray_job(ray_address, command, f"{pipeline_run}-tune", runtime_env)
    client = mlflow_client(mlflow_uri)
    sweep = find_run(client, experiment, pipeline_run, "tune")
    with tempfile.TemporaryDirectory() as folder:
        text = Path(client.download_artifacts(sweep.info.run_id, "best.yaml", folder)).read_text()
    Path(best_config_path).write_text(text)
    best = yaml.safe_load(text)
    space = sorted(k.removeprefix("space.") for k in sweep.data.params if k.startswith("space."))
    best_overrides = [f"{k}={json.dumps(_dotted(best, k))}" for k in space]
    print(
        f"best trial {sweep.data.tags.get('best.trial')} of sweep run {sweep.info.run_id}: {' '.join(best_overrides)}"
    )
    return sweep.info.run_id, best_overrides


def train(ray_address: str, mlflow_uri: str, experiment: str, config: str, overrides: list[str],
          best_overrides: list[str], iterations: int, storage: str, runtime_env: dict,
          pipeline_run: str) -> tuple[str, str]:  # fmt: skip
    """Train the best config for the full budget; returns its MLflow run id and final checkpoint."""
    command = train_command(config, overrides, best_overrides, iterations, storage, pipeline_run, mlflow_uri,
                            experiment)  # fmt: skip
    run_ray_job(ray_address, command, f"{pipeline_run}-train", runtime_env)
    run = find_run(mlflow_client(mlflow_uri), experiment, pipeline_run, "train")
    checkpoint = run.data.tags.get("checkpoint.final") or train_folder(storage, pipeline_run)
    print(f"trained: MLflow run {run.info.run_id}, checkpoint {checkpoint}")
    return run.info.run_id, checkpoint


def meta_test_result(client, run_id: str) -> tuple[str, float, float] | None:
    """(metric, mean, 95% CI half-width) of the newest meta-test logged into a run, if any."""
    metrics = client.get_run(run_id).data.metrics
    for name in TEST_METRICS:  # the one with a confidence interval is the task's metric
        if f"{name}_ci95" in metrics:
            return name, metrics[name], metrics[f"{name}_ci95"]
    return None


def evaluate(ray_address: str, mlflow_uri: str, run_id: str, checkpoint: str, tasks: int, registered_model: str,
             alias: str, runtime_env: dict, pipeline_run: str) -> tuple[dict[str, float], bool]:  # fmt: skip
    """Meta-test the checkpoint on `tasks` held-out tasks (logged into its run), and compare it with
    the model holding `alias` (why is tagged on the run). Returns the KFP metrics and whether it beats that model."""
    command = ["python", "-m", "platform.evaluate", "--checkpoint", checkpoint, "--tasks", str(tasks)]
    run_ray_job(ray_address, command, f"{pipeline_run}-evaluate", runtime_env)
    client = mlflow_client(mlflow_uri)
    result = meta_test_result(client, run_id)
    if result is None:
        raise StepError(f"the evaluation logged no meta-test metric into MLflow run {run_id}")
    name, value, ci95 = result
    short = name.removeprefix("test/")
    metrics = {short: value, f"{short}_ci95": ci95}
    beats, reason = compare_with_champion(client, name, value, registered_model, alias)
    client.set_tag(run_id, "champion_comparison", reason)
    print(f"meta-test {short} {value:.4f} ± {ci95:.4f} over {tasks} tasks; {reason}")
    return metrics, beats


def champion_version(client, name: str, alias: str):
    """The version of registered model `name` holding `alias`, or None when there is none (no such
    registered model, or no version with that alias). Anything else (a network error, a 403) is a
    StepError: taken for "no champion", it would promote any model."""
    from mlflow.exceptions import MlflowException  # mlflow's import takes seconds: only in the steps that use it

    def unreadable(e: Exception) -> StepError:
        return StepError(f"cannot read the champion (alias {alias!r} of {name!r}) from MLflow: {e}")

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None  # no such registered model yet
        raise unreadable(e) from None
    if alias not in model.aliases:
        return None
    try:
        return client.get_model_version(name, model.aliases[alias])
    except MlflowException as e:
        raise unreadable(e) from None


def compare_with_champion(client, metric: str, value: float, name: str, alias: str) -> tuple[bool, str]:
    """Whether `value` of `metric` beats the model version holding `alias` of registered model `name`."""
    champion = champion_version(client, name, alias)
    if champion is None:
        return True, f"no version of {name!r} holds the alias {alias!r} yet"
    held = meta_test_result(client, champion.run_id) if champion.run_id else None
    if held is None or held[0] != metric:
        return True, f"{name!r} version {champion.version} ({alias}) has no {metric} to compare with"
    higher_is_better = TEST_METRICS[metric]
    beats = value > held[1] if higher_is_better else value < held[1]
    relation = ("better than" if beats else "not better than") + f" {name!r} version {champion.version} ({alias})"
    return beats, f"{metric} {value:.4f} is {relation}: {held[1]:.4f}"


def register(mlflow_uri: str, run_id: str, registered_model: str, alias: str, pipeline_run: str) -> str:
    """Register the run's model as a new version of `registered_model` and move `alias` to it."""
    import mlflow

    client = mlflow_client(mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    result = meta_test_result(client, run_id)
    tags = {"pipeline_run": pipeline_run}
    if result is not None:
        tags[result[0]] = f"{result[1]:.6g}"
    version = mlflow.register_model(f"runs:/{run_id}/model", registered_model, tags=tags)
    client.set_registered_model_alias(registered_model, alias, version.version)
    client.set_tag(run_id, "registered_model", f"{registered_model} version {version.version} ({alias})")
    print(f"registered MLflow run {run_id}'s model as {registered_model!r} version {version.version}; {alias!r} -> it")
    return str(version.version)
