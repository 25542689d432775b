"""Meta-test a checkpoint: `python -m platform.evaluate --checkpoint LOCATION [--tasks 600] [--steps N]`.

The standard protocol of the papers: adapt to each of `--tasks` held-out tasks from its support
set and report the mean query accuracy (classification) or MSE (regression) with a 95% confidence
interval. Runs in this process; no Ray cluster is needed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from platform.checkpoint import load_checkpoint
from platform.cli import first_line, run
from platform.config import RunConfig
from platform.engine import EVAL_METRICS, AdaptationWorker, flatten
from platform.tasks import evaluation_seeds


def summarize(rows: np.ndarray, classification: bool) -> dict:
    """Means and 95% confidence half-widths over tasks of EVAL_METRICS rows."""
    key = "accuracy" if classification else "loss"
    col = rows[:, EVAL_METRICS.index(key)]
    out = {k: float(np.mean(rows[:, i])) for i, k in enumerate(EVAL_METRICS) if not np.isnan(rows[:, i]).all()}
    out[f"{key}_ci95"] = float(1.96 * np.std(col, ddof=1) / np.sqrt(len(col))) if len(col) > 1 else float("nan")
    out["tasks"] = len(rows)
    return out


def format_eval(result: dict, classification: bool) -> str:
    if classification:
        return f"accuracy {result['accuracy']:.4f} ± {result['accuracy_ci95']:.4f}"
    return f"mse {result['loss']:.4f} ± {result['loss_ci95']:.4f} (before adaptation {result['loss_before']:.4f})"


def evaluate(config: RunConfig, params: dict, split: str, tasks: int, steps: int) -> dict:
    worker = AdaptationWorker(config.model_dump(mode="json"))
    rows = worker.evaluate(flatten(params), split, steps, evaluation_seeds(tasks))
    return summarize(rows, config.classification)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Meta-test a trained checkpoint on held-out tasks.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, or folder / s3:// prefix (newest)")
    parser.add_argument("--tasks", type=int, default=600, help="held-out tasks (default 600)")
    parser.add_argument("--steps", type=int, help="inner steps (default: the run's optim.test_inner_steps)")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")
    args = parser.parse_args(argv)
    if args.tasks < 2:
        parser.error(f"--tasks {args.tasks}: need at least 2 tasks for a confidence interval")
    if args.steps is not None and args.steps < 0:
        parser.error(f"--steps {args.steps}: must be >= 0")
    state = load_checkpoint(args.checkpoint)
    config = RunConfig.model_validate(state["config"])
    steps = config.optim.test_inner_steps if args.steps is None else args.steps
    start = time.perf_counter()
    result = evaluate(config, state["params"], args.split, args.tasks, steps)
    print(
        f"{config.algorithm} on {config.task.kind} ({args.split} split), iteration {state['iteration']}, "
        f"{args.tasks} tasks{'' if config.algorithm == 'protonet' else f', {steps} inner steps'}: "
        f"{format_eval(result, config.classification)} "
        f"(95% CI, {time.perf_counter() - start:.1f}s)"
    )
    if config.tracking.mlflow and not args.no_mlflow:
        from platform.tracking import log_evaluation, tracking_uri

        report = {"split": args.split, "iteration": state["iteration"], "steps": steps} | result
        try:
            run_id = log_evaluation(state, args.checkpoint, report)
            print(f"logged to MLflow run {run_id} in {tracking_uri(config)}")
        except Exception as e:  # noqa: BLE001 - the result is printed; tracking is a bonus here
            print(f"warning: could not log to MLflow ({first_line(e)})")
    return 0


if __name__ == "__main__":
    run(main)
