"""The throughput harness (benchmarks/throughput.py): its reference is right, and it runs end to end.

The end-to-end run is the `--tiny` smoke setting (width 8, meta-batch 8, one round) on the session's
shared Ray cluster, connected from a subprocess (Ray reads the auth variables at import).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import platform
from benchmarks.reference import TINY, in_float64, reference_meta_grad
from platform.algorithms import build
from platform.config import load_config
from platform.engine import tune_malloc
from platform.tasks import iteration_seeds, task_sampler

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "omniglot-5w1s.yaml"
# The platform's float32 meta-gradient, relative to the float64 truth (docs/benchmarks.md).
RTOL = 1e-4


@pytest.mark.parametrize(
    "algorithm,steps", [("maml", 1), ("maml", 2), ("fomaml", 1), ("anil", 1), ("anil", 2)], ids=str
)
def test_reference_meta_gradient_matches_the_platform(omniglot, algorithm, steps):
    """The harness's independent reference computes the platform's meta-gradient: equal in float64."""
    config = load_config(CONFIG, TINY + [f"algorithm={algorithm}", f"optim.inner_steps={steps}"])
    _, algo, params = build(config)
    params = {k: v.double() for k, v in params.items()}
    sampler = task_sampler(config.task, "train")
    tasks = [in_float64(sampler.sample(s)) for s in iteration_seeds(config.seed, 0, 3)]
    o = config.optim
    ref, _ = reference_meta_grad(params, tasks, o.inner_lr, steps, config.first_order, algorithm == "anil")
    plat, _ = algo.outer_grad(params, tasks)
    for k in params:
        if k.startswith("body.") and k.endswith(".0.bias"):
            continue  # before batch-statistics BatchNorm: true gradient 0, both sides are rounding noise
        torch.testing.assert_close(ref[k], plat[k], rtol=1e-9, atol=1e-9 * float(plat[k].abs().max()), msg=k)


def test_tune_malloc_is_harmless_and_switchable(monkeypatch):
    monkeypatch.setenv("METAPLATFORM_MALLOC_TUNING", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("METAPLATFORM_MALLOC_TUNING")
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")  # mallopt exists only in glibc
    assert torch.ones(2000, 2000).sum().item() == 4e6  # and allocation still works


def test_tiny_harness_runs_through_the_shared_ray_cluster(ray_cluster, tmp_path):
    out_json = tmp_path / "tiny.json"
    proc = subprocess.run(
        # --ab-vectorize adds 2 actors on the vmap path; half a logical CPU each so that all 5 fit the cluster.
        [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--tiny",
            "--ab-vectorize",
            "--json",
            str(out_json),
            "resources.cpus_per_worker=0.5",
        ],
        check=False,
        cwd=REPO,
        env=ray_cluster.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a speed check
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fp32 matmul peak" in proc.stdout
    assert "platform-2" in proc.stdout and "reference" in proc.stdout
    result = json.loads(out_json.read_text())
    assert result["matmul_peak_gflops"] > 0
    (setting,) = result["results"]
    assert setting["setting"] == "maml-1" and setting["algorithm"] == "maml"
    assert setting["meta_grad_error"]["platform"] < RTOL
    rows = setting["rows"]
    assert set(rows) == {"reference", "platform-1", "platform-2", "p-2-vmap"}
    for name, row in rows.items():
        assert row["tasks_per_s"] > 0 and row["gflops"] > 0, name
    assert rows["platform-2"]["workers"] == rows["p-2-vmap"]["workers"] == 2
    assert 0 <= rows["platform-2"]["driver_share"] < 1
    assert rows["platform-2"]["bytes_broadcast"] > 0 and rows["platform-2"]["bytes_returned"] > 0
    # Actors run on this machine, so their peak RSS is readable from /proc.
    assert all(rss and rss > 0 for rss in rows["platform-2"]["peak_rss_per_actor"])


def test_cuda_reference_without_a_gpu_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--tiny", "--device", "cuda"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--device cuda" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_adaptation_harness_runs_without_ray(tmp_path):
    """benchmarks.adaptation (the GPU-node harness) on CPU: every path runs and is accurate."""
    out_json = tmp_path / "adaptation.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.adaptation", "--tiny", "--device", "cpu", "--json", str(out_json)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (setting,) = json.loads(out_json.read_text())["results"]
    rows = setting["rows"]
    assert set(rows) == {"reference", "platform-loop", "platform-vmap"}
    assert rows["reference"]["ratio"] == 1.0
    for name, row in rows.items():
        assert row["tasks_per_s"] > 0 and row["meta_grad_error"] < (1e-3 if name == "reference" else RTOL), name
    # GPU nodes here have torch but no Ray: the harness must not need it.
    probe = "import sys, benchmarks.adaptation; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=False, timeout=120).returncode == 0


def test_tiny_resnet12_harness_runs_with_the_memory_options(tmp_path):
    """benchmarks.resnet12 (also on a lent GPU, benchmarks/gpu.sh): each setting in a fresh process,
    with recomputed blocks; a row per setting with its options."""
    out_json = tmp_path / "resnet12.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.resnet12", "--seconds", "0", "--size", "16", "--width", "2",
         "--settings", "maml", "protonet", "--recompute", "--json", str(out_json)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out_json.read_text())
    assert [r["setting"] for r in rows] == ["maml", "protonet"]
    assert all(r["recompute"] and r["tasks"] >= 1 and r["tasks_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
