"""Running real `python -m platform.train` drivers against a test cluster, and comparing their results."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import torch

from platform.checkpoint import CheckpointStore

_started: list[subprocess.Popen] = []


def start_command(args: list[str], env: dict, cwd=None) -> subprocess.Popen:
    """`python -m <args>`; its output (stdout and stderr) is readable line by line. Killed by
    `kill_leftovers` after the test if still running (a failed test must not leave a driver
    holding the cluster's CPUs for the tests after it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _started.append(proc)
    return proc


def started() -> int:
    """How many commands have been started so far (see `kill_leftovers`)."""
    return len(_started)


def kill_leftovers(since: int) -> None:
    """Kill those started after the first `since` that still run (a module's fixture may keep earlier
    ones running for its tests)."""
    while len(_started) > since:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start_train(cluster, *args: str, env=None) -> subprocess.Popen:
    """A driver on `cluster` (a LocalRayCluster)."""
    return start_command(["platform.train", *args], cluster.subprocess_env(**(env or {})))


def finish(proc: subprocess.Popen, timeout: float = 240, returncode: int = 0) -> str:
    """All the driver's output (also what `read_until` read) once it exits with `returncode`."""
    rest, _ = proc.communicate(timeout=timeout)
    out = "".join(getattr(proc, "transcript", [])) + rest
    assert proc.returncode == returncode, out
    return out


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> tuple[re.Match, str]:
    """Read the driver's output line by line until `pattern` matches; returns the match and what was read.

    The lines read are also kept in `proc.transcript`, so `finish` returns the whole output."""
    seen, deadline = [], time.monotonic() + timeout
    if not hasattr(proc, "transcript"):
        proc.transcript = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        proc.transcript.append(line)
        if match := re.search(pattern, line):
            return match, "".join(seen)
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def final_params(location, iterations: int) -> dict[str, torch.Tensor]:
    state = CheckpointStore(location).load()
    assert state["iteration"] == iterations
    return state["params"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), f"{k} differs (max abs diff {(value - b[k]).abs().max():.3g})"
