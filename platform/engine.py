"""The Ray engine: adaptation actors and the pool that drives them.

Protocol (one round trip per actor per meta-iteration):
  driver -> actors  one `ray.put` of the flat float32 parameter buffer, shared by all actors,
                    plus each actor's shard: a list of chunks, each a list of task seeds;
  actors -> driver  one float32 array with a row per chunk: the chunk's summed outer gradient
                    followed by its metrics (loss sum, accuracy sum, task count, seconds).
The driver sums the rows in chunk order. Chunk boundaries are fixed by the config, not by the
number of actors, so the result is bitwise the same for 1, 2 or 3 actors.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, OutOfMemoryError, RayActorError, WorkerCrashedError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from platform.algorithms import Params, build
from platform.config import RunConfig
from platform.tasks import task_sampler

GRAD_METRICS = ("loss", "accuracy", "tasks", "seconds")
EVAL_METRICS = ("loss_before", "accuracy_before", "loss", "accuracy")
# What a dead, lost or crashed actor looks like to the driver; anything else is a bug and propagates.
WORKER_FAILURES = (RayActorError, ActorUnavailableError, WorkerCrashedError, OutOfMemoryError)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep freed tensor buffers in the heap instead of handing them back to the OS (glibc only).

    By default glibc serves large blocks (a conv4 layer's activations are ~15 MB) with mmap and
    returns them on free, so every meta-step page-faults its activations in again (kernel time
    zero-filling pages). Raising the mmap threshold to its maximum (32 MiB on 64-bit) and the trim
    threshold to 1 GiB keeps them reusable: +2-16% tasks/s with 2 actors (docs/benchmarks.md).
    Numerics are untouched. Off with METAPLATFORM_MALLOC_TUNING=0. Returns whether it was applied.
    """
    if os.environ.get("METAPLATFORM_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # not glibc
        return False


def flatten(params: Params) -> np.ndarray:
    return torch.cat([v.detach().reshape(-1).float().cpu() for v in params.values()]).numpy()


def unflatten(flat: np.ndarray | torch.Tensor, like: Params) -> Params:
    flat = torch.as_tensor(flat)
    out, start = {}, 0
    for k, v in like.items():
        out[k] = flat[start : start + v.numel()].view_as(v)
        start += v.numel()
    return out


def chunked(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


class AdaptationWorker:
    """Adapts shards of tasks. A plain class: Ray wraps it as an actor, tests may call it directly."""

    def __init__(self, config: dict):
        self.config = RunConfig.model_validate(config)
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(max(1, int(self.config.resources.cpus_per_worker)))
        tune_malloc()
        self.model, self.algorithm, self.template = build(self.config, self.device)
        self.model.to(self.device)
        self.samplers = {"train": task_sampler(self.config.task, "train")}

    def _sampler(self, split: str):
        if split not in self.samplers:
            self.samplers[split] = task_sampler(self.config.task, split)
        return self.samplers[split]

    def _params(self, flat: np.ndarray) -> Params:
        return {k: v.to(self.device) for k, v in unflatten(torch.tensor(flat), self.template).items()}

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.device)}

    def outer_grads(self, flat_params: np.ndarray, chunks: list[list[int]]) -> np.ndarray:
        """One row per chunk: summed outer gradient, then GRAD_METRICS."""
        params, rows = self._params(flat_params), []
        sampler = self.samplers["train"]
        for seeds in chunks:
            start = time.perf_counter()
            grads, metrics = self.algorithm.outer_grad(params, [sampler.sample(s).to(self.device) for s in seeds])
            seconds = time.perf_counter() - start
            tail = np.array([metrics["loss"], metrics["accuracy"], metrics["tasks"], seconds], dtype=np.float32)
            rows.append(np.concatenate([flatten(grads), tail]))
        return np.stack(rows)

    def evaluate(self, flat_params: np.ndarray, split: str, steps: int, seeds: list[int]) -> np.ndarray:
        """One row of EVAL_METRICS per task (after `steps` inner steps on the support set)."""
        params, sampler = self._params(flat_params), self._sampler(split)
        rows = []
        for seed in seeds:
            m = self.algorithm.evaluate(params, sampler.sample(seed).to(self.device), steps)
            rows.append([m.get(k, np.nan) for k in EVAL_METRICS])
        return np.asarray(rows, dtype=np.float32)


