"""ResNet-12 cost per task on one CPU thread (an actor's), without Ray: tasks/s and peak memory.

    python -m benchmarks.resnet12 [--seconds 30] [--size 84] [--width 64] [--settings maml fomaml anil protonet]
                                  [--recompute] [--precision fp32|bf16]

5-way 1-shot tasks with 15 queries per class of random RGB pixels (the cost does not depend on them),
one task at a time as an actor computes a chunk. Each setting runs in a fresh process, so its peak
resident memory above what the model and the tasks hold (`ru_maxrss` less the RSS before the first
task) is that of one task's meta-gradient.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from platform.algorithms import build
from platform.config import RunConfig
from platform.files import atomic_write
from platform.tasks import Task

# A fresh interpreter per setting, started through the start-up hook (a node without our wheel has no .pth).
CHILD = "import metaplatform_hook, runpy; runpy.run_module('benchmarks.resnet12', run_name='__main__', alter_sys=True)"

SETTINGS = {  # name -> (algorithm, first order)
    "maml": ("maml", False),
    "fomaml": ("fomaml", True),
    "anil": ("anil", False),
    "protonet": ("protonet", False),
}


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def random_task(g: torch.Generator, size: int, ways: int = 5, shots: int = 1, query: int = 15) -> Task:
    x = torch.rand(ways * (shots + query), 3, size, size, generator=g)
    y = torch.arange(ways).repeat_interleave(shots + query)
    order = torch.arange(len(y)).view(ways, -1)
    support, queries = order[:, :shots].reshape(-1), order[:, shots:].reshape(-1)
    return Task(x[support], y[support], x[queries], y[queries])


def measure(name: str, size: int, width: int, seconds: float, recompute: bool, precision: str, device: str) -> dict:
    """One setting in this process: warm-up task, then tasks until `seconds` have passed. Peak memory:
    on CPU the resident set's high-water mark over the RSS before the first task; on a GPU torch's
    peak allocation over what the model and tasks hold."""
    torch.set_num_threads(1)
    algorithm, _ = SETTINGS[name]
    config = RunConfig.model_validate(
        {
            "task": {"kind": "folder", "ways": 5, "shots": 1, "query": 15, "image_size": size, "channels": 3},
            "model": {"kind": "resnet12", "width": width, "recompute": recompute, "precision": precision},
            "algorithm": algorithm,
            "optim": {"inner_lr": 0.01, "inner_steps": 1},
        }
    )
    model, algo, params = build(config, device)
    model.to(device)
    params = {k: v.to(device) for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    tasks = [random_task(g, size).to(device) for _ in range(2)]
    gpu = torch.device(device).type == "cuda"
    before = torch.cuda.memory_allocated(device) / 1024 if gpu else rss_kib()
    algo.outer_grad(params, [tasks[0]])  # warm-up
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        algo.outer_grad(params, [tasks[count % 2]])
        count += 1
    if gpu:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1024 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"setting": name, "tasks": count, "tasks_per_s": count / elapsed, "peak_mib": (peak - before) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per setting (after a warm-up)")
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--recompute", action="store_true", help="model.recompute: activation checkpointing")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="model.precision")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure one setting
    args = parser.parse_args()
    if args.one:
        row = measure(args.one, args.size, args.width, args.seconds, args.recompute, args.precision, args.device)
        print(json.dumps(row))
        return 0
    rows, options = [], {k: getattr(args, k) for k in ("size", "width", "recompute", "precision", "device")}
    for name in args.settings:
        child = [sys.executable, "-c", CHILD, "--one", name]
        child += ["--seconds", str(args.seconds), "--size", str(args.size), "--width", str(args.width)]
        child += ["--precision", args.precision, "--device", args.device] + (["--recompute"] if args.recompute else [])
        row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print(
            f"{name:9s} {row['tasks_per_s']:.3f} tasks/s ({row['tasks']} tasks)  peak {row['peak_mib']:.0f} MiB",
            flush=True,
        )
        rows.append(row | options)
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
