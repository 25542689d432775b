"""The serving benchmark (benchmarks/serving.py) runs end to end on the session Ray head: a smoke run
(Conv4-8 models, a few requests), checking its results file, not its speed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_serving_benchmark_runs_through_serve_on_the_shared_cluster(ray_cluster, tmp_path):
    out = tmp_path / "serving.json"
    command = [
        "benchmarks.serving",
        "--tiny",
        "--requests",
        "6",
        "--concurrency",
        "1",
        "3",
        "--cache-size",
        "4",
        "--rss-tasks",
        "5",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", *command, "--settings", "omniglot-maml", "sinusoid", "--json", str(out)],
        check=False,
        cwd=REPO,
        env=ray_cluster.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed check
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "served/in-process p50 at c=1" in proc.stdout
    results = json.loads(out.read_text())
    assert results["cpu"] and len(results["load_average"]) == 3
    assert [r["setting"] for r in results["results"]] == ["omniglot-maml", "sinusoid"]
    for result in results["results"]:
        rows = result["http"]["rows"]
        assert set(rows) == {"uncached c=1", "uncached c=3", "cached c=1"}
        assert rows["uncached c=1"]["adapted"] == rows["uncached c=3"]["adapted"] == 6  # every task new
        assert rows["cached c=1"]["adapted"] == 0  # query-only requests: answered from the cache
        for row in [*rows.values(), *result["in_process"].values()]:
            assert 0 < row["p50_ms"] <= row["p99_ms"] and row["n"] == 6
        assert result["served_over_in_process"] > 0
        rss = result["http"]["rss"]
        assert rss["before_bytes"] > 0 and rss["distinct_tasks"] == 5
