"""Meta-train: `python -m platform.train [--config FILE] [--resume] [key=value ...]`.

This process is the Ray driver. Every meta-iteration it draws the iteration's task seeds, has the
adaptation actors compute the summed outer gradients of fixed-size chunks of them, sums the chunks
in order, and applies the outer optimiser. Checkpoints hold everything needed to continue exactly.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from platform.checkpoint import CheckpointStore
from platform.cli import config_parser, run
from platform.config import RunConfig, load_config
from platform.engine import (
    GRAD_METRICS,
    WorkerFailureError,
    WorkerPool,
    WorkerStartError,
    build,
    chunked,
    flatten,
)
from platform.evaluate import format_eval, summarize
from platform.tasks import evaluation_seeds, iteration_seeds

import numpy as np
import ray
import torch

INTERRUPTED = 130


def connect_ray(config: RunConfig) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a private local instance."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "configure_logging": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        needed = math.ceil(config.resources.workers * config.resources.cpus_per_worker)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, **quiet)


def make_optimizer(config: RunConfig, params: list[torch.Tensor]):
    o = config.optim
    if o.outer_optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=o.outer_lr)
    else:
        optimizer = torch.optim.SGD(params, lr=o.outer_lr)
    if o.schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=o.iterations)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def meta_validate(pool: WorkerPool, config: RunConfig, flat_ref, split: str = "val") -> dict:
    seeds = evaluation_seeds(config.eval.tasks)
    rows = np.concatenate(pool.map("evaluate", seeds, flat_ref, split, config.optim.test_inner_steps))
    return summarize(rows, config.classification)


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current iteration, checkpoint, exit. A second one kills at once."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)


def train(config: RunConfig) -> dict:
    """Meta-train per `config`; returns the final checkpoint state."""
    o = config.optim
    store = CheckpointStore(config.checkpoint.dir, keep=config.checkpoint.keep)
    _, _, initial = build(config)
    params = {k: torch.nn.Parameter(v) for k, v in initial.items()}
    optimizer, scheduler = make_optimizer(config, list(params.values()))
    start, history = 0, []
    if config.checkpoint.resume:
        if store.latest() is None:
            print(f"no checkpoint in {config.checkpoint.dir}: starting from iteration 0")
        else:
            state = store.load()
            with torch.no_grad():
                for k, v in state["params"].items():
                    params[k].copy_(v)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = state["iteration"], state["history"]
            print(f"resumed from {config.checkpoint.dir} at iteration {start}")

    def checkpoint(iteration: int) -> str:
        state = {
            "iteration": iteration,
            "params": {k: v.detach().clone() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": config.model_dump(mode="json"),
            "history": history,
            # No RNG state: every random draw is a function of (seed, iteration), see tasks.py.
        }
        return store.save(state, iteration)

    connect_ray(config)
    stop = StopRequest()
    size = len(flatten(params))
    iteration, pool = start, None
    try:
        pool = WorkerPool(config)
        print(f"{len(pool.actors)} workers: " + ", ".join(f"pid {i['pid']} ({i['device']})" for i in pool.infos))
        window_start, window_tasks, window_driver = time.perf_counter(), 0, 0.0
        while iteration < o.iterations:
            t0 = time.perf_counter()
            flat_ref = ray.put(flatten(params))
            chunks = chunked(iteration_seeds(config.seed, iteration, o.meta_batch), o.chunk)
            t1 = time.perf_counter()
            shards = pool.map("outer_grads", chunks, flat_ref)
            t2 = time.perf_counter()
            rows = np.concatenate(shards)
            grad = torch.from_numpy(rows[:, :size].sum(axis=0) / o.meta_batch)
            start_index = 0
            for p in params.values():
                p.grad = grad[start_index : start_index + p.numel()].view_as(p).clone()
                start_index += p.numel()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), o.grad_clip)
            optimizer.step()
            scheduler.step()
            iteration += 1
            metrics = dict(zip(GRAD_METRICS, rows[:, size:].sum(axis=0).tolist()))
            actor_seconds = max(s[:, size + GRAD_METRICS.index("seconds")].sum() for s in shards)
            window_tasks += o.meta_batch
            window_driver += (t1 - t0) + (time.perf_counter() - t2) + max(0.0, (t2 - t1) - actor_seconds)
            record = {
                "iteration": iteration,
                "loss": metrics["loss"] / metrics["tasks"],
                "accuracy": metrics["accuracy"] / metrics["tasks"],
            }
            if iteration % config.log_every == 0 or iteration == o.iterations:
                elapsed = time.perf_counter() - window_start
                rate = window_tasks / elapsed
                eta = (o.iterations - iteration) * o.meta_batch / rate
                acc = f"  acc {record['accuracy']:.3f}" if config.classification else ""
                print(
                    f"iter {iteration:>6}/{o.iterations}  loss {record['loss']:.4f}{acc}  {rate:7.1f} tasks/s"
                    f"  driver {window_driver / elapsed:5.1%}  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                    flush=True,
                )
                record |= {"tasks_per_s": rate, "driver_share": window_driver / elapsed}
                window_start, window_tasks, window_driver = time.perf_counter(), 0, 0.0
            if config.eval.every and (iteration % config.eval.every == 0 or iteration == o.iterations):
                result = meta_validate(pool, config, ray.put(flatten(params)))
                record["val"] = result
                print(f"meta-validation at {iteration}: {format_eval(result, config.classification)}", flush=True)
            history.append(record)
            if iteration % config.checkpoint.every == 0 and iteration < o.iterations:
                checkpoint(iteration)
            if stop.signal:
                where = checkpoint(iteration)
                print(
                    f"{stop.signal}: stopped after iteration {iteration}; checkpoint {where}\n"
                    f"resume with the same command plus --resume (or checkpoint.resume=true)",
                    file=sys.stderr,
                )
                sys.exit(INTERRUPTED)
        where = checkpoint(iteration)
    except (WorkerStartError, WorkerFailureError) as e:
        where = checkpoint(iteration)
        print(
            f"error: {e}\nstopped after iteration {iteration}; checkpoint {where}; resume with --resume",
            file=sys.stderr,
        )
        sys.exit(1)
    finally:
        if pool is not None:
            pool.shutdown()
    print(
        f"done: {iteration} iterations, {pool.failures} worker failures, {pool.restarts} restarts; final checkpoint {where}"
    )
    return store.load()


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("Meta-train a model over a distribution of tasks on Ray actors.")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint (checkpoint.resume=true)"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides + (["checkpoint.resume=true"] if args.resume else []))
    print("resolved config:\n" + config.to_yaml(), flush=True)
    train(config)
    return 0


if __name__ == "__main__":
    run(main)
