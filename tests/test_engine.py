"""The Ray engine end to end: drivers are real `python -m platform.train` processes on the shared cluster.

Every run below uses the same small sinusoid config, so each one's final parameters can be
compared bitwise with one uninterrupted reference run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import driver_runs
import numpy as np
import pytest
import torch
from conftest import folder_with_a_corrupt_image
from driver_runs import assert_same_params, finish, read_until
from services import Sender, file_server

from platform.checkpoint import CheckpointStore

ITERATIONS = 120
BASE = [
    "task.kind=sinusoid",
    f"optim.iterations={ITERATIONS}",
    "optim.meta_batch=10",
    "optim.chunk=2",
    "checkpoint.every=20",
    "checkpoint.keep=2",
    "eval.every=0",
    "log_every=10",
]


def start_train(cluster, checkpoint_dir, *overrides: str, env=None) -> subprocess.Popen:
    return driver_runs.start_train(cluster, *BASE, f"checkpoint.dir={checkpoint_dir}", *overrides, env=env)


def run_train(cluster, checkpoint_dir, *overrides: str, env=None, timeout=240) -> str:
    return finish(start_train(cluster, checkpoint_dir, *overrides, env=env), timeout)


def final_params(location) -> dict[str, torch.Tensor]:
    return driver_runs.final_params(location, ITERATIONS)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """Final parameters of an uninterrupted 2-worker run."""
    location = tmp_path_factory.mktemp("reference")
    out = run_train(ray_cluster, location, "resources.workers=2")
    assert "0 worker failures, 0 restarts" in out
    return final_params(location)


def test_training_moves_the_parameters(reference, ray_cluster):
    from platform.algorithms import build
    from platform.config import RunConfig

    _, _, initial = build(RunConfig.model_validate({"task": {"kind": "sinusoid"}}))
    assert any(not torch.equal(initial[k], reference[k]) for k in reference)


@pytest.mark.parametrize("workers", [1, 3])
def test_same_parameters_whatever_the_number_of_workers(ray_cluster, reference, tmp_path, workers):
    run_train(ray_cluster, tmp_path, f"resources.workers={workers}")
    assert_same_params(final_params(tmp_path), reference)


# Failure runs go on past ITERATIONS, keeping every checkpoint, until the replacement actor has
# joined; their state at ITERATIONS is compared with the reference, then they are stopped.
LONGER = [f"optim.iterations={20 * ITERATIONS}", "checkpoint.keep=1000"]


def stop_past_the_reference(proc) -> str:
    while int(read_until(proc, r"iter\s+(\d+)/")[0][1]) <= ITERATIONS:
        pass
    proc.send_signal(signal.SIGINT)
    return finish(proc, returncode=130)


def reference_state(location):
    return CheckpointStore(location).load(ITERATIONS)["params"]


def test_a_killed_worker_is_replaced_and_the_result_is_unchanged(ray_cluster, reference, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2", *LONGER)
    match, _ = read_until(proc, r"workers: pid (\d+)")
    read_until(proc, r"iter\s+30/")
    os.kill(int(match[1]), signal.SIGKILL)
    read_until(proc, r"worker 0 restarted \(pid \d+ on node \w+\); 2 of 2 workers")
    out = stop_past_the_reference(proc)
    assert f"worker 0 (pid {match[1]}) failed" in out
    assert_same_params(reference_state(tmp_path), reference)


def test_a_hung_worker_is_treated_as_dead(ray_cluster, reference, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2", "resources.worker_timeout_s=3", *LONGER)
    match, _ = read_until(proc, r"workers: pid \d+ \([^)]*\), pid (\d+)")
    read_until(proc, r"iter\s+30/")
    os.kill(int(match[1]), signal.SIGSTOP)  # alive but silent
    read_until(proc, r"worker 1 restarted")
    out = stop_past_the_reference(proc)
    assert f"worker 1 (pid {match[1]}) failed: no answer within resources.worker_timeout_s=3s" in out
    assert_same_params(reference_state(tmp_path), reference)


def test_no_workers_to_be_had_stops_with_a_message(ray_cluster, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.cpus_per_worker=64", "resources.start_timeout_s=2")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "could not reserve 2 workers" in out and "resources.start_timeout_s=2s" in out
    assert "Traceback" not in out
    assert CheckpointStore(tmp_path).latest() == 0


def test_data_only_an_actor_can_read_is_one_usage_error_not_dying_actors(ray_cluster, tmp_path):
    """A folder data set whose listing is fine (what the driver checks) but with an image the actors
    cannot decode: exit 2 at once with the actor's message, no restarts, no tracebacks, no checkpoint."""
    data = folder_with_a_corrupt_image(tmp_path / "data")
    overrides = [
        "task.kind=folder",
        f"task.data={data}",
        "task.ways=2",
        "task.shots=1",
        "task.query=1",
        "model.kind=conv4",
    ]
    proc = driver_runs.start_train(
        ray_cluster,
        *overrides,
        "model.width=8",
        "optim.meta_batch=4",
        "optim.chunk=2",
        "eval.every=0",
        f"checkpoint.dir={tmp_path / 'c'}",
    )
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task.data" in errors[0] and "class3/1.png: cannot read the image" in errors[0], out
    assert "Traceback" not in out and "worker failures" not in out and "restarted" not in out, out
    assert CheckpointStore(tmp_path / "c").latest() is None