class WorkerStartError(RuntimeError):
    """Workers could not be placed or started in time."""


class WorkerFailureError(RuntimeError):
    """Workers failed more often than the config allows."""


class WorkerPool:
    """`resources.workers` AdaptationWorker actors in one placement group, with failure handling.

    `actor_env` adds environment variables to the actors' (e.g. to A/B an engine switch).
    `map` splits a list of work items into one contiguous shard per actor, sends each actor its
    shard in a single call and returns the result rows in item order. An actor that dies or stays
    silent past `worker_timeout_s` is killed and replaced in its placement-group bundle, and its
    shard runs again there; the results are those of a run without the failure.
    """

    def __init__(self, config: RunConfig, log=print, actor_env: dict[str, str] | None = None):
        self.config, self.log, self.actor_env = config, log, actor_env
        self.failures = self.restarts = 0
        r = config.resources
        bundle = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})
        self.group = placement_group([bundle] * r.workers, strategy=r.placement)
        try:
            ray.get(self.group.ready(), timeout=r.start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.group)
            raise WorkerStartError(
                f"could not reserve {r.workers} workers x {bundle} within resources.start_timeout_s="
                f"{r.start_timeout_s:g}s; the cluster has {ray.cluster_resources()}"
            ) from None
        self.remote = ray.remote(AdaptationWorker)
        self.actors = [self._start(i) for i in range(r.workers)]
        self.infos = [self._wait_ready(i) for i in range(r.workers)]

    def _start(self, index: int):
        r = self.config.resources
        return self.remote.options(
            num_cpus=r.cpus_per_worker,
            num_gpus=r.gpus_per_worker,
            max_restarts=0,
            runtime_env={"env_vars": self.actor_env} if self.actor_env else None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
        ).remote(self.config.model_dump(mode="json"))

    def _wait_ready(self, index: int) -> dict:
        try:
            return ray.get(self.actors[index].info.remote(), timeout=self.config.resources.start_timeout_s)
        except GetTimeoutError:
            raise WorkerStartError(
                f"worker {index} did not start within resources.start_timeout_s={self.config.resources.start_timeout_s:g}s"
            ) from None

    def _replace(self, index: int, reason: str) -> None:
        self.failures += 1
        self.log(f"worker {index} (pid {self.infos[index]['pid']}) failed: {reason}")
        if self.failures > self.config.resources.max_worker_failures:
            raise WorkerFailureError(
                f"{self.failures} worker failures, more than resources.max_worker_failures="
                f"{self.config.resources.max_worker_failures}"
            )
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._start(index)
        self.infos[index] = self._wait_ready(index)
        self.restarts += 1
        self.log(f"worker {index} restarted (pid {self.infos[index]['pid']}); re-running its shard")

    def map(self, method: str, items: list, *args) -> list[np.ndarray]:
        """Call `actor.<method>(*args, shard)` on every actor; the per-actor result arrays, in item order."""
        n = len(self.actors)
        bounds = np.linspace(0, len(items), n + 1).round().astype(int)
        shards = [items[bounds[i] : bounds[i + 1]] for i in range(n)]
        timeout = self.config.resources.worker_timeout_s

        def submit(i: int):
            return getattr(self.actors[i], method).remote(*args, shards[i]), time.monotonic() + timeout

        pending = {i: submit(i) for i in range(n) if shards[i]}
        results: list[np.ndarray | None] = [None] * n
        while pending:
            refs = {ref: i for i, (ref, _) in pending.items()}
            wait_s = max(0.0, min(deadline for _, deadline in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=wait_s)
            for ref in ready:
                i = refs[ref]
                try:
                    results[i] = ray.get(ref)
                    del pending[i]
                except WORKER_FAILURES as e:
                    self._replace(i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    pending[i] = submit(i)
            for i, (_, deadline) in list(pending.items()):
                if time.monotonic() > deadline:
                    self._replace(i, f"no answer within resources.worker_timeout_s={timeout:g}s")
                    pending[i] = submit(i)
        return [r for r in results if r is not None]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)
