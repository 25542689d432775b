"""Wall time to each accuracy threshold, and the curve on the way, on meta-validation or meta-test.

    python -m benchmarks.time_to_accuracy [--config configs/omniglot-5w1s.yaml] [key=value ...]
    python -m benchmarks.time_to_accuracy --split test [--tasks 600] [...]   # the papers' protocol
    python -m benchmarks.time_to_accuracy --report-only [--split test]      # what has run so far
    python -m benchmarks.time_to_accuracy --report-only --split test --plot F.png --compare DIR [...]

It trains with `platform.train` (meta-validating every `eval.every` iterations and keeping every
checkpoint), always resuming from its checkpoint folder, so a long measurement can be stopped with
Ctrl-C and continued later: the training time recorded per iteration (`train_s`, without the
validation passes) carries over. `--split test` then meta-tests every saved checkpoint on `--tasks`
fixed held-out tasks (600, 95% CI; evaluation time is not training time) with `--query` query
images per class (15, whatever the run trained with: the same protocol for every run; `--ways` for
ProtoNets trained on more ways than they are tested on), caching the results in
`meta-test.json` beside the checkpoints so a rerun evaluates only new ones. It prints a markdown
table of the curve and the first training time at each threshold; `--compare` adds other runs'
checkpoint folders to the report, and `--plot` draws all the curves against training time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from platform.checkpoint import CheckpointStore
from platform.cli import run
from platform.config import RunConfig, load_config
from platform.files import atomic_write
from platform.metatest import meta_test, test_time_config
from platform.plots import accuracy_over_time
from platform.train import train

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot-5w1s.yaml"
DEFAULTS = [
    "eval.every=100",
    "eval.tasks=200",
    "checkpoint.dir=checkpoints/time-to-accuracy",
    "checkpoint.every=100",
    "checkpoint.keep=1000000",  # every checkpoint is a point of the meta-test curve
]
THRESHOLDS = (0.90, 0.95, 0.97, 0.98, 0.985)


def report(history: list[dict], split: str = "val") -> str:
    """The curve (rows of `history` with a `split` result) and the first training time at each threshold."""
    curve = [r for r in history if split in r]
    name = {"val": "meta-val", "test": "meta-test"}[split]
    lines = [f"| iteration | training time (min) | {name} accuracy (95% CI) |", "|---:|---:|---:|"]
    lines += [
        f"| {r['iteration']} | {r['train_s'] / 60:.1f} | {r[split]['accuracy']:.4f} ± {r[split]['accuracy_ci95']:.4f} |"
        for r in curve
    ]
    for threshold in THRESHOLDS:
        hit = next((r for r in curve if r[split]["accuracy"] >= threshold), None)
        lines.append(
            f"\n{threshold:.1%}: ".replace(".0%", "%")
            + (
                f"reached at iteration {hit['iteration']} after {hit['train_s'] / 60:.1f} min of training"
                if hit
                else f"not reached in {curve[-1]['iteration'] if curve else 0} iterations"
            )
        )
    return "\n".join(lines)


def with_meta_test(
    directory: str, history: list[dict], tasks: int, query: int, ways: int | None, trained_ways: int
) -> list[dict]:
    """`history` with a `test` result at every checkpoint saved in `directory` (cached in meta-test.json),
    on `ways`-way tasks (None: the run's own, `trained_ways`) with `query` query images per class."""
    setting = f"{tasks}:{query}" + (f":{ways}w" if ways not in (None, trained_ways) else "")
    store = CheckpointStore(directory)
    cache = Path(directory) / "meta-test.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    for iteration in store.iterations():
        key = f"{iteration}:{setting}"
        if key not in results:
            state = store.load(iteration)
            saved, _ = test_time_config(RunConfig.model_validate(state["config"]), ways, None, query)
            results[key] = meta_test(saved, state["params"], "test", tasks, saved.optim.test_inner_steps)
            atomic_write(cache, json.dumps(results))
            print(f"meta-tested iteration {iteration}: {results[key]['accuracy']:.4f}", flush=True)
    keys = {r["iteration"]: f"{r['iteration']}:{setting}" for r in history}
    return [r | {"test": results[keys[r["iteration"]]]} for r in history if keys[r["iteration"]] in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--report-only", action="store_true", help="print the curve so far, train nothing")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="the curve's tasks (default val)")
    parser.add_argument("--tasks", type=int, default=600, help="held-out tasks per checkpoint with --split test")
    parser.add_argument("--query", type=int, default=15, help="query images per class with --split test (default 15)")
    parser.add_argument(
        "--ways", type=int, help="classes per task with --split test (default: the run's; others for protonet only)"
    )
    parser.add_argument("--plot", metavar="PNG", help="draw the curve (and those of --compare) against training time")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="another run's checkpoint folder to report and plot",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    if args.tasks < 2:
        parser.error(f"--tasks {args.tasks}: need at least 2 tasks for a confidence interval")
    if args.query < 1:
        parser.error(f"--query {args.query}: need at least 1 query image per class")
    config = load_config(args.config, [*DEFAULTS, *args.overrides, "checkpoint.resume=true"])
    # What cannot be meta-tested fails now, before training: a wrong folder, --ways for a model with a head.
    others = [CheckpointStore(d).load() for d in args.compare]
    if args.split == "test":
        test_time_config(config, args.ways, None, args.query)
    if args.report_only:
        history = CheckpointStore(config.checkpoint.dir).load()["history"]
    else:
        history = train(config)["history"]
    runs = [(config.checkpoint.dir, history, config.task.ways)]
    runs += [(d, s["history"], s["config"]["task"]["ways"]) for d, s in zip(args.compare, others)]
    curves = {}
    for directory, curve, trained_ways in runs:
        if args.split == "test":
            curve = with_meta_test(directory, curve, args.tasks, args.query, args.ways, trained_ways)
        curves[Path(directory).name] = curve
        print(f"\n{directory}:" if args.compare else "", report(curve, args.split), sep="\n")
    if args.plot:
        print(f"curves drawn in {accuracy_over_time(curves, args.split, THRESHOLDS, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    run(main)
