"""Tracking for real: MLflow (embedded SQLite store, and an `mlflow server` on PostgreSQL with
artifacts proxied to S3), outages of that server, the spool and its `sync`, and resumed runs.

Drivers are real `python -m platform.train` processes on the session's Ray head.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from driver_runs import assert_same_params, final_params, finish, read_until, start_command
from mlflow import MlflowClient

from platform.checkpoint import CheckpointStore
from platform.config import RunConfig
from platform.driver import IterationRecord
from platform.learner import load_learner
from platform.mlflow_model import QUIET_NOTICES

ITERATIONS = 200
BASE = [
    "task.kind=sinusoid",
    f"optim.iterations={ITERATIONS}",
    "optim.meta_batch=10",
    "optim.chunk=2",
    "checkpoint.every=50",
    "eval.every=100",
    "eval.tasks=50",
    "log_every=50",
    "tracking.log_every=10",
    "resources.workers=2",
]
LOGGED_STEPS = list(range(10, ITERATIONS + 1, 10))


def track(cluster, location, *overrides, uri=None, env=None):
    """A driver tracking to `uri` (None: no MLFLOW_TRACKING_URI, the embedded default)."""
    environment = {k: v for k, v in cluster.subprocess_env(**(env or {})).items() if k != "MLFLOW_TRACKING_URI"}
    if uri:
        environment["MLFLOW_TRACKING_URI"] = uri
    return start_command(
        ["platform.train", *BASE, f"checkpoint.dir={location}", *overrides], environment, location.parent
    )


def the_run(client: MlflowClient, out: str):
    run_id = re.search(r"tracked as MLflow run (\w+)", out)[1]
    return client.get_run(run_id)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


@pytest.fixture(scope="module")
def server_run(ray_cluster, mlflow_server, tmp_path_factory):
    """One run tracked to the real server, registering its model: (output, run, checkpoint dir)."""
    location = tmp_path_factory.mktemp("server-run") / "ckpt"
    proc = track(ray_cluster, location, "tracking.register_as=sinusoid-maml", uri=mlflow_server.url)
    out = finish(proc)
    return out, the_run(MlflowClient(mlflow_server.url), out), location


def test_the_embedded_default_needs_no_server(ray_cluster, tmp_path):
    location = tmp_path / "checkpoints"
    out = finish(track(ray_cluster, location))
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert f"open the MLflow UI on it: mlflow ui --backend-store-uri {store}" in out
    for notice in ("Downloading artifacts", *QUIET_NOTICES):  # MLflow's chatter at the model's save and log
        assert notice not in out
    client = MlflowClient(store)
    run = the_run(client, out)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.inner_lr"] == "0.01" and run.data.params["resources.workers"] == "2"
    assert run.data.tags["algorithm"] == "maml" and run.data.tags["task"] == "sinusoid"
    assert steps(client, run.info.run_id, "train/loss") == LOGGED_STEPS
    assert steps(client, run.info.run_id, "val/mse") == [100, 200]
    assert any(k.startswith("system/cpu") for k in run.data.metrics)
    files = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for folder in ("plots", "evaluation") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"config.yaml", "plots/learning_curves.png", "plots/sinusoid_adaptation.png"} <= files
    # The logged config is the resolved one, re-runnable as it is.
    config_yaml = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    config = RunConfig.model_validate(yaml.safe_load(Path(config_yaml).read_text()))
    assert config.optim.iterations == ITERATIONS and config.checkpoint.dir == str(location)
    report = json.loads(
        Path(client.download_artifacts(run.info.run_id, "evaluation/evaluation.json", str(tmp_path))).read_text()
    )
    assert report["iteration"] == ITERATIONS and report["tasks"] == 50
    # The model loads back and adapts as the checkpoint does.
    mlflow.set_tracking_uri(store)
    state = CheckpointStore(location).load()
    x, y = torch.linspace(-5, 5, 10).unsqueeze(1), torch.sin(torch.linspace(-5, 5, 10)).unsqueeze(1)
    query = torch.linspace(-4, 4, 7).unsqueeze(1)
    served = load_learner(f"runs:/{run.info.run_id}/model").adapt(x, y).predict(query)
    expected = load_learner(location).adapt(x, y).predict(query)
    assert np.allclose(served, expected, atol=1e-6) and all(
        torch.equal(v, state["params"][k]) for k, v in load_learner(f"runs:/{run.info.run_id}/model").params.items()
    )
    # No spool is left once everything was delivered.
    assert not (location / "mlflow-spool").exists()


def test_a_server_run_stores_in_postgres_and_s3_and_registers_the_model(server_run, mlflow_server, postgres):
    import boto3

    _, run, _ = server_run
    client = MlflowClient(mlflow_server.url)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert steps(client, run.info.run_id, "train/loss") == LOGGED_STEPS
    bucket = mlflow_server.artifacts_destination.removeprefix("s3://").split("/")[0]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/plots/learning_curves.png") for k in keys)
    with postgres.connect("mlflow") as db:
        assert db.execute("select status from runs where run_uuid = %s", (run.info.run_id,)).fetchone() == ("FINISHED",)
    (version,) = client.search_model_versions("name = 'sinusoid-maml'")
    assert version.run_id == run.info.run_id
    assert run.data.tags["registered_model"] == f"sinusoid-maml version {version.version}"


def test_evaluate_logs_into_the_checkpoints_run(server_run, mlflow_server, ray_cluster):
    _, run, location = server_run
    env = {**ray_cluster.subprocess_env(), "MLFLOW_TRACKING_URI": mlflow_server.url}
    result = subprocess.run(
        [sys.executable, "-m", "platform.evaluate", "--checkpoint", str(location), "--tasks", "40"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"logged to MLflow run {run.info.run_id}" in result.stdout
    metrics = MlflowClient(mlflow_server.url).get_run(run.info.run_id).data.metrics
    mse = float(re.search(r"mse ([\d.]+)", result.stdout)[1])
    assert metrics["test/loss"] == pytest.approx(mse, abs=5e-5) and "test/loss_ci95" in metrics

    # Other test-time settings (K = 5 instead of the run's 10) are logged under names of their own.
    result = subprocess.run(
        [sys.executable, "-m", "platform.evaluate", "--checkpoint", str(location), "--tasks", "40", "--shots", "5"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and ", K = 5)" in result.stdout, result.stdout + result.stderr
    metrics = MlflowClient(mlflow_server.url).get_run(run.info.run_id).data.metrics
    assert metrics["test-k5q10/loss"] == pytest.approx(float(re.search(r"mse ([\d.]+)", result.stdout)[1]), abs=5e-5)
    assert metrics["test/loss"] == pytest.approx(mse, abs=5e-5)  # the run's own setting is untouched


def test_a_server_outage_mid_run_loses_nothing(ray_cluster, mlflow_server, server_run, tmp_path):
    location = tmp_path / "ckpt"
    # Slower iterations than the server run would be a different run; so keep its config and stop
    # the server early, while the run is young.
    proc = track(ray_cluster, location, "tracking.flush_timeout_s=300", uri=mlflow_server.url)
    read_until(proc, r"\d+ workers: pid")
    mlflow_server.stop()
    try:
        read_until(proc, r"warning: tracking server .* unreachable")
    finally:
        mlflow_server.start()
    out = finish(proc, timeout=400)
    # Two warnings in all: when it went away, when it was back.
    assert out.count("warning: tracking server") == 2 and out.count("is back; delivering") == 1, out
    client = MlflowClient(mlflow_server.url)
    run = the_run(client, out)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/tasks_per_s", "workers/alive"):
        assert steps(client, run.info.run_id, key) == LOGGED_STEPS, key  # each step once, in order
    assert steps(client, run.info.run_id, "val/mse") == [100, 200]
    assert_same_params(final_params(location, ITERATIONS), final_params(server_run[2], ITERATIONS))


def test_server_down_from_the_start_then_sync_delivers_the_spool(ray_cluster, mlflow_server, tmp_path):
    from services import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    location = tmp_path / "ckpt"
    out = finish(track(ray_cluster, location, "tracking.flush_timeout_s=0", uri=dead))
    assert out.count("unreachable") == 2  # when it went away, and at the end
    spool = re.search(r"send them later with: python -m platform.track sync (\S+)", out)[1]
    assert spool.startswith(str(location / "mlflow-spool"))

    sync = [sys.executable, "-m", "platform.track", "sync", spool]
    still_dead = subprocess.run(sync, capture_output=True, text=True, timeout=120, check=False)
    assert still_dead.returncode == 1 and f"{dead} unreachable" in still_dead.stderr
    result = subprocess.run(
        [*sync, "--uri", mlflow_server.url], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = re.search(r"to MLflow run (\w+)", result.stdout)[1]
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps(client, run_id, "train/loss") == LOGGED_STEPS
    assert not os.path.exists(spool)


def test_resume_continues_the_same_run_without_duplicate_steps(ray_cluster, mlflow_server, server_run, tmp_path):
    location = tmp_path / "ckpt"
    proc = track(ray_cluster, location, uri=mlflow_server.url)
    read_until(proc, r"iter\s+150/")  # past the checkpoint at 150... or at 100: steps after it were logged
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = finish(track(ray_cluster, location, "--resume", uri=mlflow_server.url))
    client = MlflowClient(mlflow_server.url)
    run = the_run(client, out)
    runs = client.search_runs(
        [run.info.experiment_id], f"tags.`metaplatform.run_key` = '{run.data.tags['metaplatform.run_key']}'"
    )
    assert len(runs) == 1 and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == LOGGED_STEPS
    assert_same_params(final_params(location, ITERATIONS), final_params(server_run[2], ITERATIONS))


def test_tracking_never_touches_the_parameters(ray_cluster, server_run, tmp_path):
    location = tmp_path / "ckpt"
    finish(track(ray_cluster, location, "tracking.mlflow=false"))
    assert_same_params(final_params(location, ITERATIONS), final_params(server_run[2], ITERATIONS))


def test_metric_values_are_the_records(server_run, mlflow_server):
    _, run, location = server_run
    history = CheckpointStore(location).load()["history"]
    logged = {
        m.step: m.value for m in MlflowClient(mlflow_server.url).get_metric_history(run.info.run_id, "train/loss")
    }
    assert all(np.isclose(logged[r["iteration"]], r["loss"]) for r in history if r["iteration"] in logged)


def start_tracker(mlflow_server, location, context: dict, *overrides: str, said: list, saved: dict | None = None):
    """An MlflowTracker started in this process (no training), tracking to the server."""
    from platform.config import load_config
    from platform.tracking import MlflowTracker

    uri = f"tracking.uri={mlflow_server.url}"
    config = load_config(None, [*BASE, f"checkpoint.dir={location}", uri, "tracking.experiment=restarts", *overrides])
    tracker = MlflowTracker(report=said.append)
    tracker.on_start(config, context, saved or {})
    return tracker


def record(iteration: int, **values) -> IterationRecord:
    """An iteration's record as train() makes it: zeros but for `values`."""
    return IterationRecord(
        **dict.fromkeys(IterationRecord.__dataclass_fields__, 0) | {"val": None} | values | {"iteration": iteration}
    )


