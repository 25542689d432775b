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
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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
    return subprocess.Popen(
        [sys.executable, "-m", "platform.train", *BASE, f"checkpoint.dir={checkpoint_dir}", *overrides],
        env=cluster.subprocess_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_train(cluster, checkpoint_dir, *overrides: str, env=None, timeout=240) -> str:
    proc = start_train(cluster, checkpoint_dir, *overrides, env=env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> tuple[re.Match, str]:
    """Read the driver's output line by line until `pattern` matches; returns the match and what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match, "".join(seen)
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def final_params(location) -> dict[str, torch.Tensor]:
    state = CheckpointStore(location).load()
    assert state["iteration"] == ITERATIONS
    return state["params"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), f"{k} differs (max abs diff {(value - b[k]).abs().max():.3g})"


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


def test_a_killed_worker_is_replaced_and_the_result_is_unchanged(ray_cluster, reference, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2")
    match, _ = read_until(proc, r"workers: pid (\d+)")
    read_until(proc, r"iter\s+30/")
    os.kill(int(match[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert f"worker 0 (pid {match[1]}) failed" in out
    assert "1 worker failures, 1 restarts" in out
    assert_same_params(final_params(tmp_path), reference)


def test_a_hung_worker_is_treated_as_dead(ray_cluster, reference, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.workers=2", "resources.worker_timeout_s=3")
    match, _ = read_until(proc, r"workers: pid \d+ \(\w+\), pid (\d+)")
    read_until(proc, r"iter\s+30/")
    os.kill(int(match[1]), signal.SIGSTOP)  # alive but silent
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "no answer within resources.worker_timeout_s=3s" in out
    assert "1 worker failures, 1 restarts" in out
    assert_same_params(final_params(tmp_path), reference)


def test_no_workers_to_be_had_stops_with_a_message(ray_cluster, tmp_path):
    proc = start_train(ray_cluster, tmp_path, "resources.cpus_per_worker=64", "resources.start_timeout_s=2")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "could not reserve 2 workers" in out and "resources.start_timeout_s=2s" in out
    assert "Traceback" not in out
    assert CheckpointStore(tmp_path).latest() == 0


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
