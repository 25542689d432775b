"""Live Prometheus metrics for real: drivers serving /metrics, parsed with prometheus-client's own
parser, then scraped by a real Prometheus, where every query of the Grafana dashboard must return data.

Two drivers run side by side on the session's Ray head, as two users' runs would: a regression run
(sinusoid: meta-validation MSE) and a classification run (a small image folder: accuracy), so every
panel of the dashboard has a series to show.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from driver_runs import finish, read_until, start_train
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "metaplatform" / "dashboards" / "metaplatform.json"
LABELS = {"run_id", "experiment", "algorithm"}
FAMILIES = {  # name -> type, as documented in platform/metrics.py
    "metaplatform_meta_iterations": "counter",
    "metaplatform_tasks": "counter",
    "metaplatform_meta_train_loss": "gauge",
    "metaplatform_meta_train_accuracy": "gauge",
    "metaplatform_meta_validation_accuracy": "gauge",
    "metaplatform_meta_validation_mse": "gauge",
    "metaplatform_iteration_duration_seconds": "histogram",
    "metaplatform_phase_seconds": "counter",
    "metaplatform_gradient_bytes": "counter",
    "metaplatform_actors_alive": "gauge",
    "metaplatform_actor_failures": "counter",
    "metaplatform_actor_restarts": "counter",
}
COMMON = ["optim.iterations=1000000", "eval.every=20", "eval.tasks=10", "log_every=50", "tracking.mlflow=false"]
RUNS = {
    "regression": ["task.kind=sinusoid", "optim.meta_batch=10", "optim.chunk=5", "resources.workers=2"],
    "classification": [
        "task.kind=folder", "task.shots=1", "task.query=2", "model.kind=conv4", "model.width=8",
        "optim.meta_batch=4", "optim.chunk=2", "optim.test_inner_steps=1", "resources.workers=1",
        "tracking.experiment=images", "algorithm=fomaml",
    ],
}  # fmt: skip


def image_folder(root: Path) -> Path:
    for c in range(40):  # 15% of them, 6, are the validation classes: enough for 5 ways
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=(c * 7 + i * 50) % 256).save(root / f"class{c:02d}" / f"{i}.png")
    return root


def scrape(port: int) -> dict[str, dict]:
    """{family name: {"type", "samples": [(sample name, labels, value)]}} of one scrape of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        f.name: {"type": f.type, "samples": [(s.name, s.labels, s.value) for s in f.samples]}
        for f in text_string_to_metric_families(text)
        if f.name.startswith("metaplatform_")
    }


def value(families: dict, sample: str, **labels) -> float:
    family = re.sub(r"_(total|bucket|count|sum)$", "", sample)
    (found,) = [v for n, lab, v in families[family]["samples"] if n == sample and labels.items() <= lab.items()]
    return found


def listen_port() -> int:
    """A free port below the kernel's ephemeral range (32768-60999) and above Ray's worker ports
    (10002-19999): one from the ephemeral range can be taken, between this pick and the driver's bind,
    by an outgoing connection of a process starting up (the drivers' own, to Ray)."""
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """{kind: port} of two running drivers that have meta-validated at least once; stopped at the end."""
    tmp = tmp_path_factory.mktemp("metrics")
    data = image_folder(tmp / "images")
    procs, ports = {}, {}
    try:
        for kind, overrides in RUNS.items():
            ports[kind] = listen_port()
            extra = [f"task.data={data}"] if kind == "classification" else []
            procs[kind] = start_train(
                ray_cluster,
                *COMMON,
                *overrides,
                *extra,
                f"tracking.prometheus_port={ports[kind]}",
                f"checkpoint.dir={tmp / kind}",
            )
        for proc in procs.values():
            read_until(proc, r"meta-validation at 20:", timeout=180)
        yield ports
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            out = finish(proc, timeout=120, returncode=130)  # Ctrl-C: checkpoint, exit 130
            assert "Traceback" not in out


