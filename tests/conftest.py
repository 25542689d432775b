"""Shared fixtures: real servers on loopback, started once per test session."""

import os
import shutil
import socket
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
# Training runs track to MLflow by default, into ./mlruns.db of their working dir; tests keep the
# repo clean with one session store (tests of tracking itself say where they track).
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{OMNIGLOT_CACHE / 'mlruns.db'}"


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


def folder_with_a_corrupt_image(root: Path) -> Path:
    """A folder data set of 10 classes x 2 images whose listing passes the driver's checks, with one image
    (class3/1.png) that cannot be decoded: what only the process that reads the images finds."""
    from PIL import Image  # imported here: only the tests of bad data need it

    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=c * 20 + i).save(root / f"class{c}" / f"{i}.png")
    (root / "class3" / "1.png").write_bytes(b"not a png")
    return root


@pytest.fixture(autouse=True)
def _no_leftover_drivers():
    """A driver a test started and left running (the test failed before it ended) is killed; those of
    module fixtures (set up before this fixture) are left to them."""
    from driver_runs import kill_leftovers, started

    before = started()
    yield
    kill_leftovers(before)


@pytest.fixture(scope="session")
def omniglot_source() -> str:
    """The complete Omniglot set beside the project (`../shared/data/omniglot`) or $METAPLATFORM_OMNIGLOT."""
    source = os.environ["METAPLATFORM_OMNIGLOT"]
    if not (Path(source) / "images_background.zip").is_file():
        pytest.fail(f"Omniglot not found at {source}: set METAPLATFORM_OMNIGLOT to a folder with the two zips")
    return source


@pytest.fixture(scope="session")
def cifar10_source() -> Path:
    """The shared CIFAR-10 photographs (600 RGB 32x32 JPEGs per class) beside the project, a `folder` data set."""
    source = REPO.parent / "shared" / "data" / "cifar10"
    if not (source / "airplane").is_dir():
        pytest.fail(f"CIFAR-10 photographs not found at {source}")
    return source


@pytest.fixture(scope="session")
def benchmark_stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for the benchmarks the presets use (tests/benchmark_files.py): kind -> task.data."""
    from benchmark_files import stand_ins

    return stand_ins(tmp_path_factory.mktemp("stand-ins"))


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
    from services import S3Server

    with S3Server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server.url
        finally:
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


# -- PostgreSQL, MLflow, Prometheus (tests/services.py): each started at most once per session,
# and only when a test asks for it.


@pytest.fixture(scope="session")
def postgres():
    """The session's private PostgreSQL 15 on 127.0.0.1 (password auth); a services.PostgresServer.

    `postgres.create_database(name)` returns "postgresql://USER:PASS@127.0.0.1:PORT/name";
    `postgres.connect(name)` gives a psycopg (3) connection.
    """
    from services import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server):
    """The session's real `mlflow server` (a services.MlflowServer): backend store = database
    "mlflow" on `postgres`, artifacts proxied by the server to s3://<fresh bucket>/mlflow on the
    `s3_server`. Clients use `mlflow.MlflowClient(mlflow_server.url)`.

    A test that stops it (to simulate an outage) must start it again, in a `finally`: the same
    object comes back on the same port with the same database.
    """
    import boto3
    from services import MlflowServer

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    # The server's boto3 reads the endpoint from MLFLOW_S3_ENDPOINT_URL (else AWS_ENDPOINT_URL) and
    # credentials/region from the AWS_* variables s3_server put in os.environ.
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_server}
    with MlflowServer(postgres.create_database("mlflow"), f"s3://{bucket}/mlflow", env=env) as server:
        yield server


@pytest.fixture(scope="session")
def prometheus():
    """The session's Prometheus (a services.PrometheusServer, 1 s scrape interval, no targets yet).

    Point it at your exporters with `prometheus.set_targets(["127.0.0.1:PORT"])` (reloads the
    config), then `prometheus.wait_for_targets_up()` and `prometheus.query("promql")`.
    """
    from services import PrometheusServer

    with PrometheusServer([], scrape_interval="1s") as server:
        yield server


def pytest_unconfigure(config):
    """The session's cache (decoded Omniglot, the session's MLflow store) goes with the session."""
    shutil.rmtree(OMNIGLOT_CACHE, ignore_errors=True)
