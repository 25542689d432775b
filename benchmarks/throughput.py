"""Meta-training throughput: the platform through Ray against a plain single-process reference.

    python -m benchmarks.throughput                      # the full table of docs/benchmarks.md
    python -m benchmarks.throughput --settings maml-1    # one setting
    python -m benchmarks.throughput --tiny               # seconds: proves the harness works (CI)
    python -m benchmarks.throughput --device cuda        # on a GPU node: reference and actors on its GPU

For every setting (algorithm x inner steps) it runs, alternating in rounds so that machine noise
hits all of them alike:

* reference  a straightforward per-task loop in this process, written independently of
             platform/algorithms.py (functional conv4, `autograd.grad(create_graph=True)`), with
             all cores given to torch; it computes the same meta-gradient of the same tasks and
             applies the same Adam update;
* platform   the real engine: `platform.engine.WorkerPool` actors computing the chunked outer
             gradients, the driver summing the rows and stepping Adam exactly as platform.train
             does, with 1 and with --workers actors.

It prints tasks/s (median over rounds), platform / reference, GFLOP/s (FLOPs of one task's
outer_grad counted with FlopCounterMode) against the measured fp32 (bf16 on GPU) matmul peak,
both sides' meta-gradient error against the float64 truth, the driver's share
of iteration time, bytes moved per iteration and the actors' peak RSS. Joins the Ray cluster in
RAY_ADDRESS, else starts a local instance (like platform.train).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import ray
import torch

from benchmarks.reference import (
    SETTINGS,
    Float64Truth,
    add_common_arguments,
    config_meta_grad,
    device_peak,
    flops_per_task,
    resolve_common_arguments,
    write_json,
)
from platform.algorithms import build, vectorized
from platform.cli import run
from platform.config import RunConfig, load_config
from platform.driver import connect_ray, make_optimizer, meta_step
from platform.engine import WorkerPool
from platform.tasks import iteration_seeds, task_sampler


class Reference:
    """The reference trainer: same initial parameters, tasks and Adam update as the platform."""

    def __init__(self, config: RunConfig, device: torch.device):
        self.config, self.device = config, device
        _, _, initial = build(config)
        self.params = {k: torch.nn.Parameter(v.to(device)) for k, v in initial.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=config.optim.outer_lr)
        self.sampler = task_sampler(config.task, "train")

    def meta_grad(self, iteration: int) -> dict:
        seeds = iteration_seeds(self.config.seed, iteration, self.config.optim.meta_batch)
        return config_meta_grad(self.config, self.params, [self.sampler.sample(s).to(self.device) for s in seeds])

    def step(self, iteration: int) -> None:
        grads = self.meta_grad(iteration)
        for k, p in self.params.items():
            p.grad = grads[k] / self.config.optim.meta_batch
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# --- the platform: the real engine, driven like platform.train ------------------------------------


class Platform:
    """A WorkerPool of `workers` actors and the driver's meta-update of platform.train."""

    def __init__(self, config: RunConfig, env: dict[str, str] | None = None):
        self.config = config
        _, _, initial = build(config)
        self.params = {k: torch.nn.Parameter(v) for k, v in initial.items()}
        self.optimizer = make_optimizer(config, list(self.params.values()))
        self.pool = WorkerPool(config, log=lambda *a: print(*a, file=sys.stderr), actor_env=env)
        self.bytes_broadcast = self.bytes_returned = 0

    def step(self, iteration: int) -> dict:
        """One meta-iteration of platform.train; returns its timings (seconds)."""
        record = meta_step(self.config, self.params, self.optimizer, self.pool, iteration, 0.0)
        self.bytes_broadcast, self.bytes_returned = record.bytes_out, record.bytes_back
        return {"total": record.seconds, "driver": record.driver_seconds}

    def peak_rss(self) -> list[int | None]:
        """Peak resident set (VmHWM) of every actor process, read from /proc (None when not on this node)."""
        out = []
        for info in self.pool.infos:
            try:
                with open(f"/proc/{info.pid}/status") as f:
                    out.append(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
            except (OSError, StopIteration):
                out.append(None)
        return out

    def shutdown(self) -> None:
        self.pool.shutdown()


# --- measurements ---------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait, total


def wait_for_quiet(timeout: float, idle: float = 0.85) -> float:
    """Wait (at most `timeout` s) until the machine is `idle` idle over 0.5 s: Ray's freshly started
    processes import for seconds after an actor is up. Returns the last idle fraction seen."""
    deadline, fraction = time.monotonic() + timeout, 1.0
    while time.monotonic() < deadline:
        try:
            i0, t0 = _cpu_times()
            time.sleep(0.5)
            i1, t1 = _cpu_times()
        except OSError:  # no /proc/stat
            return fraction
        fraction = (i1 - i0) / max(1, t1 - t0)
        if fraction >= idle:
            break
    return fraction


def run_setting(name: str, args, base_overrides: list[str], peak: float) -> dict:
    algorithm, steps = SETTINGS[name]
    overrides = [*base_overrides, f"algorithm={algorithm}", f"optim.inner_steps={steps}", "eval.every=0"]
    n = args.workers
    config = load_config(args.config, overrides + ["resources.workers=1"])
    meta_batch = config.optim.meta_batch
    flops = flops_per_task(config)
    truth = Float64Truth(config)
    _, learner, _ = build(config, args.device)  # the path the actors take on this device
    errors = {
        "reference": truth.error(truth.reference, args.device),
        "platform": truth.error(lambda p, t: learner.outer_grad(p, t)[0], args.device),
    }
    pool = lambda workers, *extra: load_config(args.config, [*overrides, f"resources.workers={workers}", *extra])
    runners = {
        "reference": Reference(config, args.device),
        "platform-1": Platform(pool(1)),
        f"platform-{n}": Platform(pool(n)),
    }
    if args.ab_malloc:  # the same N actors without engine.tune_malloc
        runners[f"p-{n}-nomal"] = Platform(pool(n), {"METAPLATFORM_MALLOC_TUNING": "0"})
    if args.ab_vectorize:  # the same N actors on the path that resources.vectorize=auto does not pick
        other = "loop" if vectorized(config, args.device) else "vmap"
        runners[f"p-{n}-{other}"] = Platform(pool(n, f"resources.vectorize={other}"))
    rates = {k: [] for k in runners}
    driver = {k: [] for k in runners if k != "reference"}
    try:
        # One warm-up iteration each (actor start, first-touch allocations), not timed.
        for runner in runners.values():
            runner.step(0)
        wait_for_quiet(args.quiet_timeout)
        keys = list(runners)
        for r in range(args.rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate who goes first
                iterations = range(1 + r * args.iterations, 1 + (r + 1) * args.iterations)
                start, drv = time.perf_counter(), 0.0
                for it in iterations:
                    out = runners[k].step(it)
                    drv += out["driver"] if out else 0.0
                elapsed = time.perf_counter() - start
                rates[k].append(meta_batch * len(iterations) / elapsed)
                if k in driver:
                    driver[k].append(drv / elapsed)
                print(f"  {name} round {r + 1}/{args.rounds} {k:>11}: {rates[k][-1]:6.2f} tasks/s", file=sys.stderr)
        rows = {}
        ref_rate = statistics.median(rates["reference"])
        for k, runner in runners.items():
            rate = statistics.median(rates[k])
            row = {
                "tasks_per_s": rate,
                "tasks_per_s_all": rates[k],
                "ratio": rate / ref_rate,
                "gflops": rate * flops / 1e9,
                "peak_fraction": rate * flops / 1e9 / peak,
            }
            if k == "reference":
                row |= {"threads": torch.get_num_threads(), "device": str(args.device)}
            else:
                rss = runner.peak_rss()
                row |= {
                    "workers": len(runner.pool.live),
                    "driver_share": statistics.median(driver[k]),
                    "bytes_broadcast": runner.bytes_broadcast,
                    "bytes_returned": runner.bytes_returned,
                    "peak_rss_per_actor": rss,
                }
            rows[k] = row
    finally:
        for runner in runners.values():
            if isinstance(runner, Platform):
                runner.shutdown()
    return {
        "setting": name,
        "algorithm": algorithm,
        "inner_steps": steps,
        "meta_batch": meta_batch,
        "gflop_per_task": flops / 1e9,
        "ceiling_tasks_per_s": peak * 1e9 / flops,
        "meta_grad_error": errors,
        "rows": rows,
    }


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def format_table(result: dict) -> str:
    lines = [
        (
            f"== {result['setting']}: {result['algorithm']}, {result['inner_steps']} inner step(s), "
            f"meta-batch {result['meta_batch']}, {result['gflop_per_task']:.2f} GFLOP/task, "
            f"ceiling {result['ceiling_tasks_per_s']:.1f} tasks/s at peak; meta-gradient error vs float64: "
            f"reference {result['meta_grad_error']['reference']:.1e}, platform {result['meta_grad_error']['platform']:.1e}"
        ),
        (
            f"{'run':<12} {'tasks/s':>8} {'x ref':>6} {'GFLOP/s':>8} {'% peak':>7} {'driver':>7} "
            f"{'MiB bcast':>9} {'MiB back':>8} {'peak RSS MiB/actor':>18}"
        ),
    ]
    for k, row in result["rows"].items():
        if k == "reference":
            where = f"{row['threads']} threads" if row["device"] == "cpu" else row["device"]
            extra = f"{'-':>7} {'-':>9} {'-':>8} {'(' + where + ', driver)':>18}"
        else:
            rss = "/".join(_mib(x) for x in row["peak_rss_per_actor"])
            extra = (
                f"{row['driver_share']:>7.1%} {row['bytes_broadcast'] / 2**20:>9.2f} "
                f"{row['bytes_returned'] / 2**20:>8.2f} {rss:>18}"
            )
        lines.append(
            f"{k:<12} {row['tasks_per_s']:>8.2f} {row['ratio']:>6.2f} {row['gflops']:>8.1f} "
            f"{row['peak_fraction']:>7.1%} {extra}"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "where the reference runs; cuda also gives every actor a share of this node's GPU")
    parser.add_argument("--workers", type=int, default=2, help="actors of the multi-actor platform run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are over these)")
    parser.add_argument("--iterations", type=int, default=2, help="meta-iterations per run per round")
    parser.add_argument(
        "--quiet-timeout", type=float, default=30.0, help="max seconds to wait for an idle machine before timing"
    )
    parser.add_argument(
        "--ab-malloc", action="store_true", help="add a run of N actors with METAPLATFORM_MALLOC_TUNING=0 (A/B)"
    )
    parser.add_argument(
        "--ab-vectorize", action="store_true", help="add a run of N actors on the other path (loop / vmap)"
    )
    args = parser.parse_args(argv)
    names, base = resolve_common_arguments(parser, args)
    if args.tiny:
        args.rounds, args.iterations, args.quiet_timeout = 1, 1, min(args.quiet_timeout, 8.0)

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # the reference and the peak measurement get every core
    peak, dtype_name = device_peak(args.device, args.tiny)
    print(f"cpu: {cpu_model()}, {threads} cores; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(args.device)}")
    print(f"{dtype_name} matmul peak (torch.mm on {args.device}): {peak:.1f} GFLOP/s", flush=True)
    # The 1-actor, N-actor (and A/B) pools of a setting are alive at once: Ray must hold them all.
    actors = 1 + args.workers * (1 + args.ab_malloc + args.ab_vectorize)
    if args.device.type == "cuda":  # rounded down to Ray's 1e-4 resolution, so that the shares fit in one GPU
        base.append(f"resources.gpus_per_worker={math.floor(1e4 / actors) / 1e4}")
    probe = load_config(args.config, base + [f"resources.workers={args.workers}"])
    connect_ray(actors * probe.resources.cpus_per_worker)
    results = []
    try:
        for name in names:
            result = run_setting(name, args, base, peak)
            results.append(result)
            print(format_table(result), flush=True)
    finally:
        ray.shutdown()
    if args.json:
        gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None
        header = {"cpu": cpu_model(), "cores": threads, "device": str(args.device), "gpu": gpu}
        write_json(args.json, header | {"matmul_peak_gflops": peak, "matmul_peak_dtype": dtype_name}, results)
    return 0


if __name__ == "__main__":
    run(main)
