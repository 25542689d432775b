"""The driver's side of a meta-iteration: dispatch the iteration's seeds, sum the chunks in order,
step the outer optimiser; and the record of what it cost.

    record = meta_step(config, params, optimizer, pool, iteration)

is all a meta-iteration is (platform.train wraps it with resume, checkpoints and observers; the
benchmarks call it as it is).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from platform.chunks import gradient_chunks
from platform.config import OptimConfig, RunConfig, with_values
from platform.engine import ChunkGradients, WorkerPool, flatten, unflatten
from platform.metatest import summarize
from platform.tasks import evaluation_seeds, iteration_seeds


def connect_ray(cpus_needed: float, env_vars: dict[str, str] | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a private local instance
    with at least `cpus_needed` logical CPUs (so the actors' reservations always fit). `env_vars` go
    to every process this driver's job starts (held by Ray, not written anywhere)."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "configure_logging": True}
    if env_vars:
        quiet["runtime_env"] = {"env_vars": env_vars}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(
            address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), include_dashboard=False, **quiet
        )


def with_absolute_data(config: RunConfig) -> RunConfig:
    """`config` with a relative local `task.data` made absolute from this process's folder, unless a
    cluster is named (RAY_ADDRESS: a Ray job's working directory is where its actors resolve it): the
    actors of a private instance do not run in the driver's folder."""
    data = config.task.data
    if not data or "://" in data or os.path.isabs(data) or os.environ.get("RAY_ADDRESS"):
        return config
    return with_values(config, {"task.data": os.path.abspath(data)})


def outer_lr(optim: OptimConfig, iteration: int) -> float:
    """λ for the update of `iteration` (0-based): a function of the config alone, so a resumed run with
    another horizon, or a PBT trial with a new λ, needs no restored scheduler state."""
    if optim.schedule == "cosine":
        return optim.outer_lr * (1 + math.cos(math.pi * min(iteration, optim.iterations) / optim.iterations)) / 2
    return optim.outer_lr


def make_optimizer(config: RunConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The outer optimiser, on torch's multi-tensor (foreach) kernels: one kernel per operation for all
    parameters instead of one per parameter (Adam's step 219 -> 120 us for the sinusoid MLP), bitwise
    the for-loop's results (tests/test_driver.py); not `fused`, whose Adam rounds differently."""
    o = config.optim
    if o.outer_optimizer == "adam":
        return torch.optim.Adam(params, lr=o.outer_lr, foreach=True)
    return torch.optim.SGD(params, lr=o.outer_lr, foreach=True)


def apply_meta_gradient(
    params: dict[str, torch.nn.Parameter], grads: np.ndarray, optimizer, config: RunConfig, iteration: int
) -> None:
    """Sum the chunks' gradient rows in chunk order, average over the meta-batch, clip, step at
    `outer_lr(iteration)`."""
    mean = torch.from_numpy(grads.sum(axis=0) / config.optim.meta_batch)
    for p, g in zip(params.values(), unflatten(mean, params).values()):
        p.grad = g  # a view of the one buffer: nothing is copied
    if config.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.optim.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = outer_lr(config.optim, iteration)
    optimizer.step()


PHASES = ("actor_compute", "transfer", "outer_update")  # an iteration's wall time, split (IterationRecord)


@dataclass(frozen=True)
class IterationRecord:
    """One meta-iteration as observers see it (MLflow, Prometheus, Tune, the console).

    `seconds` is its wall time, split into `actor_compute` (the slowest actor's compute),
    `transfer` (dispatch, object store, waiting: the rest of the round trip) and `outer_update`
    (the reduce and the optimiser step); `shard_compute` is each actor's compute (its shard's).
    `train_s` is the training wall time so far, without meta-validation: what time to accuracy is
    measured in.
    """

    iteration: int
    train_s: float
    loss: float
    accuracy: float
    tasks: int
    seconds: float
    actor_compute: float
    transfer: float
    outer_update: float
    bytes_out: int  # the parameters, once to every actor
    bytes_back: int  # the chunks' gradients and statistics
    workers_alive: int
    worker_failures: int
    worker_restarts: int
    val: dict | None = None  # the meta-validation summary, at the iterations that have one
    shard_compute: tuple[float, ...] = ()

    @property
    def gradient_bytes(self) -> int:
        return self.bytes_out + self.bytes_back

    @property
    def driver_seconds(self) -> float:
        """Everything but the actors' compute: what the driver adds to an iteration."""
        return self.seconds - self.actor_compute


def window_rates(records: list[IterationRecord]) -> tuple[float, float]:
    """(tasks per second, driver share) over consecutive iterations: the one definition of both."""
    seconds = sum(r.seconds for r in records)
    return sum(r.tasks for r in records) / seconds, sum(r.driver_seconds for r in records) / seconds


def idle_fraction(records: list[IterationRecord]) -> float:
    """The share of the actors' time spent waiting for the slowest one of each iteration (0 with one
    actor): what unequal shards cost."""
    slowest = sum(max(r.shard_compute) * len(r.shard_compute) for r in records)
    return 1 - sum(sum(r.shard_compute) for r in records) / slowest


def meta_step(
    config: RunConfig,
    params: dict[str, torch.nn.Parameter],
    optimizer,
    pool: WorkerPool,
    iteration: int,
    train_s: float,
) -> IterationRecord:
    """Meta-iteration `iteration` (0-based): the actors compute the chunks' outer gradients, the
    driver sums them in chunk order and steps. `train_s` is the training time before it. `pool` is
    a WorkerPool or an in-process platform.local.LocalPool: the same chunks, the same sum."""
    o = config.optim
    t0 = time.perf_counter()
    flat = flatten(params)
    flat_ref = pool.put(flat)
    chunks = gradient_chunks(iteration_seeds(config.seed, iteration, o.meta_batch), o.chunk, config.resources.workers)
    t1 = time.perf_counter()
    shards: list[ChunkGradients] = pool.map(lambda actor, shard: actor.outer_grads.remote(flat_ref, shard), chunks)
    t2 = time.perf_counter()
    result = ChunkGradients.concat(shards)
    apply_meta_gradient(params, result.grads, optimizer, config, iteration)
    t3 = time.perf_counter()
    shard_compute = tuple(float(s.seconds.sum()) for s in shards)
    actor_compute = min(t2 - t1, max(shard_compute))
    tasks = int(result.tasks.sum())
    return IterationRecord(
        iteration=iteration + 1,
        train_s=train_s + (t3 - t0),
        loss=float(result.loss.sum()) / tasks,
        accuracy=float(result.accuracy.sum()) / tasks,
        tasks=tasks,
        seconds=t3 - t0,
        actor_compute=actor_compute,
        transfer=(t2 - t0) - actor_compute,
        outer_update=t3 - t2,
        bytes_out=flat.nbytes * len(shards),
        bytes_back=result.nbytes,
        workers_alive=len(pool.live),
        worker_failures=pool.failures,
        worker_restarts=pool.restarts,
        shard_compute=shard_compute,
    )


def meta_validate(pool: WorkerPool, config: RunConfig, params, split: str = "val", cancel=None) -> dict | None:
    """Mean and 95% interval over `eval.tasks` fixed tasks of `split`, computed by the actors; None if
    `cancel()` became true first (a stop does not wait for a long meta-validation)."""
    flat_ref, steps = pool.put(flatten(params)), config.optim.test_inner_steps
    seeds = evaluation_seeds(config.eval.tasks)
    rows = pool.map(lambda actor, shard: actor.evaluate.remote(flat_ref, split, steps, shard), seeds, cancel)
    return None if rows is None else summarize(np.concatenate(rows), config.classification)