def run_with_key(mlflow_server, key: str):
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("restarts").experiment_id
    (run,) = client.search_runs([experiment], f"tags.`metaplatform.run_key` = '{key}'")
    return client, run


def test_a_restart_whose_spool_was_delivered_updates_the_same_run(mlflow_server, tmp_path):
    """A Tune trial restarted after its spool was delivered and removed (as under PBT): it finds its
    run by the run key, sets the new tags on it, keeps the first params, and MLflow refuses nothing."""
    said = []
    for resumed_from, overrides in (
        (None, ["optim.inner_lr=0.01"]),
        (20, ["optim.inner_lr=0.02", "tracking.tags.exploit=yes"]),
    ):
        tracker = start_tracker(
            mlflow_server, tmp_path, {"run_key": "trial-1", "resumed_from": resumed_from}, *overrides, said=said
        )
        tracker.on_end("KILLED", None)
        assert not tracker.spool.folder.exists()  # delivered, so removed
    assert said == []
    client, run = run_with_key(mlflow_server, "trial-1")
    assert run.data.tags["exploit"] == "yes" and run.data.params["optim.inner_lr"] == "0.01"
    schedule = client.get_metric_history(run.info.run_id, "hparams/inner_lr")
    assert sorted((m.step, m.value) for m in schedule) == [(0, 0.01), (20, 0.02)]


