"""Hyperparameter search with Ray Tune: `python -m platform.tune`.

    python -m platform.tune --config configs/omniglot-5w1s.yaml [--space space.yaml] [--samples N]
        [--scheduler asha|pbt|fifo] [--search random|optuna] [--max-concurrent K] [--resume] [key=value ...]

Each trial is a whole `platform.train` run: its own driver loop (the Tune function below) and its
own `resources.workers` adaptation actors, reserved together as one placement group (bundle 0 the
driver, then one bundle per actor), so trials never compete for actors' CPUs and the number that
run at once follows from the cluster's resources. Trials report to Tune at every meta-validation
with a checkpoint (Tune is one more observer of the training loop, `TuneReporter`), so ASHA stops
trials early, PBT restores a trial from a better one's checkpoint with perturbed hyperparameters,
and a failed trial restarts from its last checkpoint.

A sweep lives in `checkpoint.dir` (a local or shared folder, or an s3:// prefix, which every node
reaches): Tune's experiment in `tune/`, `sweep.json` (the sweep's identity and its MLflow parent
run) and, at the end, `best.yaml`: the best trial's config, which `python -m platform.train
--config` runs as it is. Each trial's training checkpoints are in its trial folder under `tune/`
(for an S3 sweep, in the trial node's cache: Tune's own checkpoints of the trials are in S3).
In MLflow a sweep is one parent run with one child run per trial.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import typing
import uuid
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from platform.cli import config_parser, first_line, run, warn
from platform.config import ConfigError, RunConfig, field_annotation, is_key, load_config, with_values
from platform.driver import IterationRecord
from platform.observers import Observer, StopTraining
from platform.train import RunStopped, train

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "lograndint", "choice")
# Sensible first searches (docs/tuning.md): around the MAML paper's values.
DEFAULT_SPACES = {
    "sinusoid": {
        "optim.inner_lr": {"loguniform": [0.001, 0.1]},
        "optim.outer_lr": {"loguniform": [0.0001, 0.01]},
        "optim.inner_steps": {"choice": [1, 2, 5]},
    },
    "omniglot": {
        "optim.inner_lr": {"loguniform": [0.05, 1.0]},
        "optim.outer_lr": {"loguniform": [0.0001, 0.003]},
        "optim.inner_steps": {"choice": [1, 3, 5]},
    },
}
DEFAULT_SPACES["folder"] = DEFAULT_SPACES["omniglot"]
SWEEP_FILE = "sweep.json"


# -- the search space -------------------------------------------------------------------------------


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_space(space: Any, base: RunConfig, source: str) -> list[str]:
    """Problems of a search space over `base`, one line each (empty: the space is good).

    Beyond the shape of each entry, every value the space can reach at its extremes (both ends of
    a range, every choice) must make a valid config: a negative learning rate or too many workers
    for the meta-batch is caught here, not in a trial an hour later.
    """
    if not isinstance(space, dict) or not space:
        return [f"{source}: a search space is a non-empty mapping of config keys to distributions"]
    problems = []
    for key, spec in space.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not is_key(key):
            problems.append(f"{where}: not a config key (e.g. optim.inner_lr, optim.outer_lr, optim.inner_steps)")
            continue
        if key.startswith(("checkpoint.", "tracking.")) or key == "seed":
            problems.append(f"{where}: not searchable (it does not change what is learned, or is the sweep's own)")
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            problems.append(f"{where} = {spec!r}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}")
            continue
        ((kind, args),) = spec.items()
        annotation = field_annotation(key)
        numeric = annotation in (int, float) or set(typing.get_args(annotation)) <= {float, int, type(None)}
        integer = annotation is int
        if kind == "choice":
            if not isinstance(args, list) or not args:
                problems.append(f"{where}: choice needs a non-empty list of values, got {args!r}")
                continue
            reach = args
        else:
            if not numeric:
                problems.append(f"{where}: {kind} needs a numeric key; {key} takes {annotation}, use choice")
                continue
            if kind in ("randint", "lograndint") and not integer:
                problems.append(f"{where}: {kind} draws integers; {key} is a float, use uniform or loguniform")
                continue
            if kind in ("uniform", "loguniform") and integer:
                problems.append(f"{where}: {kind} draws floats; {key} is an integer, use randint, lograndint or choice")
                continue
            if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args)):
                problems.append(f"{where}: {kind} needs [low, high] (two numbers), got {args!r}")
                continue
            low, high = args
            if low >= high:
                problems.append(f"{where}: {kind} [{low}, {high}] is an empty range (low must be below high)")
                continue
            if kind.startswith("log") and low <= 0:
                problems.append(f"{where}: {kind} [{low}, {high}] needs low > 0")
                continue
            reach = [low, high - 1] if kind in ("randint", "lograndint") else [low, high]  # randint: high excluded
        for value in reach:
            try:
                with_values(base, {key: value}, source)
            except ConfigError as e:
                problems += [f"{where}: {kind} {args!r} reaches {value!r}, and then {p}" for p in e.problems]
                break
    return problems


def load_space(path: str | None, base: RunConfig) -> dict[str, dict]:
    if path is None:
        space, source = DEFAULT_SPACES[base.task.kind], "default space"
    else:
        try:
            space = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError([f"{path}: cannot read the search space: {e.strerror}"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: YAML syntax error: {e}"]) from None
        source = path
    problems = check_space(space, base, source)
    if problems:
        raise ConfigError(problems)
    return space


def tune_domain(spec: dict):
    from ray import tune

    ((kind, args),) = spec.items()
    return getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args)


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
        from ray import tune

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
    from ray import tune

    from platform.checkpoint import CheckpointStore
    from platform.data import cache_dir
    from platform.tracking import MlflowTracker

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
    trial = {"id": trial_id, "name": context.get_trial_name(), "hyperparameters": hyperparameters}
    # MLflow first: its end is done before the last result goes to Tune (TuneReporter).
    observers: list[Observer] = [MlflowTracker(report=warn)] if config.tracking.mlflow else []
    observers.append(TuneReporter(config, trial))
    # One run key per trial: a restarted or exploiting trial continues its own MLflow run.
    try:
        train(config, observers, start=start, run_key=f"{sweep['key']}-{trial_id}")
    except RunStopped as e:  # returning ends the trial's thread as Tune's own stop would
        print(e, flush=True)


class TrialReports(Callback):
    """Every result each trial reported, as the sweep's driver received it: the sweep's summary.

    Tune's own records of a trial fall short under PBT: results on which the scheduler paused the
    trial keep no checkpoint in its bookkeeping, and its per-trial result files are rewritten while
    they sync when a trial restarts (CI once found both trials' unreadable). Tune saves this state
    with the sweep's, so a resumed sweep has the results from before too.
    """

    def __init__(self, metric: str):
        self.metric = metric
        self.reports: dict[str, list[dict]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.metric in result:
            report = {"iteration": result["iteration"], "value": result[self.metric], "config": result["config"]}
            self.reports.setdefault(trial.trial_id, []).append(report)

    def get_state(self) -> dict:
        return {"reports": self.reports}

    def set_state(self, state: dict) -> None:
        self.reports = state["reports"]


def trial_resources(config: RunConfig):
    """One placement group per trial: bundle 0 for the trial's driver, one per adaptation actor."""
    from ray import tune

    from platform.engine import worker_bundle

    bundles = [{"CPU": 1.0}] + [worker_bundle(config)] * config.resources.workers
    return tune.PlacementGroupFactory(bundles, strategy=config.resources.placement)


# -- the sweep --------------------------------------------------------------------------------------


def make_scheduler(name: str, config: RunConfig, space: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    every = config.eval.every
    if name == "asha":
        return ASHAScheduler(
            time_attr="iteration", max_t=config.optim.iterations, grace_period=every, reduction_factor=2
        )
    if name == "pbt":
        return PopulationBasedTraining(
            time_attr="iteration",
            perturbation_interval=every,
            hyperparam_mutations={k: tune_domain(v) for k, v in space.items()},
            quantile_fraction=0.5,
            resample_probability=0.25,
        )
    return FIFOScheduler()


def make_search(name: str, metric: str, mode: str, seed: int):
    if name == "random":  # Tune's default, seeded: the same config draws the same trials
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    try:  # OptunaSearch itself imports without Optuna and fails only when used
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            ["--search optuna: Optuna is not installed; install the extra: pip install 'metaplatform[optuna]'"]
        ) from None
    return OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=seed))


