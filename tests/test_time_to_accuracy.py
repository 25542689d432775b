"""The time-to-accuracy harness on a tiny setting: trains, resumes, and reports the curve."""

import json
import re
import shutil
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
    assert "98.5%: not reached in 4 iterations" in text


def test_report_of_the_meta_test_curve():
    history = [{"iteration": 3, "train_s": 30.0, "test": {"accuracy": 0.986, "accuracy_ci95": 0.002}}]
    text = report(history, "test")
    assert "meta-test accuracy" in text and "| 3 | 0.5 | 0.9860 ± 0.0020 |" in text
    assert "98.5%: reached at iteration 3 after 0.5 min" in text


def test_harness_trains_resumes_and_reports(ray_cluster, tmp_path):
    run, other, png = tmp_path / "run", tmp_path / "other", tmp_path / "curves.png"

    def harness(*args, checkpoint_dir=run, returncode=0):
        """The harness's stdout when it exits 0, else its stderr."""
        cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", *args, *TINY, f"checkpoint.dir={checkpoint_dir}"]
        result = subprocess.run(
            cmd, check=False, cwd=REPO, env=ray_cluster.subprocess_env(), capture_output=True, text=True
        )
        assert result.returncode == returncode, result.stdout + result.stderr
        return result.stdout if returncode == 0 else result.stderr

    harness("optim.iterations=2")
    out = harness("optim.iterations=4")  # continues from iteration 2
    assert "resumed from" in out and "at iteration 2" in out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ", out, re.MULTILINE)
    assert [int(i) for i, _ in rows] == [2, 4]
    assert "90%:" in out and "95%:" in out
    assert harness("--report-only", "optim.iterations=4").strip().endswith(out.strip().splitlines()[-1])
    # Meta-test of every kept checkpoint (2 and 4) on held-out tasks, cached for the next report.
    out = harness("--report-only", "--split", "test", "--tasks", "10", "--query", "3", "optim.iterations=4")
    assert re.findall(r"^meta-tested iteration (\d+)", out, re.MULTILINE) == ["2", "4"]
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| ([\d.]+) ± ", out, re.MULTILINE)
    assert [int(i) for i, _ in rows] == [2, 4] and all(0 <= float(a) <= 1 for _, a in rows)
    cached = json.loads((run / "meta-test.json").read_text())
    assert set(cached) == {"2:10:3", "4:10:3"} and all(r["tasks"] == 10 for r in cached.values())
    again = harness("--report-only", "--split", "test", "--tasks", "10", "--query", "3", "optim.iterations=4")
    assert "meta-tested" not in again and again.strip().splitlines()[-1] == out.strip().splitlines()[-1]
    # Another run's folder (here a copy, with its cache) is reported beside it, and both are drawn.
    shutil.copytree(run, other)
    both = harness("--report-only", "--split", "test", "--tasks", "10", "--query", "3", "optim.iterations=4",
                   "--compare", str(other), "--plot", str(png))  # fmt: skip
    assert "meta-tested" not in both and f"\n{run}:\n" in both and f"\n{other}:\n" in both
    assert png.read_bytes().startswith(b"\x89PNG") and f"curves drawn in {png}" in both

    # A folder without checkpoints, or a test setting the model cannot take, is a usage error
    # named before anything trains.
    def usage_error(*args):
        return harness(*args, checkpoint_dir=tmp_path / "new", returncode=2)

    assert f"{tmp_path / 'none'}: no checkpoint" in usage_error("--compare", str(tmp_path / "none"))
    assert "--ways 20: a maml model's classifier head has 5 outputs" in usage_error("--split", "test", "--ways", "20")
    assert not (tmp_path / "new").exists()
