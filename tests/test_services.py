"""The loopback servers of tests/services.py really work: PostgreSQL, MLflow (on PostgreSQL + S3), Prometheus."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import boto3
import psycopg
import pytest
from services import PrometheusServer, free_port

# -- PostgreSQL ---------------------------------------------------------------------------------


def test_postgres_password_auth_and_databases(postgres):
    url = postgres.create_database("svc_check")
    assert url == f"postgresql://{postgres.user}:{postgres.password}@127.0.0.1:{postgres.port}/svc_check"
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (41), (1)")
        assert conn.execute("SELECT sum(x)::int, current_database(), current_user FROM t").fetchone() == (
            42,
            "svc_check",
            postgres.user,
        )
        # TCP connections really are password-checked (SCRAM), as in production.
        method = conn.execute("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' LIMIT 1").fetchone()
        assert method == ("scram-sha-256",)
    wrong = url.replace(f":{postgres.password}@", ":wrong@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


# -- MLflow -------------------------------------------------------------------------------------


def _artifact_location(server) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(server.artifacts_destination)
    return parsed.netloc, parsed.path.strip("/")


def test_mlflow_tracks_to_postgres_and_artifacts_to_s3(mlflow_server, tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"svc-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, run_name="svc-check")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("meta_loss", 1.0 / (step + 1), now + step, step) for step in range(5)],
        params=[Param("algorithm", "maml"), Param("inner_lr", "0.4")],
        tags=[RunTag("suite", "services")],
    )
    checkpoint = tmp_path / "ckpt-5.pt"
    checkpoint.write_bytes(b"not really a checkpoint " + run_id.encode())
    client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoints")
    client.set_terminated(run_id)

    # Through the API.
    stored = client.get_run(run_id)
    assert stored.data.params == {"algorithm": "maml", "inner_lr": "0.4"}
    assert stored.data.metrics["meta_loss"] == pytest.approx(0.2)
    assert [m.step for m in client.get_metric_history(run_id, "meta_loss")] == [0, 1, 2, 3, 4]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/ckpt-5.pt"]

    # The artifact went through the server into the S3 bucket (moto), under the destination prefix.
    bucket, prefix = _artifact_location(mlflow_server)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    key = f"{prefix}/{experiment_id}/{run_id}/artifacts/checkpoints/ckpt-5.pt"
    assert key in keys, keys
    assert boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read() == checkpoint.read_bytes()

    # The run, its params and metrics are rows in PostgreSQL.
    with psycopg.connect(mlflow_server.backend_store_uri) as conn:
        row = conn.execute(
            "SELECT name, status, experiment_id, artifact_uri FROM runs WHERE run_uuid = %s", (run_id,)
        ).fetchone()
        assert row == (
            "svc-check",
            "FINISHED",
            int(experiment_id),
            f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts",
        )
        params = dict(conn.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)).fetchall())
        assert params == {"algorithm": "maml", "inner_lr": "0.4"}
        steps = conn.execute("SELECT step FROM metrics WHERE run_uuid = %s ORDER BY step", (run_id,)).fetchall()
        assert [s for (s,) in steps] == [0, 1, 2, 3, 4]


def test_mlflow_server_outage_and_restart(mlflow_server, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"svc-restart-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "meta_loss", 0.9, step=0)
    url, port = mlflow_server.url, mlflow_server.port

    mlflow_server.stop()
    try:
        assert not mlflow_server.running
        # The client retries a refused connection 7 times with backoff by default (minutes).
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        with pytest.raises(MlflowException, match="(?i)connection"):
            client.log_metric(run_id, "meta_loss", 0.8, step=1)
    finally:
        mlflow_server.start()

    assert (mlflow_server.url, mlflow_server.port) == (url, port)
    assert [m.value for m in client.get_metric_history(run_id, "meta_loss")] == [0.9]
    client.log_metric(run_id, "meta_loss", 0.7, step=2)
    client.set_terminated(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "meta_loss")] == [(0, 0.9), (2, 0.7)]
    assert client.get_run(run_id).info.status == "FINISHED"


# -- Prometheus ---------------------------------------------------------------------------------


def _query_value(prometheus, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_a_registry_and_reports_a_dead_target(prometheus):
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    steps = Counter("metaplatform_svc_steps", "meta-iterations done", registry=registry)
    steps.inc(7)
    port = free_port()
    httpd, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    live, dead = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"  # nothing listens on `dead`
    try:
        # Both in one change: Prometheus applies target changes only every ~5 s.
        prometheus.set_targets([live, dead])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = prometheus.target_health()
            if health.get(live) == "up" and health.get(dead) == "down":
                break
            time.sleep(0.1)
        assert (health.get(live), health.get(dead)) == ("up", "down"), health
        with pytest.raises(TimeoutError, match="not all up"):
            prometheus.wait_for_targets_up(timeout=0.5)

        expr = f'metaplatform_svc_steps_total{{job="test", instance="{live}"}}'
        deadline = time.monotonic() + 15
        while _query_value(prometheus, expr) != 7.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _query_value(prometheus, expr) == 7.0
        steps.inc(3)  # a later scrape sees the new value
        while _query_value(prometheus, expr) != 10.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _query_value(prometheus, expr) == 10.0
        assert _query_value(prometheus, f'up{{instance="{live}"}}') == 1.0
        assert _query_value(prometheus, f'up{{instance="{dead}"}}') == 0.0

        prometheus.set_targets([live])
        prometheus.wait_for_targets_up(timeout=30)
    finally:
        prometheus.set_targets([])
        httpd.shutdown()
        httpd.server_close()


# -- Nothing left behind ------------------------------------------------------------------------

_ORPHAN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from services import PostgresServer, PrometheusServer
pg, prom = PostgresServer().start(), PrometheusServer([]).start()
print(json.dumps({"pids": pg.processes() + prom.processes(), "dirs": [pg.temp_dir, prom.temp_dir]}), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_servers_stop_cleanly_and_die_with_a_killed_test_run():
    # stop(): every process gone, temp dir removed.
    with PrometheusServer([]) as prom:
        pids, temp_dir = prom.processes(), prom.temp_dir
        assert pids and Path(temp_dir).is_dir()
    assert not [p for p in pids if _alive(p)] and not Path(temp_dir).exists()

    # SIGKILL the owner (as when a test run is killed): PR_SET_PDEATHSIG takes the servers down.
    owner = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = owner.stdout.readline()
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    started = json.loads(line)
    try:
        assert len(started["pids"]) >= 3  # postmaster + its background processes, prometheus
        deadline = time.monotonic() + 20
        while [p for p in started["pids"] if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started["pids"] if _alive(p)]
    finally:
        for d in started["dirs"]:  # nothing is left to remove these after a SIGKILL
            subprocess.run(["rm", "-rf", d], check=False)