@pytest.mark.parametrize("branched", [False, True])
def test_steps_sent_again_only_on_a_branch(mlflow_server, tmp_path, branched):
    """A trial killed after sending steps 10-40 restarts from iteration 20: from its own checkpoint it
    recomputes what it sent (30, 40 are not sent again); from another run's (a PBT exploit) its
    curve branches at 20 and 30, 40 are new points."""
    key, said = f"trial-{branched}", []
    val = {"loss": 1.0, "loss_ci95": 0.1, "loss_before": 2.0}
    for resumed_from, steps in ((None, [10, 20, 30, 40]), (20, [30, 40])):
        context = {"run_key": key, "resumed_from": resumed_from, "branched": branched and resumed_from is not None}
        tracker = start_tracker(mlflow_server, tmp_path, context, said=said)
        for step in steps:
            tracker.on_validation(record(step, val=val))
        assert tracker.delivery.flush(30)
        tracker.delivery.close()  # killed: no on_end, the spool stays
    assert said == []
    client, run = run_with_key(mlflow_server, key)
    logged = [m.step for m in sorted(client.get_metric_history(run.info.run_id, "val/mse"), key=lambda m: m.timestamp)]
    assert logged == ([10, 20, 30, 40, 30, 40] if branched else [10, 20, 30, 40])


