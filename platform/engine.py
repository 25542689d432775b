"""The Ray engine: adaptation actors and the pool that drives them.

Protocol (one round trip per actor per meta-iteration):
  driver -> actors  one `ray.put` of the flat float32 parameter buffer, shared by all actors,
                    plus each actor's shard: a list of chunks, each a list of task seeds;
  actors -> driver  one `ChunkGradients`: a float32 row per chunk with the chunk's summed outer
                    gradient, and per chunk its loss and accuracy sums, task count and seconds.
The driver sums the rows in chunk order. Chunk boundaries are fixed by the config, not by the
number of actors, so the result is bitwise the same for 1, 2 or 3 actors.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, OutOfMemoryError, RayActorError, WorkerCrashedError
from ray.util.placement_group import (
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from platform.algorithms import Params, build
from platform.chunks import shards
from platform.cli import first_line
from platform.config import RunConfig
from platform.data import DataError
from platform.tasks import task_sampler

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


@dataclass(frozen=True, eq=False)
class ChunkGradients:
    """What an actor returns for its shard of chunks, in chunk order: row i of `grads` is chunk i's
    summed outer gradient (float32, flattened like `flatten`), and the other fields are chunk i's
    sums of the task losses and accuracies, its task count and its compute seconds."""

    grads: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    tasks: np.ndarray
    seconds: np.ndarray

    @staticmethod
    def concat(shards: list[ChunkGradients]) -> ChunkGradients:
        """The shards' chunks as one, in shard order."""
        return ChunkGradients(
            *(np.concatenate([getattr(s, f.name) for s in shards]) for f in dataclasses.fields(ChunkGradients))
        )

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in dataclasses.fields(self))


@dataclass(frozen=True)
class WorkerInfo:
    """Where an adaptation actor runs."""

    pid: int
    node: str
    device: str


class AdaptationWorker:
    """Adapts shards of tasks. A plain class: Ray wraps it as an actor, tests may call it directly.

    Constructing it builds the model only; the task data is loaded by `load` (or by the first call
    that needs it). The pool bounds the two apart: an actor's start by resources.start_timeout_s,
    its data (on a new node: the download and the image cache build) by resources.data_timeout_s.
    """

    def __init__(self, config: dict):
        self.config = RunConfig.model_validate(config)
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(max(1, int(self.config.resources.cpus_per_worker)))
        tune_malloc()
        self.model, self.algorithm, self.template = build(self.config, self.device)
        self.model.to(self.device)
        self.samplers = {}

    def load(self) -> str | None:
        """Loads the training split's tasks (building this node's image cache if no process has) and
        warms up vmap; the data error, if the data cannot be loaded here (the user's to fix, not a
        dying actor to restart), else None."""
        try:
            sampler = self._sampler("train")
        except DataError as e:
            return str(e)
        if getattr(self.algorithm, "vectorized", False):
            # torch.func's first call costs ~2 s of set-up (not per shape): paid here, before any work,
            # so that it never counts against resources.worker_timeout_s. Nothing of it is kept.
            params = {k: v.to(self.device) for k, v in self.template.items()}
            self.algorithm.outer_grad(params, [sampler.sample(0).to(self.device)])
        return None

    def _sampler(self, split: str):
        if split not in self.samplers:
            self.samplers[split] = task_sampler(self.config.task, split)
        return self.samplers[split]

    def _params(self, flat: np.ndarray) -> Params:
        return {k: v.to(self.device) for k, v in unflatten(torch.tensor(flat), self.template).items()}

    def info(self) -> WorkerInfo:
        return WorkerInfo(os.getpid(), ray.get_runtime_context().get_node_id(), str(self.device))

    def outer_grads(self, flat_params: np.ndarray, chunks: list[list[int]]) -> ChunkGradients:
        """Each chunk's summed outer gradient and statistics."""
        params, sampler = self._params(flat_params), self._sampler("train")
        grads, stats = [], []
        for seeds in chunks:
            start = time.perf_counter()
            chunk_grads, metrics = self.algorithm.outer_grad(params, [sampler.sample(s).to(self.device) for s in seeds])
            grads.append(flatten(chunk_grads))
            stats.append((metrics["loss"], metrics["accuracy"], metrics["tasks"], time.perf_counter() - start))
        loss, accuracy, tasks, seconds = (np.array(column) for column in zip(*stats))
        return ChunkGradients(np.stack(grads), loss, accuracy, tasks, seconds)

    def evaluate(self, flat_params: np.ndarray, split: str, steps: int, seeds: list[int]) -> np.ndarray:
        """One row of EVAL_METRICS per task (after `steps` inner steps on the support set)."""
        params, sampler = self._params(flat_params), self._sampler(split)
        rows = []
        for seed in seeds:
            m = self.algorithm.evaluate(params, sampler.sample(seed).to(self.device), steps)
            rows.append([m.get(k, np.nan) for k in EVAL_METRICS])
        return np.asarray(rows, dtype=np.float32)


