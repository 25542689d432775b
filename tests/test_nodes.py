"""Losing whole nodes: a cluster of several raylets on loopback, nodes killed the way a host crashes.

One cluster for the module: a head with no CPUs (the driver's node) and 1-CPU worker nodes, each
with its own image cache folder (its own disk). Nodes are SIGKILLed with every process on them,
so Ray learns of the loss from missed heartbeats, as it would of a preempted or crashed host.
Every run is compared bitwise with one uninterrupted run of the same config.
"""

from __future__ import annotations

import re
import signal

import pytest
from driver_runs import assert_same_params, final_params, finish, read_until, start_train
from PIL import Image
from ray_cluster import LocalRayCluster

from platform.checkpoint import CheckpointStore

ITERATIONS = 300
BASE = [
    "task.kind=sinusoid",
    f"optim.iterations={ITERATIONS}",
    "optim.meta_batch=8",
    "optim.chunk=2",
    "checkpoint.every=50",
    "checkpoint.keep=2",
    "eval.every=0",
    "log_every=20",
]
# Ray's defaults declare a node dead after ~15 s of missed heartbeats; tests need not wait that long.
FAST_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
WORKERS_LINE = r"\d+ workers: (pid .*)"


class Nodes:
    """The module's cluster plus bookkeeping: which node runs a given actor pid."""

    def __init__(self, cluster: LocalRayCluster, tmp_path_factory):
        self.cluster, self.tmp = cluster, tmp_path_factory

    def add(self, num_cpus: int = 1):
        cache = self.tmp.mktemp("node-cache")
        node = self.cluster.add_node(num_cpus, env={"METAPLATFORM_CACHE": str(cache)})
        node.cache = cache
        return node

    def hosting(self, pid: int):
        (node,) = [n for n in self.cluster.nodes if n._proc is not None and pid in n.pids()]
        return node

    def remove(self, node) -> None:
        node.kill()
        self.cluster.nodes.remove(node)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    with LocalRayCluster(num_cpus=0, extra_env=FAST_DEATH) as cluster:
        pool = Nodes(cluster, tmp_path_factory)
        for _ in range(3):
            pool.add()
        yield pool


def run(nodes, location, *overrides, env=None):
    return start_train(nodes.cluster, *BASE, f"checkpoint.dir={location}", *overrides, env=env)


def actors(line: str) -> list[tuple[int, str]]:
    """(pid, node id prefix) of each actor in the driver's `N workers: pid P (cpu on node X), ...` line."""
    return [(int(pid), node) for pid, node in re.findall(r"pid (\d+) \(\w+ on node (\w+)\)", line)]


@pytest.fixture(scope="module")
def reference(nodes, tmp_path_factory):
    """Final parameters of an uninterrupted 2-worker run, and where its actors ran."""
    location = tmp_path_factory.mktemp("reference")
    proc = run(nodes, location, "resources.workers=2")
    match, _ = read_until(proc, WORKERS_LINE)
    out = finish(proc)
    assert "0 worker failures, 0 restarts" in out
    return final_params(location, ITERATIONS), actors(match[1])


def test_actors_of_one_run_land_on_different_nodes_under_spread(reference):
    _, placed = reference
    assert len(placed) == 2 and placed[0][1] != placed[1][1]


def test_losing_a_node_with_a_spare_one_restarts_the_actor_there(nodes, reference, tmp_path):
    # A checkpoint every iteration: the node is lost while one is being written.
    proc = run(nodes, tmp_path, "resources.workers=2", "checkpoint.every=1")
    match, _ = read_until(proc, WORKERS_LINE)
    (victim_pid, victim_node), _ = actors(match[1])
    read_until(proc, rf"iter\s+60/{ITERATIONS}")
    nodes.remove(nodes.hosting(victim_pid))
    restarted, _ = read_until(proc, r"worker 0 restarted \(pid \d+ on node (\w+)\); 2 of 2 workers")
    out = finish(proc)
    assert restarted[1] != victim_node
    assert f"worker 0 (pid {victim_pid}) failed" in out and "Traceback" not in out
    assert_same_params(final_params(tmp_path, ITERATIONS), reference[0])
    store = CheckpointStore(tmp_path)
    assert all(store.load(i)["iteration"] == i for i in store.iterations())  # every one listed is intact
    nodes.add()  # the spare for the next test


