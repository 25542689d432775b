"""Adaptation served: adapt+predict latency in process and over HTTP through Ray Serve (platform/serve.py).

    python -m benchmarks.serving [--requests 2000] [--concurrency 1 8 32] [--rss-tasks 2000] [--json serving.json]
    python -m benchmarks.serving --tiny              # seconds: proves the harness works (CI)

Settings: Omniglot 5-way 1-shot MAML (3 inner steps) and ProtoNets (the presets' Conv4-64), and the
sinusoid (10 steps). The models are untrained, built from the presets: latency does not depend on
training. Each request is a distinct random task of the preset's shape (one query per class;
sinusoid: 10 support points, 10 queries), so every one is a cache miss unless said otherwise.

* in process: `learner.adapt(...).predict(...)` on one torch thread (a replica's num_cpus=1),
  uncached; and cached: `predict` alone on an already adapted task.
* HTTP: POST through Serve at each concurrency (one keep-alive connection per client thread), the
  JSON encoding done before the clock starts; cached: query-only requests naming a task_id.
* served / in process at concurrency 1 (p50), and the replica's RSS growth over `--rss-tasks`
  more distinct tasks (8 at a time) after all of the above, when its bounded cache is full and its
  heap has seen the most concurrent requests.

Joins the Ray cluster in RAY_ADDRESS, else starts a local one; starts Serve and shuts it down at the end.
The client runs on the same machine as the replicas: on a small machine it takes CPU from them.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

from benchmarks.reference import write_json
from platform.algorithms import build
from platform.checkpoint import CheckpointStore
from platform.cli import run
from platform.config import RunConfig, load_config
from platform.learner import load_learner
from platform.serve import ServeArgs, build_app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = {  # name: (preset, overrides)
    "omniglot-maml": ("omniglot-5w1s.yaml", ["optim.test_inner_steps=3"]),
    "omniglot-protonet": ("omniglot-protonet-1s.yaml", ["task.ways=5"]),
    "sinusoid": ("sinusoid.yaml", ["optim.test_inner_steps=10"]),
}
TINY = ["model.width=8"]


def task(config: RunConfig, seed: int) -> dict:
    """A distinct random task of the config's shape, as the JSON-able request body."""
    rng = np.random.default_rng(seed)
    if not config.classification:
        x = rng.uniform(-5, 5, config.task.shots).astype(np.float32)
        y = rng.uniform(0.1, 5) * np.sin(x + rng.uniform(0, np.pi))
        return {"support_x": x.tolist(), "support_y": y.tolist(), "query_x": rng.uniform(-5, 5, 10).tolist()}
    ways, shots = config.task.ways, config.task.shots
    return {
        "support_x": rng.random((ways * shots, 1, 28, 28), dtype=np.float32).tolist(),
        "support_y": [f"class-{c}" for c in range(ways) for _ in range(shots)],
        "query_x": rng.random((ways, 1, 28, 28), dtype=np.float32).tolist(),
    }


def arrays(body: dict) -> dict:
    return {k: v if k == "support_y" and isinstance(v[0], str) else np.float32(v) for k, v in body.items()}


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def in_process(config: RunConfig, checkpoint: Path, requests: int, cache_size: int) -> dict:
    learner = load_learner(checkpoint)
    tasks = [arrays(task(config, 10_000_000 + i)) for i in range(requests)]
    learner.adapt(tasks[0]["support_x"], tasks[0]["support_y"]).predict(tasks[0]["query_x"])  # warm-up
    uncached, kept = [], []
    for t in tasks:
        start = time.perf_counter()
        adapted = learner.adapt(t["support_x"], t["support_y"])
        adapted.predict(t["query_x"])
        uncached.append(time.perf_counter() - start)
        if len(kept) < cache_size:
            kept.append((adapted, t["query_x"]))
    cached = []
    for adapted, query_x in itertools.islice(itertools.cycle(kept), requests):
        start = time.perf_counter()
        adapted.predict(query_x)
        cached.append(time.perf_counter() - start)
    return {"uncached": percentiles(uncached), "cached": percentiles(cached)}


class Client:
    """POSTs through Serve from `concurrency` threads, one keep-alive connection each."""

    def __init__(self, port: int, path: str):
        self.port, self.path, self.local = port, path, threading.local()

    def post(self, body: bytes) -> tuple[float, dict]:
        if not hasattr(self.local, "connection"):
            self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        start = time.perf_counter()
        self.local.connection.request("POST", self.path, body, {"Content-Type": "application/json"})
        response = self.local.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {self.path}: {data[:300]!r}")
        return elapsed, json.loads(data)

    def run(self, bodies, concurrency: int) -> dict:
        encoded = [json.dumps(b).encode() for b in bodies]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(self.post, encoded))
        wall = time.perf_counter() - start
        adapted = sum(a[1]["adapted"] for a in answers)  # adaptations run: n uncached, 0 cached
        return percentiles([a[0] for a in answers]) | {"requests_per_s": len(answers) / wall, "adapted": adapted}

    def info(self) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", self.path)
        return json.loads(connection.getresponse().read())