def paced(seconds_per_file: float, spans: list[tuple[float, float]]) -> Sender:
    """Each file spread over `seconds_per_file`; the (start, end) of each file sent whole goes to `spans`."""

    def send(write, body: bytes, closing: threading.Event) -> None:
        start, pieces = time.monotonic(), 50
        for k in range(pieces):
            write(body[k * len(body) // pieces : (k + 1) * len(body) // pieces])
            closing.wait(seconds_per_file / pieces)
        spans.append((start, time.monotonic()))

    return send


def half_then_nothing(write, body: bytes, closing: threading.Event) -> None:
    write(body[: len(body) // 2])
    closing.wait()


# Omniglot from an https-like source: each actor downloads it into its node's cache (the decoded
# images are in the session's cache already: the download is what is slow here).
SLOW_OMNIGLOT = [
    "task.kind=omniglot", "task.ways=5", "task.shots=1", "task.query=1", "model.kind=conv4", "model.width=8",
    "optim.iterations=2", "optim.meta_batch=2", "optim.chunk=1", "resources.workers=1", "eval.every=0",
    "tracking.mlflow=false",
]  # fmt: skip


def test_loading_the_data_slower_than_the_start_timeout_is_not_a_failed_start(ray_cluster, omniglot_source, tmp_path):
    """The first actor on a node downloads the data set: its start is bounded by start_timeout_s, its
    data by data_timeout_s, so a download longer than the start timeout is neither killed nor restarted."""
    start_timeout = 5
    spans = []
    with file_server(Path(omniglot_source), paced(4, spans)) as url:
        proc = driver_runs.start_train(
            ray_cluster, *SLOW_OMNIGLOT, f"task.data={url}", f"resources.start_timeout_s={start_timeout}",
            "resources.max_worker_failures=0", f"checkpoint.dir={tmp_path}",
        )  # fmt: skip
        out = finish(proc, timeout=180)
    assert len(spans) == 2 and spans[-1][1] - spans[0][0] > start_timeout, spans
    assert "0 worker failures, 0 restarts" in out, out
    assert CheckpointStore(tmp_path).latest() == 2


def test_data_that_never_loads_is_one_data_error_after_data_timeout_s(ray_cluster, tmp_path):
    """A download that stalls: after resources.data_timeout_s, exit 2 with one line, no restarts."""
    served = tmp_path / "served"
    served.mkdir()
    for part in ("background", "evaluation"):
        (served / f"images_{part}.zip").write_bytes(b"\0" * 100_000)
    with file_server(served, half_then_nothing) as url:
        proc = driver_runs.start_train(
            ray_cluster, *SLOW_OMNIGLOT, f"task.data={url}", "resources.data_timeout_s=3",
            f"checkpoint.dir={tmp_path / 'c'}",
        )  # fmt: skip
        out = finish(proc, timeout=180, returncode=2)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert f"task.data = {url!r}: on node " in errors[0] and "within resources.data_timeout_s=3s" in errors[0], out
    assert "Traceback" not in out and "worker 0 (" not in out and "restarted" not in out, out
    assert CheckpointStore(tmp_path / "c").latest() is None


@pytest.mark.parametrize("store", ["local", "s3"])
def test_resume_after_the_driver_is_killed(ray_cluster, reference, tmp_path, store, request):
    if store == "s3":
        request.getfixturevalue("s3_server")
        location = f"s3://{request.getfixturevalue('s3_bucket')}/runs/a"
    else:
        location = str(tmp_path / "ckpt")
    proc = start_train(ray_cluster, location, "resources.workers=2")
    read_until(proc, r"iter\s+50/")
    proc.kill()  # SIGKILL: no chance to write anything
    proc.communicate()
    latest = CheckpointStore(location).latest()
    assert latest is not None and 0 < latest < ITERATIONS
    out = run_train(ray_cluster, location, "resources.workers=2", "--resume")
    assert f"resumed from {location} at iteration {latest}" in out
    assert_same_params(final_params(location), reference)


def test_ctrl_c_checkpoints_and_says_how_to_resume(ray_cluster, reference, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2")
    read_until(proc, r"iter\s+40/")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    stopped = int(re.search(r"SIGINT: stopped after iteration (\d+)", out)[1])
    assert "--resume" in out and "Traceback" not in out
    assert CheckpointStore(tmp_path).latest() == stopped
    changed = start_train(ray_cluster, tmp_path, "optim.inner_lr=0.5", "--resume")
    out, _ = changed.communicate(timeout=120)
    assert changed.returncode == 2 and "optim.inner_lr = 0.5: the checkpoint was trained with 0.01" in out, out
    run_train(ray_cluster, tmp_path, "resources.workers=2", "--resume")
    assert_same_params(final_params(tmp_path), reference)


def test_a_stop_during_meta_validation_cuts_it_short_and_resumes_exactly(ray_cluster, reference, tmp_path):
    """SIGTERM (what `ray job stop` sends, with RAY_JOB_STOP_WAIT_TIME_S before SIGKILL) while a long
    meta-validation runs: the driver does not wait for it, writes the final checkpoint and exits; the
    resumed run ends with the uninterrupted run's parameters (validation never touches them)."""
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2", "eval.every=40", "eval.tasks=50000")
    read_until(proc, r"iter\s+40/")  # printed just before the meta-validation at 40 starts
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, timeout=120, returncode=130)
    assert "SIGTERM: stopped after iteration 40" in out and "meta-validation at 40" not in out, out
    assert CheckpointStore(tmp_path).latest() == 40
    run_train(ray_cluster, tmp_path, "resources.workers=2", "--resume")
    assert_same_params(final_params(tmp_path), reference)


def test_a_resumed_run_without_workers_leaves_its_checkpoint_as_it_was(ray_cluster, tmp_path):
    """Nothing trained since the resume: the checkpoint resumed from stays the final one, byte for byte
    (with the observers' state, e.g. the MLflow run id), rather than being rewritten."""
    run_train(ray_cluster, tmp_path, "resources.workers=1", "optim.iterations=20")
    digest = (tmp_path / "ckpt-00000020.pt.sha256").read_text()
    proc = start_train(ray_cluster, tmp_path, "resources.cpus_per_worker=64", "resources.start_timeout_s=2", "--resume")
    out = finish(proc, timeout=120, returncode=1)
    assert "could not reserve" in out and f"checkpoint {tmp_path / 'ckpt-00000020.pt'}" in out, out
    assert CheckpointStore(tmp_path).iterations() == [20]
    assert (tmp_path / "ckpt-00000020.pt.sha256").read_text() == digest


def test_ray_job_submit(ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python -m platform.train ...` from the repo root."""
    repo = Path(__file__).resolve().parents[1]
    ray = str(Path(sys.executable).parent / "ray")
    job = f"test-{tmp_path.name}"
    checkpoint_dir = tmp_path / "job"
    submit = [ray, "job", "submit", "--address", ray_cluster.dashboard_url, "--submission-id", job]
    train = ["--config", "configs/sinusoid.yaml", "optim.iterations=30", "eval.every=30", "eval.tasks=20"]
    train += ["log_every=10", f"checkpoint.dir={checkpoint_dir}"]
    env = ray_cluster.subprocess_env()
    result = subprocess.run(
        [*submit, "--working-dir", ".", "--", "python", "-m", "platform.train", *train],
        check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    status = subprocess.run(
        [ray, "job", "status", job], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert f"Job '{job}' succeeded" in status.stdout + status.stderr  # the CLI's words for SUCCEEDED
    logs = subprocess.run(
        [ray, "job", "logs", job], check=False, env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "iter     30/30" in logs and "done: 30 iterations, 0 worker failures" in logs
    state = CheckpointStore(checkpoint_dir).load()
    assert state["iteration"] == 30 and np.isfinite(state["history"][-1]["val"]["loss"])


def test_an_s3_outage_during_checkpoints_does_not_stop_training(ray_cluster, reference, tmp_path, monkeypatch):
    import boto3
    from services import S3Server

    with S3Server() as s3:
        s3_env = {**s3.env, "AWS_MAX_ATTEMPTS": "2"}
        client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
        client.create_bucket(Bucket="ckpts")
        proc = start_train(ray_cluster, "s3://ckpts/run", "resources.workers=2", env=s3_env)
        read_until(proc, r"iter\s+30/")
        s3.stop()
        read_until(proc, r"warning: checkpoint storage failed \(s3://ckpts/run/ckpt-00000040.pt")
        read_until(proc, r"iter\s+(6|7|8|9)0/")  # training went on meanwhile
        s3.start()  # same endpoint, empty store
        client.create_bucket(Bucket="ckpts")
        out = finish(proc)
        assert out.count("warning: checkpoint storage failed") == 1 and "checkpoint storage is back" in out
        for k, v in s3_env.items():  # read the store as a user would (this test's server only)
            monkeypatch.setenv(k, v)
        store = CheckpointStore("s3://ckpts/run")
        for iteration in store.iterations():  # nothing partial is listed: every one verifies
            assert store.load(iteration)["iteration"] == iteration
        assert_same_params(final_params("s3://ckpts/run"), reference)


def test_resume_skips_a_damaged_newest_checkpoint(ray_cluster, reference, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2")
    read_until(proc, r"iter\s+70/")
    proc.kill()
    proc.communicate()
    store = CheckpointStore(tmp_path)
    *_, previous, newest = store.iterations()
    path = tmp_path / f"ckpt-{newest:08d}.pt"
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a full disk
    out = run_train(ray_cluster, tmp_path, "resources.workers=2", "--resume")
    assert f"{path}: damaged checkpoint" in out and f"resumed from {tmp_path} at iteration {previous}" in out
    assert_same_params(final_params(tmp_path), reference)


def test_resume_with_every_checkpoint_damaged_names_them_and_exits_2(ray_cluster, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2")
    read_until(proc, r"iter\s+50/")
    proc.kill()
    proc.communicate()
    names = [f"ckpt-{i:08d}.pt" for i in CheckpointStore(tmp_path).iterations()]
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 64)
    out = finish(start_train(ray_cluster, tmp_path, "--resume"), returncode=2)
    assert "no intact checkpoint" in out and all(str(tmp_path / n) in out for n in names)
    assert "Traceback" not in out
