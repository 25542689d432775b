"""One trial of a sweep, run by Ray Tune in the cluster: a whole `platform.train` run, reported to
Tune at every meta-validation with the checkpoint of that iteration (Tune is one more observer of
the training loop), and the resources it reserves."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ray import tune

from platform.checkpoint import CheckpointStore
from platform.cli import warn
from platform.config import RunConfig, with_values
from platform.data import cache_dir
from platform.driver import IterationRecord
from platform.engine import worker_bundle
from platform.observers import Observer, StopTraining
from platform.tracking import MlflowTracker
from platform.train import RunStopped, train

# -- a trial ----------------------------------------------------------------------------------------


def objective(config: RunConfig) -> tuple[str, str]:
    """(metric, mode): meta-validation accuracy for classification, MSE for regression."""
    return ("val_accuracy", "max") if config.classification else ("val_mse", "min")


class TuneReporter(Observer):
    """Reports each meta-validation to Tune with the checkpoint written at the same iteration.

    The last one is reported from on_end, after the observers before it (MLflow) have finished:
    Tune may end the trial's process as soon as it has the last result.
    """

    name = "tune"

    def __init__(self, config: RunConfig, trial: dict):
        self.metric, _ = objective(config)
        self.iterations = config.optim.iterations
        self.trial = trial  # id, name and hyperparameters, stored with each checkpoint (PBT's donors)
        self.pending: tuple[int, dict] | None = None

    def on_validation(self, record: IterationRecord) -> None:
        value = record.val["accuracy"] if self.metric == "val_accuracy" else record.val["loss"]
        self.pending = (record.iteration, {"iteration": record.iteration, self.metric: value, "loss": record.loss})

    def on_checkpoint(self, location: str, iteration: int, written) -> None:
        if self.pending is not None and self.pending[0] == iteration < self.iterations:
            self._report(Path(written()))

    def on_end(self, status: str, final: dict | None) -> None:
        if self.pending is not None and final is not None and self.pending[0] == final["state"]["iteration"]:
            try:
                self._report(Path(final["location"]))
            except StopTraining:
                pass  # after the last result it is only Tune saying the trial is done: so it is

    def _report(self, path: Path) -> None:
        (iteration, metrics), self.pending = self.pending, None
        with tempfile.TemporaryDirectory() as folder:
            for file in (path, path.with_name(path.name + ".sha256")):
                shutil.copy2(file, folder)
            Path(folder, "trial.json").write_text(json.dumps(self.trial | {"iteration": iteration}))
            # Blocks until Tune has taken the result; raises SystemExit(0) when the scheduler stops the trial.
            try:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            except SystemExit as e:
                raise StopTraining(f"Ray Tune's scheduler stopped the trial at iteration {iteration}") from e


def run_trial(hyperparameters: dict, base: dict, sweep: dict) -> None:
    """A Tune trial: `platform.train` on `base` with the trial's hyperparameters, reporting to Tune."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    # The trial's folder in the sweep (Tune's own trial dir is a staging folder in Ray's temp dir);
    # for an S3 sweep, in this node's cache: a restarted trial starts from its Tune checkpoint.
    if sweep["root"].startswith("s3://"):
        trial_dir = cache_dir() / "tune-trials" / sweep["key"] / f"trial_{trial_id}"
    else:
        trial_dir = Path(sweep["root"]) / "tune" / f"trial_{trial_id}"
    tags = {"metaplatform.sweep": sweep["key"], "tune.trial": trial_id}
    if sweep.get("parent_run_id"):
        tags["mlflow.parentRunId"] = sweep["parent_run_id"]
    start, checkpoint = None, tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = CheckpointStore(folder).load()
            donor = json.loads(Path(folder, "trial.json").read_text())
        if donor["id"] != trial_id:  # PBT: this trial exploits a better one
            tags["pbt.last_exploit"] = (
                f"restored trial {donor['id']}'s checkpoint at iteration {donor['iteration']}; "
                + ", ".join(f"{k}: {donor['hyperparameters'][k]} -> {v}" for k, v in hyperparameters.items())
            )
            print(f"trial {trial_id}: {tags['pbt.last_exploit']}", flush=True)
    values = hyperparameters | {
        "checkpoint.dir": str(trial_dir / "checkpoints"),
        "checkpoint.resume": False,
        "checkpoint.every": base["eval"]["every"],  # a checkpoint with every report
        "tracking.run_name": context.get_trial_name(),
        "tracking.register_as": None,  # the sweep registers its best trial's model
        "tracking.prometheus_port": 0,  # trials of one node would share the port
        "tracking.tags": base["tracking"]["tags"] | tags,
    }
    config = with_values(RunConfig.model_validate(base), values, "trial")
    if start is not None:  # what this trial wrote after the restored iteration is a branch it left
        store = CheckpointStore(config.checkpoint.dir)
        with store.exclusive():  # not while an earlier life of the trial still writes there
            moved = store.set_aside_after(start["iteration"])
        if moved:
            print(f"trial {trial_id}: checkpoints {moved} of the branch it left moved to {store.location}/superseded-*")
    trial = {"id": trial_id, "name": context.get_trial_name(), "hyperparameters": hyperparameters}
    # MLflow first: its end is done before the last result goes to Tune (TuneReporter).
    observers: list[Observer] = [MlflowTracker(report=warn)] if config.tracking.mlflow else []
    observers.append(TuneReporter(config, trial))
    # One run key per trial: a restarted or exploiting trial continues its own MLflow run.
    try:
        train(config, observers, start=start, run_key=f"{sweep['key']}-{trial_id}")
    except RunStopped as e:  # returning ends the trial's thread as Tune's own stop would
        print(e, flush=True)


def trial_resources(config: RunConfig):
    """One placement group per trial: bundle 0 for the trial's driver, one per adaptation actor."""
    bundles = [{"CPU": 1.0}] + [worker_bundle(config)] * config.resources.workers
    return tune.PlacementGroupFactory(bundles, strategy=config.resources.placement)
