"""Live Prometheus metrics of a training run, served by the driver on `tracking.prometheus_port`.

Names follow Prometheus conventions (base units, `_total` counters, `_seconds`). Every series
carries the labels run_id (the run's key, also the MLflow tag metaplatform.run_key), experiment
and algorithm:

    metaplatform_meta_iterations_total          counter    meta-iterations done
    metaplatform_tasks_total                    counter    tasks adapted in meta-training
    metaplatform_meta_train_loss                gauge      query loss of the last meta-iteration
    metaplatform_meta_train_accuracy            gauge      its query accuracy (classification)
    metaplatform_meta_validation_accuracy       gauge      last meta-validation accuracy (classification)
    metaplatform_meta_validation_mse            gauge      last meta-validation MSE (regression)
    metaplatform_iteration_duration_seconds     histogram  wall time of one meta-iteration
    metaplatform_phase_seconds_total{phase}     counter    time per phase: actor_compute, transfer, outer_update
    metaplatform_gradient_bytes_total           counter    bytes moved: parameters to actors, gradients back
    metaplatform_actors_alive                   gauge      adaptation actors alive
    metaplatform_actor_failures_total           counter    actor failures (deaths, hangs, failed starts)
    metaplatform_actor_restarts_total           counter    replacement actors started
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from platform.config import ConfigError, RunConfig
from platform.driver import PHASES, IterationRecord
from platform.observers import Observer

LABELS = ("run_id", "experiment", "algorithm")
# Meta-iterations take from ~10 ms (sinusoid) to seconds (Omniglot, second order).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PrometheusExporter(Observer):
    """Serves `/metrics` on `port` (all interfaces: the driver's pod is scraped from outside it) from
    construction until the process ends; a port that cannot be served is a config error, raised
    before anything starts."""

    name = "prometheus"

    def __init__(self, port: int):
        # No `<name>_created` series beside every counter and histogram: the text format would expose
        # them as gauges of their own, which no dashboard uses. (Process-wide, so set when used.)
        disable_created_metrics()
        self.port = port
        self.registry = CollectorRegistry()
        r = self.registry
        self.iterations = Counter("metaplatform_meta_iterations", "Meta-iterations done", LABELS, registry=r)
        self.tasks = Counter("metaplatform_tasks", "Tasks adapted in meta-training", LABELS, registry=r)
        self.loss = Gauge("metaplatform_meta_train_loss", "Query loss of the last meta-iteration", LABELS, registry=r)
        self.accuracy = Gauge(
            "metaplatform_meta_train_accuracy", "Query accuracy of the last meta-iteration", LABELS, registry=r
        )
        self.val_accuracy = Gauge(
            "metaplatform_meta_validation_accuracy", "Last meta-validation accuracy", LABELS, registry=r
        )
        self.val_mse = Gauge("metaplatform_meta_validation_mse", "Last meta-validation MSE", LABELS, registry=r)
        self.duration = Histogram(
            "metaplatform_iteration_duration_seconds",
            "Wall time of one meta-iteration",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.phase = Counter(
            "metaplatform_phase_seconds", "Time per phase of the meta-iterations", (*LABELS, "phase"), registry=r
        )
        self.bytes = Counter(
            "metaplatform_gradient_bytes", "Bytes moved: parameters to actors, gradients back", LABELS, registry=r
        )
        self.alive = Gauge("metaplatform_actors_alive", "Adaptation actors alive", LABELS, registry=r)
        self.failures = Counter("metaplatform_actor_failures", "Adaptation actor failures", LABELS, registry=r)
        self.restarts = Counter("metaplatform_actor_restarts", "Replacement actors started", LABELS, registry=r)
        self._seen = {"failures": 0, "restarts": 0}
        try:
            start_http_server(port, registry=r)
        except OSError as e:
            raise ConfigError(
                [f"tracking.prometheus_port = {port}: cannot serve metrics there ({e.strerror or e})"]
            ) from None

    def on_start(self, config: RunConfig, context: dict, saved: dict) -> None:
        self.classification = config.classification
        self.labels = {
            "run_id": context["run_key"],
            "experiment": config.tracking.experiment,
            "algorithm": config.algorithm,
        }

    def on_iteration(self, record: IterationRecord) -> None:
        labels = self.labels
        self.iterations.labels(**labels).inc()
        self.tasks.labels(**labels).inc(record.tasks)
        self.loss.labels(**labels).set(record.loss)
        if self.classification:
            self.accuracy.labels(**labels).set(record.accuracy)
        self.duration.labels(**labels).observe(record.seconds)
        for phase in PHASES:
            self.phase.labels(**labels, phase=phase).inc(getattr(record, phase))
        self.bytes.labels(**labels).inc(record.gradient_bytes)
        self.alive.labels(**labels).set(record.workers_alive)
        # The pool counts since the run started; counters take the increase.
        for key, counter in (("failures", self.failures), ("restarts", self.restarts)):
            count = getattr(record, f"worker_{key}")
            counter.labels(**labels).inc(max(0, count - self._seen[key]))
            self._seen[key] = count

    def on_validation(self, record: IterationRecord) -> None:
        if self.classification:
            self.val_accuracy.labels(**self.labels).set(record.val["accuracy"])
        else:
            self.val_mse.labels(**self.labels).set(record.val["loss"])
