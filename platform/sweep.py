"""A sweep's records: its folder (local, shared, or an s3:// prefix) with `sweep.json` and
`best.yaml`, its MLflow parent run with a child per trial, every result the trials reported, and
the closing table made from them."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import mlflow
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from pyarrow import fs
from ray.tune import Callback

from platform.checkpoint import open_storage
from platform.cli import first_line, warn
from platform.config import RunConfig
from platform.delivery import RUN_KEY_TAG, Delivery, RunSpool
from platform.mlflow_client import get_or_create_experiment, log_batches, mlflow_client
from platform.tracking import artifact_location, flatten_config, tracking_uri
from platform.trial import objective

SWEEP_FILE = "sweep.json"
REPORTS_FILE = "trial-reports.json"  # every result the trials reported (TrialReports)


class TrialReports(Callback):
    """Every result each trial reported, as the sweep's driver received it: the sweep's summary.

    Tune's own records of a trial fall short under PBT: results on which the scheduler paused the
    trial keep no checkpoint in its bookkeeping, and its per-trial result files are rewritten while
    they sync when a trial restarts (CI once found both trials' unreadable). Tune saves this state
    with the sweep's, so a resumed sweep has the results from before too; and with `location` (the
    sweep's folder) every result is also written to its REPORTS_FILE, which the driver reads when
    the sweep ends: the instance Tune runs after a resume is the one it restored, not the driver's.
    """

    def __init__(self, metric: str, location: str | None = None):
        self.metric, self.location = metric, location
        self.reports: dict[str, list[dict]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.metric in result:
            report = {"iteration": result["iteration"], "value": result[self.metric], "config": result["config"]}
            self.reports.setdefault(trial.trial_id, []).append(report)
            if self.location is not None:
                open_storage(self.location).write(REPORTS_FILE, json.dumps(self.reports).encode())

    def get_state(self) -> dict:
        return {"reports": self.reports}

    def set_state(self, state: dict) -> None:
        self.reports = state["reports"]

    @classmethod
    def read(cls, metric: str, location: str) -> TrialReports:
        """The reports written to the sweep's folder (none yet: empty)."""
        reports, store = cls(metric), open_storage(location)
        if REPORTS_FILE in store.names():
            reports.reports = json.loads(store.read(REPORTS_FILE))
        return reports


class Sweep:
    """The sweep's folder (local, shared, or an s3:// prefix) and its MLflow parent run (see the module docstring)."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.remote = config.checkpoint.dir.startswith("s3://")
        location = config.checkpoint.dir
        self.root = location.rstrip("/") if self.remote else str(Path(location).expanduser().absolute())
        self.store = open_storage(self.root)
        self.info = json.loads(self.store.read(SWEEP_FILE)) if SWEEP_FILE in self.store.names() else None
        self.client = None

    def path(self, *parts: str) -> str:
        """A location in the sweep, e.g. path("tune") for Tune's experiment."""
        return "/".join([self.root, *parts])

    def create(self, args, space: dict) -> None:
        self.info = {"key": uuid.uuid4().hex[:12], "parent_run_id": None}
        if self.config.tracking.mlflow:
            self.info["parent_run_id"] = self._create_parent(args, space)
        self.store.write(SWEEP_FILE, json.dumps(self.info).encode())  # atomic: whole or absent

    def tune_storage(self):
        """Ray Tune's (storage path, filesystem): the folder itself, or the S3 prefix with a pyarrow
        filesystem for this driver's endpoint and region. No credentials: Tune pickles the filesystem
        into the sweep (tuner.pkl), so pyarrow finds them where boto3 does (AWS_* variables, which
        the trials get from `aws_environment`, or the instance's role)."""
        if not self.remote:
            return self.root, None
        options = {
            "endpoint_override": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        }
        return self.root.removeprefix("s3://"), fs.S3FileSystem(**{k: v for k, v in options.items() if v})

    def _mlflow(self):
        if self.client is None:
            self.client = mlflow_client(tracking_uri(self.config), retries=2)
        return self.client

    def _create_parent(self, args, space: dict) -> str | None:
        t = self.config.tracking
        try:
            client = self._mlflow()
            experiment_id = get_or_create_experiment(client, t.experiment, artifact_location(tracking_uri(self.config)))
            tags = {"metaplatform.sweep": self.info["key"], "mlflow.runName": t.run_name or f"sweep-{self.info['key']}"}
            run_id = client.create_run(experiment_id, tags=tags | t.tags).info.run_id
            params = {k: v for k, v in flatten_config(self.config.redacted()).items() if k not in space}
            params |= {f"space.{k}": json.dumps(v) for k, v in space.items()}
            params |= {"tune.samples": str(args.samples), "tune.scheduler": args.scheduler, "tune.search": args.search}
            log_batches(client, run_id, [Param(k, v) for k, v in params.items()])
            return run_id
        except Exception as e:  # noqa: BLE001 - the sweep goes on; the trials still track themselves
            warn(f"no MLflow parent run for the sweep ({first_line(e)})")
            return None

    def finish(self, table: list[dict], best: dict | None) -> None:
        """Deliver what stopped trials left in their spools, close their runs, record the best in the parent."""

        if not self.config.tracking.mlflow:
            return
        # Spools of trials whose process ended before delivering (on S3 sweeps they are on the trials' nodes).
        spools = [] if self.remote else Path(self.root).glob("tune/*/checkpoints/mlflow-spool/*/records.jsonl")
        for spool in sorted(spools):
            spool = RunSpool(spool.parent)
            delivery = Delivery(spool, spool.uri, report=warn)
            while spool.pending and delivery.run_once():
                pass
            if not spool.pending:
                shutil.rmtree(spool.folder, ignore_errors=True)
        parent = self.info.get("parent_run_id")
        if not parent:
            return
        try:
            client = self._mlflow()
            experiment_id = client.get_run(parent).info.experiment_id
            for row in table:
                found = client.search_runs(
                    [experiment_id], f"tags.`{RUN_KEY_TAG}` = '{self.info['key']}-{row['trial']}'"
                )
                for child in found:
                    if row["stopped"]:
                        client.set_tag(child.info.run_id, "tune.stopped_early", "true")
                    if child.info.status == "RUNNING":  # its process was ended before the run's end was sent
                        status = (
                            "KILLED"
                            if row["stopped"]
                            else "FINISHED"
                            if row["iterations"] == self.config.optim.iterations
                            else "FAILED"
                        )
                        client.set_terminated(child.info.run_id, status)
                if best is not None and row["trial"] == best["trial"] and found:
                    best["run_id"] = found[0].info.run_id
            if best is not None:
                metric = best["metric_name"]
                client.log_metric(parent, f"best/{metric}", best["value"], step=best["iteration"])
                for key, value in {"best.trial": best["trial"], "best.checkpoint": best["checkpoint"] or ""}.items():
                    client.set_tag(parent, key, value)
                if best.get("run_id"):
                    client.set_tag(parent, "best.run_id", best["run_id"])
                with tempfile.TemporaryDirectory() as folder:
                    Path(folder, "best.yaml").write_bytes(self.store.read("best.yaml"))
                    client.log_artifact(parent, str(Path(folder, "best.yaml")))
                self._register(best)
            client.set_terminated(parent, "FINISHED")
        except Exception as e:  # noqa: BLE001 - the sweep's results are on disk and printed
            warn(f"could not record the sweep in MLflow ({first_line(e)})")

    def _register(self, best: dict) -> None:

        name = self.config.tracking.register_as
        if not name:
            return

        run_id = best.get("run_id")
        mlflow.set_tracking_uri(tracking_uri(self.config))
        try:  # MLflow 3 keeps models apart from the run's artifacts: try the run's model URI itself
            if not run_id:
                raise MlflowException("its MLflow run was not found")
            version = mlflow.register_model(f"runs:/{run_id}/model", name)
        except MlflowException as e:
            warn(f"the best trial {best['trial']} has no model to register as {name} ({first_line(e)})")
            return
        client = self._mlflow()
        client.set_tag(self.info["parent_run_id"], "registered_model", f"{name} version {version.version}")
        print(f"registered the best trial's model as {name} version {version.version}")


def _location(checkpoint) -> str:
    """A Tune checkpoint's location as users write it (pyarrow's S3 paths lack the scheme)."""
    return (
        f"{checkpoint.filesystem.type_name}://{checkpoint.path}"
        if checkpoint.filesystem.type_name == "s3"
        else checkpoint.path
    )


def summarize(results, reports: TrialReports, config: RunConfig) -> tuple[list[dict], dict | None]:
    """One row per trial (the hyperparameters of its best result, that result, iterations, early
    stop) and the best trial. Diverged meta-validations (NaN) never count as best."""
    metric, mode = objective(config)
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    table, best, best_result = [], None, None
    for result in results:
        trial = Path(result.path).name.removeprefix("trial_")
        row = {"trial": trial, "config": result.config, "value": None, "iteration": 0, "iterations": 0,
               "stopped": False, "error": result.error}  # fmt: skip
        own = reports.reports.get(trial, [])
        if own:
            row["iterations"] = max(r["iteration"] for r in own)
            row["stopped"] = row["iterations"] < config.optim.iterations and result.error is None
        for report in own:
            if math.isfinite(report["value"]) and (row["value"] is None or better(report["value"], row["value"])):
                row |= report
        if row["value"] is not None and (best is None or better(row["value"], best["value"])):
            best, best_result = row, result
        table.append(row)
    if best is not None:
        best = best | {"metric_name": metric, "checkpoint": checkpoint_of(best_result, best, metric)}
    return table, best


def checkpoint_of(result, row: dict, metric: str) -> str | None:
    """Tune's checkpoint of a trial's result (Tune keeps one for every result it did not pause the
    trial on, and a PBT pause never falls on the sweep's best)."""
    for checkpoint, metrics in result.best_checkpoints:
        if metrics.get("iteration") == row["iteration"] and metrics.get(metric) == row["value"]:
            return _location(checkpoint)
    return None


def print_table(table: list[dict], space: dict, metric: str) -> None:
    short = {
        k: {"optim.inner_lr": "eta", "optim.outer_lr": "lambda", "optim.inner_steps": "steps"}.get(k, k) for k in space
    }
    head = ["trial", *short.values(), f"best {metric}", "iterations", "early-stopped"]
    rows = []
    for row in table:
        values = [
            f"{row['config'][k]:.4g}" if isinstance(row["config"].get(k), float) else str(row["config"].get(k))
            for k in space
        ]
        best = "error" if row["error"] else "-" if row["value"] is None else f"{row['value']:.4f}"
        rows.append([row["trial"], *values, best, str(row["iterations"]), "yes" if row["stopped"] else "no"])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    # One write, so that trial logs Ray forwards to the terminal do not land between the rows.
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [head, *rows]]
    print("\n".join(lines), flush=True)