def test_resuming_into_a_store_without_the_run_starts_a_run_that_continues_it(mlflow_server, tmp_path):
    """The checkpoint names a run the tracking store does not hold (another embedded store, a rebuilt
    server): a new run gets the records, tagged with the id it continues, and nothing is refused."""
    said, lost = [], "0123456789abcdef0123456789abcdef"
    context = {"run_key": "from-elsewhere", "resumed_from": 20}
    tracker = start_tracker(mlflow_server, tmp_path, context, said=said, saved={"run_id": lost})
    tracker.on_validation(record(30, val={"loss": 1.0, "loss_ci95": 0.1, "loss_before": 2.0}))
    tracker.on_end("FINISHED", None)
    client, run = run_with_key(mlflow_server, "from-elsewhere")
    assert run.info.run_id != lost and run.data.tags["metaplatform.continues_run"] == lost
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mse")] == [30]
    assert said == [f"MLflow run {lost} is not in {mlflow_server.url}; a new run continues it"]


def test_a_full_disk_under_the_spool_only_warns_once(mlflow_server, tmp_path):
    """Every record the spool cannot write (here /dev/full: ENOSPC) is lost to tracking, and said
    once; the observer never raises into the training loop."""
    said = []
    tracker = start_tracker(mlflow_server, tmp_path, {"run_key": "full-disk"}, said=said)
    assert tracker.delivery.flush(30)
    records = tracker.spool.folder / "records.jsonl"
    records.unlink()
    records.symlink_to("/dev/full")
    for iteration in range(10, 60, 10):
        tracker.on_iteration(record(iteration, seconds=1.0, tasks=10, loss=0.5))
    tracker.on_checkpoint_written("somewhere", 50)
    tracker.delivery.close()
    assert len(said) == 1 and "cannot write the tracking spool" in said[0] and "training goes on" in said[0], said


