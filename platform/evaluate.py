"""Meta-test a checkpoint: `python -m platform.evaluate --checkpoint LOCATION [--tasks 600] [--steps N]
[--ways W] [--shots K] [--query Q] [--bn-stats batch|support] [--plot PNG]`.

The standard protocol of the papers: adapt to each of `--tasks` held-out tasks from its support
set and report the mean query accuracy (classification) or MSE (regression) with a 95% confidence
interval. The test-time settings the papers vary (inner steps, shots, query size; ways for
ProtoNets, whose model has no classifier head) default to the run's own, and so does `--bn-stats`:
the BatchNorm statistics queries are normalised by (batch: the query batch's, the papers'
transductive protocol; support: the support set's, as `platform.adapt` predicts). For regression, `--plot`
draws the adaptation to one held-out task at those settings (the MAML paper's figure). Runs in this
process; no Ray cluster is needed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from platform.algorithms import BN_STATS
from platform.checkpoint import load_checkpoint
from platform.cli import first_line, run
from platform.config import EMBEDDING_ALGORITHMS, ConfigError, RunConfig
from platform.metatest import format_eval, meta_test, test_time_config


def check_plot_path(path: Path, config: RunConfig) -> None:
    """--plot is checked before the evaluation, so a mistake costs no time."""
    problems = []
    if config.classification:
        problems.append(
            f"--plot {path}: the adaptation picture is for regression; this run classifies ({config.task.kind})"
        )
    if path.suffix.lower() != ".png":
        problems.append(f"--plot {path}: must end in .png")
    if not path.parent.is_dir():
        problems.append(f"--plot {path}: folder {path.parent} does not exist")
    if problems:
        raise ConfigError(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Meta-test a trained checkpoint on held-out tasks.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, or folder / s3:// prefix (newest)")
    parser.add_argument("--tasks", type=int, default=600, help="held-out tasks (default 600)")
    parser.add_argument("--steps", type=int, help="inner steps (default: the run's optim.test_inner_steps)")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test")
    parser.add_argument(
        "--ways", type=int, help="classes per task (default: the run's; other values for protonet and pretrain only)"
    )
    parser.add_argument("--shots", type=int, help="support examples per class (default: the run's)")
    parser.add_argument("--query", type=int, help="query examples per class (default: the run's)")
    parser.add_argument(
        "--bn-stats", choices=BN_STATS, help="normalise queries by batch or support statistics (default: the run's)"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")
    parser.add_argument("--plot", type=Path, help="PNG of the adaptation to a held-out task (regression only)")
    args = parser.parse_args(argv)
    if args.tasks < 2:
        parser.error(f"--tasks {args.tasks}: need at least 2 tasks for a confidence interval")
    if args.steps is not None and args.steps < 0:
        parser.error(f"--steps {args.steps}: must be >= 0")
    state = load_checkpoint(args.checkpoint)
    config = RunConfig.model_validate(state["config"])
    steps = config.optim.test_inner_steps if args.steps is None else args.steps
    config, setting = test_time_config(config, args.ways, args.shots, args.query)
    if args.bn_stats is not None and args.bn_stats != config.model.bn_stats:
        config = config.model_copy(update={"model": config.model.model_copy(update={"bn_stats": args.bn_stats})})
        setting = "-".join(filter(None, (setting, f"bn{args.bn_stats}")))
    if args.plot is not None:
        check_plot_path(args.plot, config)
    start = time.perf_counter()
    result = meta_test(config, state["params"], args.split, args.tasks, steps)
    t = config.task
    shape = f", {t.ways}-way {t.shots}-shot" if config.classification else f", K = {t.shots}"
    print(
        f"{config.algorithm} on {config.task.kind} ({args.split} split{shape}), iteration {state['iteration']}, "
        f"{args.tasks} tasks{'' if config.algorithm in EMBEDDING_ALGORITHMS else f', {steps} inner step' + 's' * (steps != 1)}, "
        f"{config.model.bn_stats} statistics: "
        f"{format_eval(result, config.classification)} "
        f"(95% CI, {time.perf_counter() - start:.1f}s)"
    )
    if args.plot is not None:
        from platform.plots import (
            sinusoid_adaptation,
        )  # imported here, as below: slow, and only these options need them

        print(f"adaptation picture: {sinusoid_adaptation(config, state['params'], args.plot)}")
    if config.tracking.mlflow and not args.no_mlflow:
        from platform.tracking import log_evaluation, tracking_uri

        report = {"split": args.split, "setting": setting, "iteration": state["iteration"], "steps": steps} | result
        try:
            run_id = log_evaluation(state, args.checkpoint, report)
            print(f"logged to MLflow run {run_id} in {tracking_uri(config)}")
        except Exception as e:  # noqa: BLE001 - the result is printed; tracking is a bonus here
            print(f"warning: could not log to MLflow ({first_line(e)})")
    return 0


if __name__ == "__main__":
    run(main)
