"""MLflow tracking of training runs, through a spool, so that no outage loses anything or stops training.

Everything a run logs (the run's creation, parameters and tags, metric batches, artifacts, the
model, the end) is first appended as one JSON line to the run's spool (platform.spool), a folder
on local disk; beside the records it keeps `uri` (where they go) and `run_id` (the MLflow run, once
the server created it), and in `files/` the artifacts and the model waiting to be uploaded.

A background thread (platform.delivery) sends the records in order; the training loop never
waits for the server, and the end of the run waits at most `tracking.flush_timeout_s`. What is
still undelivered then stays in the spool: `python -m platform.track sync <spool>` sends it later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

from platform import plots
from platform.config import RunConfig
from platform.data import cache_dir
from platform.delivery import RUN_KEY_TAG, Delivery, RunSpool
from platform.driver import IterationRecord, window_rates
from platform.mlflow_client import get_or_create_experiment, mlflow_client
from platform.mlflow_model import save_model
from platform.observers import Observer


def tracking_uri(config: RunConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the working dir."""
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`mlartifacts/` next to the
    .db file), else the server's default (None)."""
    if not is_embedded(uri):
        return None
    return f"file://{Path(uri.removeprefix('sqlite:///')).absolute().parent / 'mlartifacts'}"


def flatten_config(data: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow parameters: dotted keys, string values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flatten_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return out


def git_commit() -> str | None:
    """The commit of the code being run, when it is a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def spool_root(config: RunConfig) -> Path:
    """Where a run's spool lives: beside checkpoints in a folder (as durable as they are); for S3
    checkpoints, which leave no folder to be beside, under $METAPLATFORM_SPOOL (a durable folder: the
    chart's spool volume, since a pod's cache goes with the pod), else in the local cache."""
    location = config.checkpoint.dir
    if not location.startswith("s3://"):
        return Path(location).expanduser() / "mlflow-spool"
    durable = os.environ.get("METAPLATFORM_SPOOL")
    base = Path(durable).expanduser() if durable else cache_dir() / "mlflow-spool"
    return base / hashlib.sha256(location.encode()).hexdigest()[:16]


class MlflowTracker(Observer):
    """Logs a training run to MLflow through a Spool (see the module docstring)."""

    name = "mlflow"

    def __init__(self, report: Callable[[str], None] = print):
        self.report = report
        self.spool: RunSpool | None = None
        self.delivery: Delivery | None = None
        self.window: list[IterationRecord] = []
        self.write_failed = False  # the spool's disk refused a record (said once)
        self.ended = False

    def on_start(self, config: RunConfig, context: dict, saved: dict) -> None:
        self.config, t = config, config.tracking
        self.uri = tracking_uri(config)
        self.run_key = context["run_key"]
        # The spool is found again by the saved state or the run key (a resumed run, a Tune trial
        # restarted); one moved to another machine starts anew, knowing its run id.
        folder = Path(saved["spool"]) if "spool" in saved else spool_root(config) / self.run_key
        self.spool = RunSpool(folder if folder.is_dir() else spool_root(config) / self.run_key, self.uri)
        if saved.get("run_id") and not self.spool.run_id:
            self.spool.set_run_id(saved["run_id"])
        self.delivery = Delivery(self.spool, self.uri, self.report)
        # Steps already recorded are not sent again: one curve, no duplicate points. A run continued
        # from another run's checkpoint (a PBT exploit) is a new branch: all its steps are new.
        resumed_from = context.get("resumed_from") or 0
        self.skip_through = resumed_from if context.get("branched") else max(self.spool.last_step(), resumed_from)
        self.monitors = [CPUMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):  # no NVIDIA GPU or no nvidia-ml-py here
            pass
        for monitor in self.monitors:
            monitor.collect_metrics()  # the first CPU reading is since start-up; drop it
            monitor.clear_metrics()
        tags = {
            RUN_KEY_TAG: self.run_key,
            "algorithm": config.algorithm,
            "task": config.task.kind,
            "actors": str(config.resources.workers),
            "device": context.get("device", "cpu"),
            "ray.address": context.get("ray_address", ""),
            "mlflow.source.name": "platform.train",
            "mlflow.source.type": "JOB",
            **t.tags,
        }
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        # The start record creates the run, or marks a resumed one RUNNING and updates its tags.
        self._append(
            {
                "op": "start",
                "experiment": t.experiment,
                "run_name": t.run_name,
                "tags": tags,
                "params": flatten_config(config.redacted()),
                "start_time": _now_ms(),
                "artifact_location": artifact_location(self.uri),
            }
        )
        (self.spool.files / "config.yaml").write_text(config.to_yaml())
        self._append({"op": "artifact", "file": "config.yaml", "artifact_path": None})
        # The searched hyperparameters as metrics too, from where this start begins: under PBT they
        # change during a run, and the curve shows the schedule.
        o = config.optim
        hyper = {"hparams/inner_lr": o.inner_lr, "hparams/outer_lr": o.outer_lr, "hparams/inner_steps": o.inner_steps}
        self._metrics(hyper, context.get("resumed_from") or 0, _now_ms(), notify=False)
        self.delivery.start()

    def on_iteration(self, record: IterationRecord) -> None:
        if record.iteration <= self.skip_through:
            return
        self.window.append(record)
        if record.iteration % self.config.tracking.log_every and record.iteration != self.config.optim.iterations:
            return
        tasks_per_s, driver_share = window_rates(self.window)
        values = {
            "train/loss": record.loss,
            "train/tasks_per_s": tasks_per_s,
            "train/driver_share": driver_share,
            "train/seconds": record.train_s,
            "workers/alive": record.workers_alive,
            "workers/failures": record.worker_failures,
        }
        if self.config.classification:
            values["train/accuracy"] = record.accuracy
        for monitor in self.monitors:
            monitor.collect_metrics()
            values |= {f"system/{k}": v for k, v in monitor.aggregate_metrics().items()}
            monitor.clear_metrics()
        self._metrics(values, record.iteration, _now_ms())
        self.window = []

    def on_validation(self, record: IterationRecord) -> None:
        if record.iteration <= self.skip_through:
            return
        val = record.val
        if self.config.classification:
            values = {"val/accuracy": val["accuracy"], "val/accuracy_ci95": val["accuracy_ci95"]}
            if "accuracy_before" in val:  # no "before" for an embedding's probe (algorithm pretrain)
                values["val/accuracy_before_adaptation"] = val["accuracy_before"]
        else:
            values = {
                "val/mse": val["loss"],
                "val/mse_ci95": val["loss_ci95"],
                "val/mse_before_adaptation": val["loss_before"],
            }
        self._metrics(values, record.iteration, _now_ms())

    def _append(self, record: dict) -> None:
        """Spool a record. A disk that refuses it (full, read-only) loses tracking, never training: said once."""
        try:
            self.spool.append(record)
        except OSError as e:
            if not self.write_failed:
                self.report(
                    f"cannot write the tracking spool {self.spool.folder} ({e.strerror or e}); training goes on, "
                    "untracked until it can be written again"
                )
            self.write_failed = True

    def _metrics(self, values: dict[str, float], step: int, ts: int, notify: bool = True) -> None:
        metrics = [[k, float(v), ts, step] for k, v in values.items() if np.isfinite(v)]
        self._append({"op": "batch", "metrics": metrics})
        if notify:
            self.delivery.notify()

    def on_checkpoint_written(self, location: str, iteration: int) -> None:
        # Named once it is on storage, never when queued: a queued one may be superseded or never written.
        if self.spool is None or self.ended:  # not started, or a write that outlived the run's end
            return
        self._append({"op": "batch", "tags": {"checkpoint.latest": location}})
        self.delivery.notify()

    def on_end(self, status: str, final: dict | None) -> None:
        if self.spool is None:  # the run stopped before it started (no workers): nothing was tracked
            return
        self.ended = True
        if final is not None:
            try:
                self._final_artifacts(final)
            except OSError as e:  # the plots and the model are staged on the spool's disk too
                self.report(f"could not stage the run's plots and model in {self.spool.files} ({e.strerror or e})")
        self._append({"op": "end", "status": status, "end_time": _now_ms()})
        self.delivery.notify()
        delivered = self.delivery.flush(self.config.tracking.flush_timeout_s)
        self.delivery.close()
        if delivered:
            where = f"run {self.spool.run_id} in {self.uri}"
            shutil.rmtree(self.spool.folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # the spools' folder, once no spool is left in it
                self.spool.folder.parent.rmdir()
            if is_embedded(self.uri):
                where += f"\nopen the MLflow UI on it: mlflow ui --backend-store-uri {self.uri}"
            print(f"tracked as MLflow {where}", flush=True)
        else:
            self.report(
                f"tracking server {self.uri} still unreachable: {self.spool.pending} records kept in "
                f"{self.spool.folder}; send them later with: python -m platform.track sync {self.spool.folder}"
            )

    def _final_artifacts(self, final: dict) -> None:
        """Curves, the sinusoid picture, the final meta-validation report and the model, staged in the spool."""
        state, config = final["state"], self.config
        self._append({"op": "batch", "tags": {"checkpoint.final": final["location"]}})
        staged = []
        staged.append(
            (
                plots.learning_curves(
                    state["history"], config.classification, self.spool.files / "learning_curves.png"
                ),
                "plots",
            )
        )
        if config.task.kind == "sinusoid":
            staged.append(
                (
                    plots.sinusoid_adaptation(config, state["params"], self.spool.files / "sinusoid_adaptation.png"),
                    "plots",
                )
            )
        val = [r for r in state["history"] if "val" in r]
        if val:
            report = self.spool.files / "evaluation.json"
            report.write_text(
                json.dumps({"split": "val", "iteration": val[-1]["iteration"], **val[-1]["val"]}, indent=2)
            )
            staged.append((report, "evaluation"))
        for path, folder in staged:
            self._append({"op": "artifact", "file": path.name, "artifact_path": folder})
        model = save_model(config, state["params"], self.spool.files / "model")
        self._append(
            {
                "op": "model",
                "file": model.name,
                "register_as": config.tracking.register_as,
            }
        )

    def state(self) -> dict:
        return {"spool": str(self.spool.folder), "run_id": self.spool.run_id} if self.spool else {}


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_evaluation(state: dict, location: str, report: dict) -> str:
    """Log a meta-test result into the checkpoint's MLflow run (a new run if that one is not in the
    tracking store); returns the run id. Raises whatever the MLflow client raises."""
    config = RunConfig.model_validate(state["config"])
    uri = tracking_uri(config)
    client = mlflow_client(uri, retries=2)
    run_id = state.get("observers", {}).get("mlflow", {}).get("run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            run_id = None
    new = run_id is None
    if new:
        experiment_id = get_or_create_experiment(client, config.tracking.experiment, artifact_location(uri))
        tags = {"metaplatform.evaluates": location, "algorithm": config.algorithm, "task": config.task.kind}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
    # Other test-time settings than the run's get metrics of their own: `test-20w1s15q/accuracy`.
    split = "-".join(filter(None, (report["split"], report.get("setting"))))
    ts, step = _now_ms(), report["iteration"]
    metrics = {k: v for k, v in report.items() if isinstance(v, float) and np.isfinite(v)}
    client.log_batch(run_id, metrics=[Metric(f"{split}/{k}", v, ts, step) for k, v in metrics.items()])
    name = f"evaluation/{split}-{report['tasks']}tasks-{report['steps']}steps.json"
    client.log_dict(run_id, report | {"checkpoint": location}, name)
    if new:
        client.set_terminated(run_id)
    return run_id