class Sweep:
    """The sweep's folder (local, shared, or an s3:// prefix) and its MLflow parent run (see the module docstring)."""

    def __init__(self, config: RunConfig):
        from platform.checkpoint import open_storage

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
        filesystem made from this driver's AWS_* settings. Tune ships the filesystem to the trials,
        whose processes may lack those settings (they run with the cluster's environment)."""
        if not self.remote:
            return self.root, None
        from pyarrow import fs

        options = {
            "endpoint_override": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
        return self.root.removeprefix("s3://"), fs.S3FileSystem(**{k: v for k, v in options.items() if v})

    def _mlflow(self):
        if self.client is None:
            from mlflow import MlflowClient

            from platform.tracking import tracking_uri

            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            self.client = MlflowClient(tracking_uri(self.config))
        return self.client

    def _create_parent(self, args, space: dict) -> str | None:
        from mlflow.entities import Param

        from platform.tracking import artifact_location, flatten_config, get_or_create_experiment, tracking_uri

        t = self.config.tracking
        try:
            client = self._mlflow()
            experiment_id = get_or_create_experiment(client, t.experiment, artifact_location(tracking_uri(self.config)))
            tags = {"metaplatform.sweep": self.info["key"], "mlflow.runName": t.run_name or f"sweep-{self.info['key']}"}
            run_id = client.create_run(experiment_id, tags=tags | t.tags).info.run_id
            params = {k: v for k, v in flatten_config(self.config.model_dump(mode="json")).items() if k not in space}
            params |= {f"space.{k}": json.dumps(v) for k, v in space.items()}
            params |= {"tune.samples": str(args.samples), "tune.scheduler": args.scheduler, "tune.search": args.search}
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
            return run_id
        except Exception as e:  # noqa: BLE001 - the sweep goes on; the trials still track themselves
            warn(f"no MLflow parent run for the sweep ({first_line(e)})")
            return None

    def finish(self, table: list[dict], best: dict | None) -> None:
        """Deliver what stopped trials left in their spools, close their runs, record the best in the parent."""
        from platform.tracking import RUN_KEY_TAG, Delivery, Spool

        if not self.config.tracking.mlflow:
            return
        # Spools of trials whose process ended before delivering (on S3 sweeps they are on the trials' nodes).
        spools = [] if self.remote else Path(self.root).glob("tune/*/checkpoints/mlflow-spool/*/records.jsonl")
        for spool in sorted(spools):
            spool = Spool(spool.parent)
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
        import mlflow

        from platform.tracking import tracking_uri

        name = self.config.tracking.register_as
        if not name:
            return
        from mlflow.exceptions import MlflowException

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


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        "Search inner/outer learning rates and inner steps with Ray Tune; every trial is a distributed training."
    )
    parser.add_argument(
        "--space", help="YAML search space over dotted config keys (default: per task kind, docs/tuning.md)"
    )
    parser.add_argument("--samples", type=int, default=8, help="trials (default 8)")
    parser.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha")
    parser.add_argument("--search", choices=("random", "optuna"), default="random")
    parser.add_argument(
        "--max-concurrent", type=int, help="at most this many trials at once (default: as resources allow)"
    )
    parser.add_argument("--max-failures", type=int, default=2, help="restarts of a failed trial from its checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in checkpoint.dir")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    if args.samples < 1:
        parser.error(f"--samples {args.samples}: need at least one trial")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error(f"--max-concurrent {args.max_concurrent}: need at least 1")

    config = load_config(args.config, args.overrides)
    problems = []
    if config.eval.every == 0 or config.eval.every > config.optim.iterations:
        problems.append(
            f"eval.every = {config.eval.every}: a sweep ranks trials by meta-validation; set 0 < eval.every <= optim.iterations"
        )
    if args.search == "optuna" and args.scheduler == "pbt":
        problems.append(
            "--search optuna with --scheduler pbt: PBT draws and mutates trials itself; use --search random"
        )
    if problems:
        raise ConfigError(problems)
    space = load_space(args.space, config)
    metric, mode = objective(config)
    search = make_search(args.search, metric, mode, config.seed)

    sweep = Sweep(config)
    experiment = sweep.path("tune")
    if args.resume and sweep.info is None:
        print(f"no sweep in {sweep.root}: starting a new one")
    elif not args.resume and sweep.info is not None:
        raise ConfigError(
            [
                f"checkpoint.dir = {config.checkpoint.dir!r} already holds a sweep: --resume continues it, or choose another checkpoint.dir"
            ]
        )

    from ray import tune

    from platform.driver import connect_ray
    from platform.tracking import tracking_uri

    # By name, not __main__'s copies: both are pickled by reference (run_trial for the trials,
    # TrialReports in the sweep's saved state).
    from platform.tune import TrialReports, run_trial

    connect_ray(1 + config.resources.workers * config.resources.cpus_per_worker)
    storage_path, storage_fs = sweep.tune_storage()
    resuming = sweep.info is not None and tune.Tuner.can_restore(f"{storage_path}/tune", storage_filesystem=storage_fs)
    if sweep.info is None:
        sweep.create(args, space)
    print(f"sweep {sweep.info['key']} in {sweep.root}: {args.samples} trials, {args.scheduler}, {args.search} search, "
          f"each {1 + config.resources.workers} bundles ({trial_resources(config).bundles})", flush=True)  # fmt: skip
    # Trials run in actors, whose environment is the cluster's, not this driver's: they get the
    # tracking URI this driver resolved (credentials must be in the cluster's environment).
    base = config.model_dump(mode="json")
    base["tracking"]["uri"] = tracking_uri(config)
    reports = TrialReports(metric)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep=sweep.info | {"root": sweep.root}),
        trial_resources(config),
    )
    if resuming:
        print(f"resuming the sweep from {experiment}", flush=True)
        tuner = tune.Tuner.restore(
            f"{storage_path}/tune",
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
        # Tune runs the callbacks saved with the sweep, their state restored: not this driver's.
        callbacks = tuner._local_tuner.get_run_config().callbacks or []
        reports = next((c for c in callbacks if isinstance(c, TrialReports)), reports)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={k: tune_domain(v) for k, v in space.items()},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=make_scheduler(args.scheduler, config, space),
                search_alg=search,
                num_samples=args.samples,
                max_concurrent_trials=args.max_concurrent,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[reports],
                verbose=1,
            ),
        )
    results = tuner.fit()

    table, best = summarize(results, reports, config)
    print()
    print_table(table, space, metric)
    if best is not None:
        best_config = with_values(
            config,
            {k: best["config"][k] for k in space} | {"checkpoint.dir": sweep.path("best"), "tracking.run_name": None},
            "best trial",
        )
        text = f"# best trial {best['trial']} of sweep {sweep.info['key']}: {metric} {best['value']:.4f}\n"
        sweep.store.write("best.yaml", (text + best_config.to_yaml()).encode())
        best_yaml = sweep.path("best.yaml")
        how = "also in the MLflow parent run" if sweep.remote else f"python -m platform.train --config {best_yaml}"
        print(f"\nbest trial {best['trial']}: {metric} {best['value']:.4f} at iteration {best['iteration']}; "
              f"checkpoint {best['checkpoint']}\nbest config: {best_yaml} ({how})")  # fmt: skip
    sweep.finish(table, best)
    if sweep.info.get("parent_run_id"):
        print(f"MLflow parent run {sweep.info['parent_run_id']}")
    errors = [row["trial"] for row in table if row["error"]]
    if errors:
        print(f"error: trials {', '.join(errors)} failed (logs in {experiment})", file=sys.stderr)
        return 1
    if best is None:
        print(f"error: no trial reported a finite {metric} (logs in {experiment})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(main)
