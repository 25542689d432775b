"""Delivery of a run's tracking records to MLflow: the run's spool (platform.spool) and the
background thread that sends its records in order.

The thread retries with back-off while the server is unreachable (one warning when it goes away,
one when it is back), so the training loop never waits for the server. Delivery is idempotent
where MLflow allows it: the run is found again by its `metaplatform.run_key` tag instead of
created twice, metrics carry their original timestamps, and the model is logged and registered
once. `python -m platform.track sync <spool>` runs the same delivery later.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from platform.cli import first_line
from platform.mlflow_client import get_or_create_experiment, is_permanent, log_batches, mlflow_client
from platform.mlflow_model import log_saved_model
from platform.spool import Spool

RUN_KEY_TAG = "metaplatform.run_key"
CONTINUES_TAG = "metaplatform.continues_run"  # on a run that continues one its tracking store does not hold


class RunSpool(Spool):
    """A run's spool: the queue of its tracking records, the tracking URI they go to and, once the
    server has created the run, its MLflow run id."""

    def __init__(self, folder: str | Path, uri: str | None = None):
        super().__init__(folder)
        if uri is not None:
            self.put("uri", uri)
        self.uri = self.get("uri")
        self.run_id = self.get("run_id")

    def set_run_id(self, run_id: str) -> None:
        self.run_id = run_id
        self.put("run_id", run_id)

    def last_step(self) -> int:
        """The highest metric step recorded so far (-1 when none)."""
        steps = [m[3] for r in self.records if r["op"] == "batch" for m in r.get("metrics", [])]
        return max(steps, default=-1)


class Delivery:
    """Sends a spool's records to a tracking server in order, in a background thread (or in the caller's, `run_once`)."""

    def __init__(self, spool: RunSpool, uri: str, report: Callable[[str], None]):
        self.spool, self.uri, self.report = spool, uri, report
        self.client = mlflow_client(uri, retries=0)  # the delivery thread retries, with back-off
        self.down: str | None = None  # the error while the server is unreachable
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlflow-delivery", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything recorded so far is delivered; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self.spool.pending and time.monotonic() < deadline:
                self._wake.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        return not self.spool.pending

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self.spool.pending or self._closed)
                if self._closed:
                    return
            if self.run_once():
                backoff = 1.0
                continue
            with self._wake:
                self._wake.wait_for(lambda: self._closed, timeout=backoff)
            backoff = min(2 * backoff, 30.0)

    def run_once(self) -> bool:
        """Deliver the next record; False if the server could not be reached."""
        record = self.spool.records[self.spool.delivered]
        try:
            self._deliver(record)
        except Exception as e:  # noqa: BLE001 - whatever the client raises, the record stays queued
            if is_permanent(e):  # skipped (with a warning) so that the rest flows
                self.report(f"MLflow refused a {record['op']} record and it is skipped: {e}")
            else:
                if self.down is None:
                    self.report(
                        f"tracking server {self.uri} unreachable ({first_line(e)[:200]}); training goes on, records are "
                        f"kept in {self.spool.folder} and sent when it is back"
                    )
                self.down = str(e)
                return False
        if self.down is not None:
            self.down = None
            self.report(f"tracking server {self.uri} is back; delivering the {self.spool.pending - 1} records kept")
        with self._wake:
            self.spool.set_delivered(self.spool.delivered + 1)
            self._wake.notify_all()
        return True

    def _deliver(self, record: dict) -> None:
        op, run_id = record["op"], self.spool.run_id
        if op == "start":
            self._start_run(record)
        elif op == "batch":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])]
            params = [Param(k, v) for k, v in record.get("params", {}).items()]
            tags = [RunTag(k, v) for k, v in record.get("tags", {}).items()]
            log_batches(self.client, run_id, params, metrics, tags)
        elif op == "artifact":
            self.client.log_artifact(run_id, str(self.spool.files / record["file"]), record.get("artifact_path"))
        elif op == "model":
            self._log_model(record)
        elif op == "end":
            self.client.set_terminated(run_id, record["status"], record["end_time"])

    def _start_run(self, record: dict) -> None:
        """Create the run, or find it again (a resumed run, a restarted Tune trial, a lost answer) and
        mark it RUNNING; either way it gets the record's tags and whichever of its params it lacks
        (a param's value cannot change in MLflow: PBT's new hyperparameters are in hparams/*)."""
        if self.spool.run_id and not self._run_exists(self.spool.run_id):
            # Resumed against a store without the checkpoint's run (another embedded store, a rebuilt
            # server): a new run continues it, and says which.
            record = record | {"tags": record["tags"] | {CONTINUES_TAG: self.spool.run_id}}
            self.report(f"MLflow run {self.spool.run_id} is not in {self.uri}; a new run continues it")
            self.spool.run_id = None
        if not self.spool.run_id:
            experiment_id = get_or_create_experiment(self.client, record["experiment"], record.get("artifact_location"))
            # Created before, by a call whose answer was lost? Then it carries our run key.
            key = record["tags"][RUN_KEY_TAG]
            found = self.client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")
            if found:
                self.spool.set_run_id(found[0].info.run_id)
            else:
                tags = dict(record["tags"])
                if record.get("run_name"):
                    tags[MLFLOW_RUN_NAME] = record["run_name"]
                run = self.client.create_run(experiment_id, start_time=record["start_time"], tags=tags)
                self.spool.set_run_id(run.info.run_id)
        run = self.client.get_run(self.spool.run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        tags = [RunTag(k, v) for k, v in record["tags"].items() if run.data.tags.get(k) != v]
        if tags:
            self.client.log_batch(run.info.run_id, tags=tags)
        params = [Param(k, v) for k, v in record.get("params", {}).items() if k not in run.data.params]
        if params:
            log_batches(self.client, run.info.run_id, params)

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _log_model(self, record: dict) -> None:
        """Upload the adapting model saved in the spool into the run, and register it. Idempotent: a
        record sent again after an answer was lost neither logs the model twice nor registers a
        second version."""
        run_id, name = self.spool.run_id, record.get("register_as")
        experiment_id = self.client.get_run(run_id).info.experiment_id
        logged = self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if not logged:
            mlflow.set_tracking_uri(self.uri)
            # log_model logs into the active run; entering it marks it RUNNING, the "end" record that
            # always follows sets its final status.
            with mlflow.start_run(run_id=run_id):
                log_saved_model(self.spool.files / record["file"])
        if name:
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            version = versions[0].version if versions else mlflow.register_model(f"runs:/{run_id}/model", name).version
            self.client.set_tag(run_id, "registered_model", f"{name} version {version}")
