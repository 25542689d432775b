"""What one actor computes, on one device, in one process and without Ray: the reference per-task
loop against the platform's algorithm on each of its paths (loop and vmap).

    python -m benchmarks.adaptation --device cuda            # a GPU row: reference vs loop vs vmap
    python -m benchmarks.adaptation --device cuda optim.chunk=16 --settings maml-1
    python -m benchmarks.adaptation --tiny --device cpu      # seconds: proves the harness works (CI)

`benchmarks.throughput` measures the platform end to end through Ray; this harness isolates the
per-device computation, the part that `resources.vectorize` and the GPU change, and needs only
torch, numpy, pydantic, PyYAML and Pillow (a GPU node without Ray can run it). Tasks are sampled and
moved to the device before timing, so both sides time the meta-gradient of a meta-batch alone:
the reference one task and one backward at a time, the platform in chunks of `optim.chunk` tasks
exactly as an actor does. Runs alternate in rounds; medians are reported, with each path's
meta-gradient error against the float64 truth and, on a GPU, its peak memory above what the
parameters and the sampled tasks hold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.reference import (
    SETTINGS,
    Float64Truth,
    add_common_arguments,
    device_peak,
    flops_per_task,
    resolve_common_arguments,
    write_json,
)
from platform.algorithms import build
from platform.chunks import gradient_chunks
from platform.cli import run
from platform.config import load_config
from platform.tasks import iteration_seeds, task_sampler


def run_setting(name: str, args, base: list[str]) -> dict:
    algorithm, steps = SETTINGS[name]
    overrides = [*base, f"algorithm={algorithm}", f"optim.inner_steps={steps}", "resources.workers=1"]
    config = load_config(args.config, overrides)
    o, device = config.optim, args.device
    truth = Float64Truth(config)
    params = {k: v.to(device) for k, v in truth.params.items()}
    sampler = task_sampler(config.task, "train")
    batches = [
        [sampler.sample(s).to(device) for s in iteration_seeds(config.seed, r + 1, o.meta_batch)]
        for r in range(args.rounds)
    ]

    def platform(vectorize: str):
        _, algo, _ = build(load_config(args.config, [*overrides, f"resources.vectorize={vectorize}"]), device)

        def meta_grad(p, tasks):
            total = None
            for chunk in gradient_chunks(tasks, o.chunk, config.resources.workers):  # like AdaptationWorker
                grads = algo.outer_grad(p, chunk)[0]
                total = grads if total is None else {k: total[k] + grads[k] for k in total}
            return total

        return meta_grad

    paths = {"reference": truth.reference, "platform-loop": platform("loop"), "platform-vmap": platform("vmap")}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    rates = {k: [] for k in paths}
    memory = {}
    for k, meta_grad in paths.items():  # warm-up (first-touch allocations, cuDNN autotuning), untimed
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)  # parameters and the sampled tasks
        meta_grad(params, batches[0])
        sync()
        memory[k] = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    keys = list(paths)
    for r, tasks in enumerate(batches):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate who goes first
            start = time.perf_counter()
            paths[k](params, tasks)
            sync()
            rates[k].append(len(tasks) / (time.perf_counter() - start))
            print(f"  {name} round {r + 1}/{args.rounds} {k:>13}: {rates[k][-1]:8.2f} tasks/s", file=sys.stderr)
    flops = flops_per_task(config)
    ref_rate = statistics.median(rates["reference"])
    rows = {
        k: {
            "tasks_per_s": statistics.median(rates[k]),
            "tasks_per_s_all": rates[k],
            "ratio": statistics.median(rates[k]) / ref_rate,
            "gflops": statistics.median(rates[k]) * flops / 1e9,
            "meta_grad_error": truth.error(paths[k], device),
            "peak_memory": memory[k],
        }
        for k in paths
    }
    return {"setting": name, "meta_batch": o.meta_batch, "chunk": o.chunk, "gflop_per_task": flops / 1e9, "rows": rows}


def format_table(result: dict, peak: float) -> str:
    lines = [
        (
            f"== {result['setting']}: meta-batch {result['meta_batch']}, chunk {result['chunk']}, "
            f"{result['gflop_per_task']:.2f} GFLOP/task"
        ),
        f"{'run':<14} {'tasks/s':>9} {'x ref':>7} {'GFLOP/s':>9} {'% peak':>7} {'error':>8} {'peak MiB':>9}",
    ]
    for k, row in result["rows"].items():
        mib = "n/a" if row["peak_memory"] is None else f"{row['peak_memory'] / 2**20:.0f}"
        lines.append(
            f"{k:<14} {row['tasks_per_s']:>9.2f} {row['ratio']:>7.2f} {row['gflops']:>9.1f} "
            f"{row['gflops'] / peak:>7.1%} {row['meta_grad_error']:>8.1e} {mib:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "where everything runs", "cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are over these)")
    args = parser.parse_args(argv)
    names, base = resolve_common_arguments(parser, args)
    if args.tiny:
        args.rounds = 1
    peak, dtype_name = device_peak(args.device, args.tiny)
    where = (
        torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(f"device: {args.device} ({where}); torch {torch.__version__}")
    print(f"{dtype_name} matmul peak (torch.mm on {args.device}): {peak:.1f} GFLOP/s", flush=True)
    results = []
    for name in names:
        results.append(run_setting(name, args, base))
        print(format_table(results[-1], peak), flush=True)
    if args.json:
        header = {
            "device": str(args.device),
            "name": where,
            "matmul_peak_gflops": peak,
            "matmul_peak_dtype": dtype_name,
        }
        write_json(args.json, header, results)
    return 0


if __name__ == "__main__":
    run(main)