def test_losing_a_node_without_a_spare_shrinks_then_grows_back(nodes, reference, tmp_path):
    # Longer than the reference, keeping every checkpoint: its state at ITERATIONS is compared.
    longer = [f"optim.iterations={10 * ITERATIONS}", "checkpoint.keep=1000"]
    proc = run(nodes, tmp_path, "resources.workers=3", *longer)  # one actor on every node: no room left
    match, _ = read_until(proc, WORKERS_LINE)
    victim_pid = actors(match[1])[1][0]
    read_until(proc, r"iter\s+40/")
    nodes.remove(nodes.hosting(victim_pid))
    _, said = read_until(proc, r"worker 1: its node is gone and the cluster has no room for it now")
    assert "carrying on with 2 of 3 workers" in said
    new = nodes.add()
    restarted, _ = read_until(proc, r"worker 1 restarted \(pid \d+ on node (\w+)\); 3 of 3 workers")
    assert new.node_id.startswith(restarted[1])
    read_until(proc, r"iter\s+\d+/")  # it trains on with 3 workers (the restart may come after iteration 300)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, returncode=130)
    assert "Traceback" not in out
    assert_same_params(CheckpointStore(tmp_path).load(ITERATIONS)["params"], reference[0])


def test_losing_a_node_during_meta_validation(nodes, reference, tmp_path):
    """Validation runs on the same pool; its result and the run's are those of a run without the loss."""
    validate = ["eval.every=160", "eval.tasks=800"]  # a few seconds each
    proc = run(nodes, tmp_path / "a", "resources.workers=2", *validate)
    out = finish(proc)
    expected = re.findall(r"meta-validation at \d+: .*", out)
    assert len(expected) == 2

    proc = run(nodes, tmp_path / "b", "resources.workers=2", *validate)
    match, _ = read_until(proc, WORKERS_LINE)
    read_until(proc, rf"iter\s+160/{ITERATIONS}")  # printed just before the validation at 160 starts
    victim = actors(match[1])[0][0]
    nodes.remove(nodes.hosting(victim))
    out = finish(proc)
    assert f"worker 0 (pid {victim}) failed" in out
    assert re.findall(r"meta-validation at \d+: .*", out) == expected
    assert_same_params(final_params(tmp_path / "b", ITERATIONS), reference[0])
    nodes.add()


def test_a_new_node_builds_its_own_image_cache_once(nodes, tmp_path):
    """Two actors on a node that never saw the data set: one of them decodes it into the node's cache."""
    root = tmp_path / "images"
    for c in range(40):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=(c * 7 + i * 50) % 256).save(root / f"class{c:02d}" / f"{i}.png")
    fresh = nodes.add(num_cpus=2)  # PACK puts both 1-CPU bundles on the only node with 2 free CPUs
    config = [
        "task.kind=folder", f"task.data={root}", "task.shots=1", "task.query=2", "model.kind=conv4", "model.width=8",
        "optim.iterations=3", "optim.meta_batch=4", "optim.chunk=2", "resources.placement=PACK", "eval.every=0",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "tracking.mlflow=false",  # the logged model's input example would build the driver's own cache too
    ]  # fmt: skip
    proc = start_train(nodes.cluster, *config, "resources.workers=2")
    match, _ = read_until(proc, WORKERS_LINE)
    out = finish(proc)
    assert {node for _, node in actors(match[1])} == {fresh.node_id[:8]}
    # Distinct lines: every node's log monitor forwards the shared log folder of this one-machine cluster.
    builds = {line for line in out.splitlines() if "building the image cache" in line}
    assert len(builds) == 1, out
    (entry,) = [p for p in (fresh.cache / "images").iterdir() if p.is_dir()]
    assert str(entry) in out and (entry / "images.npy").is_file()
    nodes.remove(fresh)
