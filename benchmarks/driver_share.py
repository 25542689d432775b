"""The driver's share of iteration time on one node and across several raylets, and the actors' idle time.

    python -m benchmarks.driver_share [--iterations 600] [--nodes 3] [key=value ...]

Runs `platform.train` on the sinusoid preset (tracking off) three times, in one process: on two
simulated clusters of `ray.cluster_utils.Cluster` (real raylets on this machine, each with its own
object store), `one node` (a head with `--nodes` CPUs, the actors beside the driver) and
`N raylets` (a head with no CPUs for the driver and `--nodes` 1-CPU worker nodes, SPREAD), both
with `resources.execution=ray`; then `in-process` (`resources.execution=local`, no Ray). It prints
the median driver share of the progress windows and the tasks/s of each, and the idle fraction:
the share of the actors' compute time spent waiting for the slowest actor of each iteration
(unequal shards; 0 in-process). The driver share is what the driver spends outside the slowest
actor's compute (dispatch, transfer, reduce, the outer step), as in the training log.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from platform.cli import run
from platform.config import load_config
from platform.driver import IterationRecord, idle_fraction
from platform.observers import Observer
from platform.train import train

PRESET = Path(__file__).resolve().parents[1] / "configs" / "sinusoid.yaml"


class Records(Observer):
    """Keeps every IterationRecord (for the idle fraction, which the history does not hold)."""

    def __init__(self):
        self.records: list[IterationRecord] = []

    def on_iteration(self, record: IterationRecord) -> None:
        self.records.append(record)


def measure(overrides: list[str]) -> dict:
    records = Records()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(PRESET, [f"checkpoint.dir={tmp}", *overrides])
        history = train(config, observers=[records])["history"]
    windows = [r for r in history if "driver_share" in r][1:]  # the first window includes start-up
    first = config.log_every
    return {
        "driver_share": statistics.median(r["driver_share"] for r in windows),
        "tasks_per_s": statistics.median(r["tasks_per_s"] for r in windows),
        "idle": idle_fraction(records.records[first:]),
        "windows": len(windows),
    }


def measure_on(cluster: Cluster, overrides: list[str]) -> dict:
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        return measure([*overrides, "resources.execution=ray"])
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--nodes", type=int, default=3, help="worker raylets in the multi-node cluster")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args(argv)
    overrides = [
        f"optim.iterations={args.iterations}",
        "log_every=50",
        "eval.every=0",
        "checkpoint.every=100000",
        "tracking.mlflow=false",
        *args.overrides,
    ]

    one = Cluster(initialize_head=True, head_node_args={"num_cpus": args.nodes})
    results = {"one node": measure_on(one, overrides)}
    spread = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        spread.add_node(num_cpus=1)
    spread.wait_for_nodes()
    results[f"{args.nodes} raylets"] = measure_on(spread, [*overrides, "resources.placement=SPREAD"])
    results["in-process"] = measure([*overrides, "resources.execution=local"])

    print(f"\n{'cluster':<12} {'driver share':>12} {'idle':>6} {'tasks/s':>8} {'windows':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['driver_share']:>12.1%} {r['idle']:>6.1%} {r['tasks_per_s']:>8.0f} {r['windows']:>8}")
    return 0


if __name__ == "__main__":
    run(main)
