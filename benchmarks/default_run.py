"""Wall time of `python -m platform.train`, a baseline commit against the working tree, side by side.

    python -m benchmarks.default_run [--baseline COMMIT] [--repeats 3] [--extrapolate N] [train args ...]

Checks the baseline (default: HEAD) out into a temporary `git worktree` and runs the same command
line in both trees, `--repeats` times each, interleaved (the order alternates every round) so that
the load of a shared machine hits both alike. Each run starts in a fresh empty folder (its
`mlruns.db` and `checkpoints/` land there) with its tree first on PYTHONPATH, RAY_ADDRESS and
MLFLOW_TRACKING_URI unset: what a user of that tree gets from the README's default command. It
prints each tree's median wall time, the ratio, the last meta-validation line, the CPU model and
the load average before and after.

`--extrapolate N` estimates the wall time of an N-iteration run from a shorter one: the run's own
time, plus (N - iterations) x the per-iteration time of its progress windows (those without a
meta-validation), plus the missing meta-validations x the time of its last one. Example, the
70,000-iteration sinusoid preset from 3,000 iterations:

    python -m benchmarks.default_run --extrapolate 70000 --config configs/sinusoid.yaml optim.iterations=3000
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from platform.cli import run

REPO = Path(__file__).resolve().parents[1]
ITER_LINE = re.compile(r"^iter\s+(\d+)/(\d+)")
VAL_LINE = re.compile(r"^meta-validation at (\d+): (.*)")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def timed_run(tree: Path, args: list[str]) -> dict:
    """One `python -m platform.train` from `tree` in a fresh folder: wall time and timestamped lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    # A relative --config names the tree's own preset (the run itself starts in an empty folder).
    args = [str(tree / a) if prev == "--config" and not os.path.isabs(a) else a for prev, a in zip(["", *args], args)]
    with tempfile.TemporaryDirectory(prefix="default-run-") as cwd:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "platform.train", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines = [(time.monotonic() - start, line.rstrip()) for line in proc.stdout]
        proc.wait()
        wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"error: the run in {tree} failed (exit {proc.returncode}):\n" + "\n".join(t for _, t in lines[-30:]))
    return {"wall": wall, "lines": lines}


def estimate(result: dict, target: int) -> float:
    """The wall time of a `target`-iteration run of the same config (see the module docstring)."""
    events = [(t, ITER_LINE.match(text), VAL_LINE.match(text)) for t, text in result["lines"]]
    events = [(t, it, val) for t, it, val in events if it or val]
    per_iter_s, iters, vals = 0.0, 0, []
    for (t0, it0, _), (t1, it1, val1) in itertools.pairwise(events):
        if val1:
            vals.append(t1 - t0)
        elif it0 and it1:
            per_iter_s, iters = per_iter_s + t1 - t0, iters + int(it1[1]) - int(it0[1])
    done = int(next(it for _, it, _ in reversed(events) if it)[2])
    every = resolved_config(result)["eval"]["every"]
    missing_vals = (target // every + (target % every > 0)) - len(vals)
    return result["wall"] + (target - done) * per_iter_s / iters + missing_vals * vals[-1]


def resolved_config(result: dict) -> dict:
    """The config the run printed at its start (YAML, up to the first empty line)."""
    texts = [text for _, text in result["lines"]]
    start = texts.index("resolved config:") + 1
    return yaml.safe_load("\n".join(texts[start : texts.index("", start)]))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    # Every argument this parser does not know is platform.train's, in its order (--config included).
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="other arguments go to platform.train")
    parser.add_argument("--baseline", default="HEAD", help="commit to compare the working tree against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extrapolate", type=int, metavar="N", help="estimate an N-iteration run")
    args, train_args = parser.parse_known_args(argv)
    commit = git("rev-parse", args.baseline)
    print(f"{cpu_model()}; load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="baseline-") as tmp:
        baseline = Path(tmp) / "tree"
        git("worktree", "add", "--detach", str(baseline), commit)
        try:
            trees = {f"baseline {commit[:10]}": baseline, "working tree": REPO}
            results = {name: [] for name in trees}
            for round_ in range(args.repeats):
                for name in list(trees)[:: 1 if round_ % 2 == 0 else -1]:
                    result = timed_run(trees[name], train_args)
                    results[name].append(result)
                    print(f"round {round_ + 1}, {name}: {result['wall']:.1f} s", flush=True)
        finally:
            git("worktree", "remove", "--force", str(baseline))
    print(f"load average after: {os.getloadavg()}\n")
    medians = {}
    for name, runs in results.items():
        walls = [r["wall"] for r in runs]
        medians[name] = statistics.median(estimate(r, args.extrapolate) for r in runs) if args.extrapolate else None
        validation = [text for _, text in runs[-1]["lines"] if VAL_LINE.match(text)]
        print(f"{name}: median {statistics.median(walls):.1f} s ({' / '.join(f'{w:.1f}' for w in walls)})")
        if args.extrapolate:
            print(f"  estimated {args.extrapolate} iterations: {medians[name]:.0f} s ({medians[name] / 3600:.2f} h)")
        print(f"  {validation[-1] if validation else 'no meta-validation'}")
    old, new = (statistics.median(r["wall"] for r in runs) for runs in results.values())
    print(f"\nbaseline / working tree: {old / new:.2f}x (wall time)")
    if args.extrapolate:
        old, new = medians.values()
        print(f"baseline / working tree: {old / new:.2f}x (estimated {args.extrapolate} iterations)")
    return 0


if __name__ == "__main__":
    run(main)
