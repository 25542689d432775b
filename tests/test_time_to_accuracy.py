"""The time-to-accuracy harness on a tiny setting: trains, resumes, and reports the curve."""

import re
import subprocess
import sys
from pathlib import Path

from benchmarks.time_to_accuracy import report

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.width=8", "optim.meta_batch=4", "optim.chunk=2", "eval.every=2", "eval.tasks=10", "log_every=2"]


def test_report_finds_the_first_iteration_over_each_threshold():
    history = [
        {"iteration": 1, "train_s": 60.0},
        {"iteration": 2, "train_s": 120.0, "val": {"accuracy": 0.91, "accuracy_ci95": 0.01}},
        {"iteration": 4, "train_s": 240.0, "val": {"accuracy": 0.96, "accuracy_ci95": 0.01}},
    ]
    text = report(history)
    assert "| 2 | 2.0 | 0.9100 ± 0.0100 |" in text
    assert "90%: reached at iteration 2 after 2.0 min" in text
    assert "95%: reached at iteration 4 after 4.0 min" in text
    assert "95%: not reached in 2 iterations" in report(history[:2])


def test_harness_trains_resumes_and_reports(ray_cluster, tmp_path):
    def harness(*args):
        cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", *args, *TINY, f"checkpoint.dir={tmp_path}"]
        result = subprocess.run(
            cmd, check=False, cwd=REPO, env=ray_cluster.subprocess_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    harness("optim.iterations=2")
    out = harness("optim.iterations=4")  # continues from iteration 2
    assert "resumed from" in out and "at iteration 2" in out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ", out, re.MULTILINE)
    assert [int(i) for i, _ in rows] == [2, 4]
    assert "90%:" in out and "95%:" in out
    assert harness("--report-only", "optim.iterations=4").strip().endswith(out.strip().splitlines()[-1])
