"""Shared fixtures: real servers on loopback, started once per test session."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/ray_cluster.py

# Set before anything starts: the Ray head (and so every actor) and driver subprocesses inherit
# them. One Omniglot cache for the whole session, so the full set is decoded once.
OMNIGLOT_CACHE = Path(tempfile.mkdtemp(prefix="metaplatform-test-cache-"))
os.environ.setdefault("METAPLATFORM_OMNIGLOT", str(REPO.parent / "shared" / "data" / "omniglot"))
os.environ["METAPLATFORM_CACHE"] = str(OMNIGLOT_CACHE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def omniglot_source() -> str:
    """The complete Omniglot set beside the project (`../shared/data/omniglot`) or $METAPLATFORM_OMNIGLOT."""
    source = os.environ["METAPLATFORM_OMNIGLOT"]
    if not (Path(source) / "images_background.zip").is_file():
        pytest.fail(f"Omniglot not found at {source}: set METAPLATFORM_OMNIGLOT to a folder with the two zips")
    return source


@pytest.fixture(scope="session")
def omniglot_cache() -> Path:
    """The session's cache folder, where the full Omniglot decode is built once."""
    return OMNIGLOT_CACHE


@pytest.fixture(scope="session")
def omniglot(omniglot_source, omniglot_cache):
    """The complete Omniglot set, decoded once per session into the session cache."""
    from platform.data import load_omniglot

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAPLATFORM_CACHE", str(omniglot_cache))
        return load_omniglot(omniglot_source)


@pytest.fixture(scope="session")
def ray_cluster(omniglot):
    """The session's one Ray head on loopback (token auth, 4 logical CPUs, dashboard + job server).

    Connect from a *subprocess* started with `env=ray_cluster.subprocess_env()`: it carries
    RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, which Ray reads
    when it is imported. Omniglot is decoded first, so actors find it in the shared cache.
    """
    from ray_cluster import LocalRayCluster

    with LocalRayCluster(num_cpus=4) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback; yields its endpoint URL.

    It also sets the standard AWS environment variables, so boto3 in this process and in
    subprocesses started by tests talks to it.
    """
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for_port(port)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