def worker_bundle(config: RunConfig) -> dict[str, float]:
    """The resources one adaptation actor reserves."""
    r = config.resources
    return {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})


class WorkerStartError(RuntimeError):
    """Too few workers could be placed or started in time."""


class WorkerFailureError(RuntimeError):
    """Workers failed more often than the config allows."""


@dataclass(eq=False)
class _Slot:
    """Worker `index`: its placement-group bundle and the actor in it: vacant, starting (`call` is its
    `info`), loading its task data (`where` it started; `call` is its `load`) or live (`info`)."""

    index: int
    bundle: int
    actor: ActorHandle | None = None
    call: ObjectRef | None = None  # what the slot waits for: the actor's `info`, then its `load`
    deadline: float = 0.0  # for `call`: resources.start_timeout_s, then resources.data_timeout_s
    where: WorkerInfo | None = None  # the actor has started (it may still be loading its data)
    info: WorkerInfo | None = None
    homeless: bool = False  # its bundle lost its node and has no new one yet (said once)


class WorkerPool:
    """Up to `resources.workers` AdaptationWorker actors in one placement group, elastic under failures.

    `map` splits a list of work items into one contiguous shard per live actor and returns the
    result arrays in item order. Work is handed out from a queue: an actor that dies (its process, or
    its whole node) or stays silent past `worker_timeout_s` is killed, and its shard goes back to the
    queue for the next free actor. Since results are per item, never per actor, they are those of a
    run without the failure.

    A dead actor's bundle gets a new actor as soon as the bundle has a live node: at once if its node
    is alive, or when Ray has re-placed the bundle of a lost node (which it does when the cluster has
    room). Until then the pool carries on with fewer actors, down to `resources.min_workers`; below
    that it waits up to `start_timeout_s` for capacity. Every failed start counts as a failure.

    An actor is live once it has started (within `start_timeout_s`) and then loaded its task data
    (within `data_timeout_s`: the first actor on a new node downloads the data set and builds the
    node's image cache, which may take far longer than a start). Data it cannot load, or not in
    time, is a DataError: the user's to fix, never restarted.

    Standalone, the pool reserves its own placement group. Inside a Ray Tune trial it uses the
    trial's group instead, whose bundle 0 holds the trial's driver and bundles 1.. the workers: a
    trial is reserved whole, so trials never compete for actors' CPUs.

    `actor_env` adds environment variables to the actors' (e.g. to A/B an engine switch).
    """

    def __init__(self, config: RunConfig, log=print, actor_env: dict[str, str] | None = None):
        self.config, self.log, self.actor_env = config, log, actor_env
        self.failures = self.restarts = 0
        r = config.resources
        bundle = worker_bundle(config)
        self.group = get_current_placement_group()
        self.own_group = self.group is None
        if self.own_group:
            self.group = placement_group([bundle] * r.workers, strategy=r.placement)
        first = 0 if self.own_group else 1
        if len(self.group.bundle_specs) != first + r.workers:
            raise WorkerStartError(
                f"the placement group this driver runs in has {len(self.group.bundle_specs)} bundles; "
                f"resources.workers={r.workers} needs {first + r.workers} (see platform.tune.trial_resources)"
            )
        try:
            ray.get(self.group.ready(), timeout=r.start_timeout_s)
        except GetTimeoutError:
            if self.own_group:
                remove_placement_group(self.group)
            raise WorkerStartError(
                f"could not reserve {r.workers} workers x {bundle} within resources.start_timeout_s="
                f"{r.start_timeout_s:g}s; the cluster has {ray.cluster_resources()}"
            ) from None
        self.remote = ray.remote(AdaptationWorker)
        self._started_once = False  # from then on, an actor becoming live is a restart
        self.slots = [_Slot(i, first + i) for i in range(r.workers)]
        try:
            for slot in self.slots:
                self._start(slot)
            self._wait_for_workers(r.workers)
        except BaseException:  # a caller without a pool cannot clean up after it
            self.shutdown()
            raise

    @property
    def live(self) -> list[_Slot]:
        return [s for s in self.slots if s.info is not None]

    @property
    def infos(self) -> list[WorkerInfo]:
        """Where each live actor runs."""
        return [s.info for s in self.live]

    def _start(self, slot: _Slot) -> None:
        r = self.config.resources
        slot.actor = self.remote.options(
            num_cpus=r.cpus_per_worker,
            num_gpus=r.gpus_per_worker,
            max_restarts=0,
            runtime_env={"env_vars": self.actor_env} if self.actor_env else None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=slot.bundle),
        ).remote(self.config.model_dump(mode="json"))
        slot.call, slot.deadline = slot.actor.info.remote(), time.monotonic() + r.start_timeout_s

    def _fail(self, slot: _Slot, reason: str) -> None:
        """Count a failure, kill the actor and leave its slot vacant for `_refill`."""
        self.failures += 1
        who = f"pid {slot.where.pid}" if slot.where else "starting"
        self.log(f"worker {slot.index} ({who}) failed: {reason}")
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
        slot.actor = slot.call = slot.where = slot.info = None
        if self.failures > self.config.resources.max_worker_failures:
            raise WorkerFailureError(
                f"{self.failures} worker failures, more than resources.max_worker_failures="
                f"{self.config.resources.max_worker_failures}"
            )

    def _settle(self, finished: list[ObjectRef]) -> None:
        """Actors whose call in `finished` answered move on: a started one loads its data (on a clock of
        its own), a loaded one becomes live. One that died, or did not start within `start_timeout_s`,
        fails; data that cannot be loaded, or not within `data_timeout_s`, raises DataError."""
        r = self.config.resources
        for slot in self.slots:
            if slot.call is None:
                continue
            if slot.call not in finished:
                if time.monotonic() > slot.deadline and slot.where is None:
                    self._fail(slot, f"did not start within resources.start_timeout_s={r.start_timeout_s:g}s")
                elif time.monotonic() > slot.deadline:
                    raise self._data_error(
                        slot.where,
                        f"the task data did not load within resources.data_timeout_s={r.data_timeout_s:g}s "
                        "(its download or the node's image cache build is too slow or stuck); check the "
                        "source, or raise resources.data_timeout_s",
                    )
                continue
            try:
                answer = ray.get(slot.call)
            except WORKER_FAILURES as e:
                self._fail(slot, f"could not start: {first_line(e)}")
                continue
            if slot.where is None:  # started: now its data
                slot.where = answer
                slot.call, slot.deadline = slot.actor.load.remote(), time.monotonic() + r.data_timeout_s
                continue
            if answer is not None:
                raise self._data_error(slot.where, answer)
            slot.info, slot.call = slot.where, None
            if self._started_once:
                self.restarts += 1
                self.log(
                    f"worker {slot.index} restarted (pid {slot.info.pid} on node {slot.info.node[:8]}); "
                    f"{len(self.live)} of {len(self.slots)} workers"
                )
            slot.homeless = False

    def _data_error(self, where: WorkerInfo, problem: str) -> DataError:
        return DataError(f"task.data = {self.config.task.data!r}: on node {where.node[:8]}: {problem}")

    def _refill(self) -> None:
        """Start an actor in every vacant slot whose bundle has a live node; say once of each that has none."""
        vacant = [s for s in self.slots if s.actor is None]
        if not vacant:
            return
        table = placement_group_table(self.group)["bundles_to_node_id"]
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for slot in vacant:
            if table.get(slot.bundle) in alive:
                self._start(slot)
            elif not slot.homeless:
                slot.homeless = True
                self.log(
                    f"worker {slot.index}: its node is gone and the cluster has no room for it now; carrying on "
                    f"with {len(self.live)} of {len(self.slots)} workers (resources.min_workers="
                    f"{self.config.resources.min_workers}) until it has"
                )

    def _wait_for_workers(self, count: int) -> None:
        """Block until `count` actors are live, or raise WorkerStartError when fewer than `count` have
        started for `start_timeout_s` (actors loading their data have started: `data_timeout_s` bounds them)."""
        r = self.config.resources
        deadline, started = time.monotonic() + r.start_timeout_s, 0
        while len(self.live) < count:
            now_started = sum(s.where is not None for s in self.slots)
            if now_started > started:  # an actor started: the others get start_timeout_s from now
                deadline, started = time.monotonic() + r.start_timeout_s, now_started
            if now_started < count and time.monotonic() > deadline:
                raise WorkerStartError(
                    f"only {len(self.live)} of {r.workers} workers alive, fewer than the {count} needed, and no "
                    f"more could be started within resources.start_timeout_s={r.start_timeout_s:g}s; "
                    f"the cluster has {ray.cluster_resources()}"
                )
            self._refill()
            starting = [s.call for s in self.slots if s.call is not None]
            finished = ray.wait(starting, num_returns=1, timeout=1.0)[0] if starting else time.sleep(1.0) or []
            self._settle(finished)
        self._started_once = True

    def map(self, fn: Callable[[ActorHandle, list], ObjectRef], items: list, cancel: Callable[[], bool] | None = None):
        """`fn(actor, shard)` (which calls a method of the actor: `lambda a, s: a.evaluate.remote(s)`)
        for one contiguous shard of `items` per live actor; the results in shard order. None as soon as
        `cancel()` is true (checked a few times a second): the calls still running are abandoned."""
        r = self.config.resources
        self._settle([])
        self._refill()
        if len(self.live) < r.min_workers:
            self._wait_for_workers(r.min_workers)
        n = len(self.live)
        work = shards(items, n)
        queue = deque(k for k in range(n) if work[k])
        results: list = [None] * n
        running: dict[ObjectRef, tuple[_Slot, int, float]] = {}  # call -> (slot, shard, deadline)
        while queue or running:
            busy = {slot for slot, _, _ in running.values()}
            for slot in [s for s in self.live if s not in busy]:
                if not queue:
                    break
                k = queue.popleft()
                call = fn(slot.actor, work[k])
                running[call] = (slot, k, time.monotonic() + r.worker_timeout_s)
            if not running:  # shards left and no live actor to take them
                self._wait_for_workers(max(1, r.min_workers))
                continue
            starting = [s.call for s in self.slots if s.call is not None]
            wait_s = max(0.0, min(deadline for _, _, deadline in running.values()) - time.monotonic())
            if cancel is not None:
                if cancel():
                    return None
                wait_s = min(wait_s, 0.2)
            finished, _ = ray.wait([*running, *starting], num_returns=1, timeout=wait_s)
            for call in [c for c in finished if c in running]:
                slot, k, _ = running.pop(call)
                try:
                    results[k] = ray.get(call)
                except WORKER_FAILURES as e:
                    self._fail(slot, first_line(e))
                    queue.append(k)
            for call, (slot, k, deadline) in list(running.items()):
                if time.monotonic() > deadline:
                    del running[call]
                    self._fail(slot, f"no answer within resources.worker_timeout_s={r.worker_timeout_s:g}s")
                    queue.append(k)
            self._settle(finished)
            self._refill()
            if len(self.live) + sum(s.call is not None for s in self.slots) < r.min_workers:
                self._wait_for_workers(r.min_workers)
        return [res for res in results if res is not None]

    def put(self, value) -> ObjectRef:
        """`value` in the object store once, for every actor's call to read (`map`'s `fn` passes it)."""
        return ray.put(value)

    @property
    def address(self) -> str:
        """The Ray cluster's GCS address."""
        return ray.get_runtime_context().gcs_address

    @property
    def summary(self) -> str:
        """One line: the live actors and where they run."""
        return f"{len(self.live)} workers: " + ", ".join(
            f"pid {i.pid} ({i.device} on node {i.node[:8]})" for i in self.infos
        )

    def shutdown(self) -> None:
        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
        if self.own_group:  # a trial's group is Ray Tune's to remove
            remove_placement_group(self.group)
