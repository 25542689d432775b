"""Wall time to reach 90% and 95% meta-validation accuracy, and the curve on the way.

    python -m benchmarks.time_to_accuracy [--config configs/omniglot-5w1s.yaml] [key=value ...]
    python -m benchmarks.time_to_accuracy --report-only      # the curve of what has run so far

It trains with `platform.train` (meta-validating every `eval.every` iterations), always resuming
from its checkpoint folder, so a long measurement can be stopped with Ctrl-C and continued later:
the training time recorded per iteration (`train_s`, without the validation passes) carries over.
Then it prints a markdown table of the curve and the first training time at each threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from platform.checkpoint import CheckpointStore
from platform.cli import run
from platform.config import load_config
from platform.train import train

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot-5w1s.yaml"
DEFAULTS = ["eval.every=100", "eval.tasks=200", "checkpoint.dir=checkpoints/time-to-accuracy", "checkpoint.every=100"]
THRESHOLDS = (0.90, 0.95)


def report(history: list[dict]) -> str:
    curve = [r for r in history if "val" in r]
    lines = ["| iteration | training time (min) | meta-val accuracy (95% CI) |", "|---:|---:|---:|"]
    lines += [
        f"| {r['iteration']} | {r['train_s'] / 60:.1f} | {r['val']['accuracy']:.4f} ± {r['val']['accuracy_ci95']:.4f} |"
        for r in curve
    ]
    for threshold in THRESHOLDS:
        hit = next((r for r in curve if r["val"]["accuracy"] >= threshold), None)
        lines.append(
            f"\n{threshold:.0%}: "
            + (
                f"reached at iteration {hit['iteration']} after {hit['train_s'] / 60:.1f} min of training"
                if hit
                else f"not reached in {curve[-1]['iteration'] if curve else 0} iterations"
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--report-only", action="store_true", help="print the curve so far, train nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, [*DEFAULTS, *args.overrides, "checkpoint.resume=true"])
    if args.report_only:
        history = CheckpointStore(config.checkpoint.dir).load()["history"]
    else:
        history = train(config)["history"]
    print(report(history))
    return 0


if __name__ == "__main__":
    run(main)
