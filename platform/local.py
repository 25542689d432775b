"""In-process execution: the driver computes the meta-gradient itself, without Ray.

For a small model a Ray round trip costs more than the work it carries: a sinusoid iteration
(25 tasks, MLP) takes ~10-25 ms of compute in one thread and ~55 ms through two actors, and Ray's
start and stop add ~20 s to a run. `LocalPool` has the interface of `engine.WorkerPool` that the
driver uses (`put`, `map`, `live`, `infos`, `failures`, `restarts`, `summary`, `address`,
`shutdown`) and runs one `engine.AdaptationWorker` in this process, over the same chunks in the
same order, so the parameters are bitwise those of a Ray run with the same chunking,
vectorisation and thread count (`resources.cpus_per_worker`).

`execution(config)` resolves `resources.execution` and says in one line which and why.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import ray
import torch

from platform.chunks import chunked
from platform.config import ConfigError, RunConfig
from platform.data import DataError
from platform.driver import connect_ray
from platform.engine import AdaptationWorker, WorkerInfo, WorkerPool

CANCEL_PIECE = 50  # meta-validation tasks between checks for a stop (~0.2 s for the sinusoid MLP)


class _InProcessActor:
    """Stands in for an actor handle: `actor.outer_grads.remote(...)` calls the worker's method now."""

    def __init__(self, worker: AdaptationWorker):
        self.outer_grads = SimpleNamespace(remote=worker.outer_grads)
        self.evaluate = SimpleNamespace(remote=worker.evaluate)


class LocalPool:
    """One AdaptationWorker in the driver process; `map` gives it all the items as one shard."""

    failures = restarts = 0  # nothing to fail: the worker is this process
    address = ""  # no Ray cluster

    def __init__(self, config: RunConfig):
        self._threads = torch.get_num_threads()  # the worker sets its own count; restored by shutdown
        worker = AdaptationWorker(config.model_dump(mode="json"))
        data_error = worker.load()
        if data_error:
            self.shutdown()
            raise DataError(f"task.data = {config.task.data!r}: {data_error}")
        self.actor = _InProcessActor(worker)
        self.infos = [WorkerInfo(os.getpid(), "local", str(worker.device))]
        self.live = [self.actor]

    @property
    def summary(self) -> str:
        return (
            f"1 in-process worker: pid {self.infos[0].pid} ({self.infos[0].device}, {torch.get_num_threads()} threads)"
        )

    def put(self, value):
        return value  # the worker reads the driver's own buffer

    def map(self, fn, items: list, cancel=None) -> list | None:
        """`fn(actor, items)`, called now. With `cancel`, the items go in pieces of CANCEL_PIECE, with
        `cancel()` checked before each (None once it is true): per-item results (meta-validation's rows)
        are the same, in the same order."""
        if cancel is None:
            return [fn(self.actor, items)] if items else []
        results = []
        for piece in chunked(items, CANCEL_PIECE):
            if cancel():
                return None
            results.append(fn(self.actor, piece))
        return results

    def shutdown(self) -> None:
        torch.set_num_threads(self._threads)


def execution(config: RunConfig, log=print) -> type[LocalPool | WorkerPool]:
    """The pool class for `resources.execution`, said in one line with the reason; for Ray, joins the
    cluster in RAY_ADDRESS or starts a private instance first."""
    r = config.resources
    where, why = choose(config)
    if where == "local" and r.gpus_per_worker:
        problem = (
            f"resources.execution = {r.execution!r}: in-process execution computes on the driver's CPU; "
            f"set resources.gpus_per_worker = 0 (is {r.gpus_per_worker:g}) or resources.execution = 'ray'"
        )
        raise ConfigError([problem])
    log(f"execution: {where} ({why})")
    if where == "local":
        return LocalPool
    connect_ray(r.workers * r.cpus_per_worker)
    return WorkerPool


def choose(config: RunConfig) -> tuple[str, str]:
    """("local" or "ray", why). `auto` computes in-process only where that is faster (measured:
    docs/benchmarks.md) and no cluster was asked for."""
    r = config.resources
    if r.execution != "auto":
        return r.execution, f"resources.execution={r.execution}"
    if os.environ.get("RAY_ADDRESS"):  # set by the user, or by `ray job submit` for its driver
        return "ray", "auto: RAY_ADDRESS names a cluster"
    if ray.is_initialized():  # a Ray Tune trial, or a caller that connected first
        return "ray", "auto: this process is connected to Ray already"
    if r.gpus_per_worker:
        return "ray", "auto: resources.gpus_per_worker asks for GPU actors"
    if config.model.kind != "mlp":
        return "ray", f"auto: {config.model.kind} iterations are long enough for {r.workers} actors to pay"
    return "local", "auto: an MLP on one machine computes faster in-process than through Ray actors"