def test_metrics_endpoint_serves_the_documented_families(runs):
    for kind, port in runs.items():
        first = scrape(port)
        assert {name: f["type"] for name, f in first.items()} == FAMILIES, kind
        for name, family in first.items():
            for _, labels, _ in family["samples"]:
                assert LABELS <= labels.keys(), (name, labels)
        time.sleep(1.0)
        second = scrape(port)
        algorithm = "fomaml" if kind == "classification" else "maml"
        (run_id,) = {lab["run_id"] for _, lab, _ in second["metaplatform_meta_iterations"]["samples"]}
        assert re.fullmatch(r"[0-9a-f]{32}", run_id)
        labels = {"run_id": run_id, "algorithm": algorithm}

        iterations = value(second, "metaplatform_meta_iterations_total", **labels)
        assert iterations > value(first, "metaplatform_meta_iterations_total", **labels) >= 20  # it is live
        batch = 10 if kind == "regression" else 4
        # The counters agree with each other (within the one iteration a scrape may see half-counted).
        assert abs(value(second, "metaplatform_tasks_total", **labels) - batch * iterations) <= batch
        assert abs(value(second, "metaplatform_iteration_duration_seconds_count", **labels) - iterations) <= 1
        phases = {
            lab["phase"]: v for n, lab, v in second["metaplatform_phase_seconds"]["samples"] if n.endswith("_total")
        }
        assert phases.keys() == {"actor_compute", "transfer", "outer_update"} and all(v > 0 for v in phases.values())
        # The phases add up to the iterations' wall time.
        assert sum(phases.values()) == pytest.approx(
            value(second, "metaplatform_iteration_duration_seconds_sum", **labels), rel=0.1
        )
        assert value(second, "metaplatform_gradient_bytes_total", **labels) > 0
        assert value(second, "metaplatform_actors_alive", **labels) == (1 if kind == "classification" else 2)
        assert value(second, "metaplatform_actor_failures_total", **labels) == 0
        assert value(second, "metaplatform_meta_train_loss", **labels) > 0
        gauges = {n for n, f in second.items() if f["type"] == "gauge" and f["samples"]}
        if kind == "classification":
            assert 0 <= value(second, "metaplatform_meta_validation_accuracy", **labels) <= 1
            assert "metaplatform_meta_validation_mse" not in gauges
        else:
            assert value(second, "metaplatform_meta_validation_mse", **labels) > 0
            assert not gauges & {"metaplatform_meta_validation_accuracy", "metaplatform_meta_train_accuracy"}


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def test_a_real_prometheus_scrapes_the_drivers_and_every_dashboard_query_returns_data(runs, prometheus):
    queries = dashboard_queries()
    assert len(queries) >= 10
    used = {name for _, expr in queries for name in re.findall(r"metaplatform_\w+", expr)}
    # Every family is on the dashboard (histograms through their _bucket/_sum/_count series).
    assert {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used} == set(FAMILIES)

    prometheus.set_targets([f"127.0.0.1:{port}" for port in runs.values()])
    try:
        prometheus.wait_for_targets_up(timeout=60)
        pending, deadline = dict(queries), time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            for title, expr in list(pending.items()):
                # What Grafana sends with every variable at "All" (its allValue is .*).
                promql = re.sub(r"\$(run_id|experiment|algorithm)\b", ".*", expr)
                if [r for r in prometheus.query(promql) if r["value"][1] not in ("NaN",)]:
                    del pending[title]
            time.sleep(1.0)
        assert not pending, f"dashboard queries without data: {pending}"
        # The dashboard's variables come from these labels.
        series = prometheus.query("metaplatform_meta_iterations_total")
        assert {r["metric"]["experiment"] for r in series} == {"metaplatform", "images"}
        assert {r["metric"]["algorithm"] for r in series} == {"maml", "fomaml"}
    finally:
        prometheus.set_targets([])


def test_a_port_that_cannot_be_served_is_a_usage_error(ray_cluster, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "platform.train", f"tracking.prometheus_port={port}", f"checkpoint.dir={tmp_path}"],
            env=ray_cluster.subprocess_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: tracking.prometheus_port = {port}: cannot serve metrics there" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())