def over_http(config: RunConfig, client: Client, args) -> dict:
    """Latency at each concurrency (distinct tasks), cached latency, and the replica's RSS growth."""
    seeds = itertools.count(20_000_000)
    warm = [task(config, next(seeds)) for _ in range(args.cache_size + 20)]  # fills the bounded cache
    client.run(warm, 1)
    rows = {}
    for concurrency in args.concurrency:
        bodies = [task(config, next(seeds)) for _ in range(args.requests)]
        rows[f"uncached c={concurrency}"] = client.run(bodies, concurrency)
    ids = [f"bench-{i}" for i in range(min(args.cache_size, args.requests))]
    for task_id, body in zip(ids, warm):
        client.post(json.dumps(body | {"task_id": task_id}).encode())
    queries = [{"task_id": task_id, "query_x": body["query_x"]} for task_id, body in zip(ids, warm)]
    rows["cached c=1"] = client.run((queries * (args.requests // len(queries) + 1))[: args.requests], 1)
    # After the runs above the cache is full and the heap has seen the most concurrent requests:
    # what grows from here with more distinct tasks is what the bounded cache does not bound.
    rss_before = client.info()["rss_bytes"]
    client.run([task(config, next(seeds)) for _ in range(args.rss_tasks)], 8)
    rss_after = client.info()["rss_bytes"]
    growth = {"before_bytes": rss_before, "after_bytes": rss_after, "distinct_tasks": args.rss_tasks}
    return {"rows": rows, "rss": growth | {"growth": rss_after / rss_before - 1}}


def checkpoint_of(config: RunConfig, folder: Path) -> Path:
    _, _, params = build(config)
    CheckpointStore(folder).save({"params": params, "config": config.model_dump(mode="json"), "iteration": 0}, 0)
    return folder


def table(results: list[dict]) -> str:
    lines = [f"{'setting':18} {'path':22} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}"]
    for r in results:
        rows = {f"in-process {k}": v for k, v in r["in_process"].items()} | r["http"]["rows"]
        for path, row in rows.items():
            rate = f"{row['requests_per_s']:8.1f}" if "requests_per_s" in row else f"{'':8}"
            lines.append(f"{r['setting']:18} {path:22} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {rate}")
        rss = r["http"]["rss"]
        lines.append(
            f"{r['setting']:18} served/in-process p50 at c=1: {r['served_over_in_process']:.2f}x; replica RSS "
            f"{rss['before_bytes'] / 2**20:.0f} -> {rss['after_bytes'] / 2**20:.0f} MiB ({rss['growth']:+.1%}) "
            f"over {rss['distinct_tasks']} distinct tasks"
        )
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Adapt+predict latency in process and through Ray Serve.")
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency level and path")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rss-tasks", type=int, default=2000, help="distinct tasks of the RSS growth run")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cache-size", type=int, default=ServeArgs.model_fields["cache_size"].default)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--tiny", action="store_true", help="Conv4-8 models: a smoke run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if min(args.requests, *args.concurrency, args.rss_tasks, args.replicas, args.cache_size) < 1:
        parser.error("--requests, --concurrency, --rss-tasks, --replicas and --cache-size must be >= 1")
    torch.set_num_threads(1)  # as a replica with num_cpus=1
    header = {"cpu": cpu_model(), "load_average": os.getloadavg(), "requests": args.requests}
    print(f"CPU {header['cpu']}; load average {header['load_average'][0]:.2f} at start", flush=True)
    configs = {n: load_config(CONFIGS / SETTINGS[n][0], SETTINGS[n][1] + (TINY * args.tiny)) for n in args.settings}
    ray.init()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        try:
            for name, config in configs.items():
                checkpoint = checkpoint_of(config, Path(tmp) / name)
                replicas = {"min_replicas": args.replicas, "max_replicas": args.replicas}
                serve_args = ServeArgs(model=str(checkpoint), cache_size=args.cache_size, **replicas)
                serve.run(build_app(serve_args), name=name, route_prefix=f"/{name}")
                local = in_process(config, checkpoint, args.requests, args.cache_size)
                served = over_http(config, Client(port, f"/{name}"), args)
                ratio = served["rows"][f"uncached c={min(args.concurrency)}"]["p50_ms"] / local["uncached"]["p50_ms"]
                results.append({"setting": name, "in_process": local, "http": served, "served_over_in_process": ratio})
                serve.delete(name)
        finally:
            serve.shutdown()
    print(table(results))
    if args.json:
        write_json(args.json, header, results)
    return 0


if __name__ == "__main__":
    run(main)