def test_checkpoint_latest_names_only_checkpoints_on_storage(tmp_path):
    """The `checkpoint.latest` tag names a checkpoint once it is written, never when it is queued:
    checkpoint 20 cannot be written (a folder holds its digest's name, so every write of it fails
    until a newer one supersedes it) and is never named; the others are named in order."""
    from services import free_port

    from platform.config import load_config
    from platform.delivery import RunSpool
    from platform.train import train

    location = tmp_path / "ckpt"
    (location / "ckpt-00000020.pt.sha256").mkdir(parents=True)
    overrides = [*BASE, "optim.iterations=60", "checkpoint.every=10", "checkpoint.keep=10", "eval.every=0"]
    overrides += ["resources.execution=local", f"checkpoint.dir={location}"]
    # A tracking server that is not there: the records stay in the spool, where the test reads them.
    overrides += [f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.flush_timeout_s=0"]
    train(load_config(None, overrides))
    (folder,) = (location / "mlflow-spool").iterdir()
    named = [
        r["tags"]["checkpoint.latest"] for r in RunSpool(folder).records if "checkpoint.latest" in r.get("tags", {})
    ]
    store = CheckpointStore(location)
    assert 20 not in store.iterations() and store.iterations()[-1] == 60
    assert named == [store.uri(i) for i in store.iterations()], named


def test_with_checkpoints_in_s3_the_spool_is_kept_in_metaplatform_spool(
    mlflow_server, s3_bucket, tmp_path, monkeypatch, capsys
):
    """S3 checkpoints leave no folder to keep the spool beside: it goes under $METAPLATFORM_SPOOL (on
    the chart, a volume that outlives the pod), not into the cache (the pod's /tmp there); the hint
    names that folder, and syncing it from there delivers the run."""
    from services import free_port

    from platform.config import load_config
    from platform.data import cache_dir
    from platform.track import sync
    from platform.train import train

    durable = tmp_path / "durable"
    monkeypatch.setenv("METAPLATFORM_SPOOL", str(durable))
    overrides = [*BASE, "optim.iterations=20", "eval.every=0", "resources.execution=local"]
    overrides += [f"checkpoint.dir=s3://{s3_bucket}/run", "tracking.experiment=durable-spool"]
    overrides += [f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.flush_timeout_s=0"]
    train(load_config(None, overrides))
    spool = Path(re.search(r"send them later with: python -m platform.track sync (\S+)", capsys.readouterr().err)[1])
    assert spool.parent.parent == durable and (spool / "records.jsonl").is_file()
    assert not list(cache_dir().glob(f"mlflow-spool/*/{spool.name}"))
    assert sync(spool, mlflow_server.url) == 0 and not spool.exists()
    run_id = re.search(r"to MLflow run (\w+)", capsys.readouterr().out)[1]
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(run_id).info.status == "FINISHED" and steps(client, run_id, "train/loss") == [10, 20]


def test_a_model_record_sent_twice_logs_and_registers_once(mlflow_server, tmp_path):
    """The answer to the model record was lost (the server logged and registered it): delivering the
    record again neither logs a second model nor registers a second version."""
    from platform.algorithms import build
    from platform.config import load_config
    from platform.delivery import Delivery, RunSpool
    from platform.mlflow_model import save_model

    config = load_config(None, BASE)
    _, _, params = build(config)
    spool = RunSpool(tmp_path / "spool", mlflow_server.url)
    save_model(config, params, spool.files / "model")
    tags = {"metaplatform.run_key": "model-twice"}
    spool.append(
        {"op": "start", "experiment": "restarts", "run_name": None, "tags": tags, "params": {}, "start_time": 0}
    )
    spool.append({"op": "model", "file": "model", "register_as": "sent-twice"})
    said: list[str] = []
    delivery = Delivery(spool, mlflow_server.url, report=said.append)
    while spool.pending:
        assert delivery.run_once()
    spool.set_delivered(1)  # as if the model's answer had been lost: the record goes again
    while spool.pending:
        assert delivery.run_once()
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(spool.run_id)
    assert len(client.search_model_versions("name = 'sent-twice'")) == 1
    assert len(client.search_logged_models([run.info.experiment_id], f"source_run_id = '{spool.run_id}'")) == 1
    assert run.data.tags["registered_model"] == "sent-twice version 1" and said == []
