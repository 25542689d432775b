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
import os
import sys

from ray import tune

from platform.cli import config_parser, run
from platform.config import ConfigError, RunConfig, load_config, with_values
from platform.driver import connect_ray, with_absolute_data
from platform.search_space import load_space, make_scheduler, make_search, tune_domain
from platform.sweep import Sweep, TrialReports, print_table, summarize
from platform.tracking import tracking_uri
from platform.trial import objective, run_trial, trial_resources


def parse_args(argv: list[str] | None):
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
    return args


def sweep_problems(config: RunConfig, args) -> list[str]:
    """What makes a config and the command's options no sweep, found before anything starts."""
    problems = []
    if config.eval.every == 0 or config.eval.every > config.optim.iterations:
        problems.append(
            f"eval.every = {config.eval.every}: a sweep ranks trials by meta-validation; set 0 < eval.every <= optim.iterations"
        )
    if config.algorithm == "pretrain":
        problems.append(
            "algorithm = 'pretrain': no sweeps of pretrain yet (a trial reserves adaptation actors, not a Ray "
            "Train worker group); train it with python -m platform.train"
        )
    if args.search == "optuna" and args.scheduler == "pbt":
        problems.append(
            "--search optuna with --scheduler pbt: PBT draws and mutates trials itself; use --search random"
        )
    return problems


def aws_environment() -> dict[str, str]:
    """This driver's AWS_* settings, for the trials' processes (which run with the cluster's
    environment): given to Ray as the job's environment, never written into the sweep. Inside a
    Ray job those its runtime env sets already reach the trials, and Ray refuses a key set twice."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    given = job.get("env_vars") or {}
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in given}


def make_tuner(config: RunConfig, args, space: dict, search, sweep: Sweep, resuming: bool):
    """A new Tuner for the sweep, or the one Tune saved in it (`resuming`)."""
    storage_path, storage_fs = sweep.tune_storage()
    metric, mode = objective(config)
    # Trials run in actors, whose environment is the cluster's, not this driver's: they get the
    # tracking URI this driver resolved (credentials must be in the cluster's environment).
    base = config.model_dump(mode="json")
    base["tracking"]["uri"] = tracking_uri(config)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep=sweep.info | {"root": sweep.root}),
        trial_resources(config),
    )
    if resuming:  # Tune runs the callbacks saved with the sweep (TrialReports, writing to the sweep)
        return tune.Tuner.restore(
            f"{storage_path}/tune",
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
    return tune.Tuner(
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
            callbacks=[TrialReports(metric, sweep.root)],
            verbose=1,
        ),
    )


def write_best(config: RunConfig, sweep: Sweep, space: dict, best: dict, metric: str) -> None:
    """best.yaml: the best trial's config, which `platform.train --config` runs as it is."""
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = with_absolute_data(load_config(args.config, args.overrides))
    problems = sweep_problems(config, args)
    if problems:
        raise ConfigError(problems)
    space = load_space(args.space, config)
    metric, mode = objective(config)
    search = make_search(args.search, metric, mode, config.seed)  # an Optuna that is not installed fails now
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

    connect_ray(1 + config.resources.workers * config.resources.cpus_per_worker, env_vars=aws_environment())
    storage_path, storage_fs = sweep.tune_storage()
    resuming = sweep.info is not None and tune.Tuner.can_restore(f"{storage_path}/tune", storage_filesystem=storage_fs)
    if sweep.info is None:
        sweep.create(args, space)
    print(f"sweep {sweep.info['key']} in {sweep.root}: {args.samples} trials, {args.scheduler}, {args.search} search, "
          f"each {1 + config.resources.workers} bundles ({trial_resources(config).bundles})", flush=True)  # fmt: skip
    if resuming:
        print(f"resuming the sweep from {experiment}", flush=True)
    results = make_tuner(config, args, space, search, sweep, resuming).fit()

    table, best = summarize(results, TrialReports.read(metric, sweep.root), config)
    print()
    print_table(table, space, metric)
    if best is not None:
        write_best(config, sweep, space, best, metric)
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
