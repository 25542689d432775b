"""Pre-train, then adapt (algorithm pretrain; RFS, Tian et al. 2020): the backbone and a linear head over
ALL meta-training classes trained as an ordinary classifier, data-parallel on Ray Train; at test time the
frozen embedding with a linear probe fitted per task (platform/probe.py).

    ray.train.torch.TorchTrainer: resources.workers workers, DDP (gloo on CPU, nccl on GPUs)
      each worker  the batch of SGD step i, a pure function of (seed, i), cut into equal shares: its own
      rank 0      every step: the step's loss/accuracy over all ranks, and the driver's stop flag, in one
                  all-reduce; every checkpoint.every steps (and at the end or a stop) the parameters and
                  the optimiser's state; every eval.every steps the meta-validation (the probe)
    the driver    relays what rank 0 sends through a `Channel` actor to the observers (MLflow, Prometheus,
                  console) and writes our checkpoints (platform/checkpoint.py), as train() does

Checkpoints are ours, not Ray Train's: the same store (folder or S3, verified, one writer, never
rewritten) and the same resume contract as the episodic algorithms, and the learner API, evaluate,
MLflow and Serve read them unchanged. Ray Train's own storage holds only its bookkeeping, in a
temporary folder removed at the end.

Batches: epoch e is a SHA-256 permutation (platform/streams.py) of the train split's images (each
Omniglot rotation a class); step i takes batch_size of them from epoch i // steps_per_epoch, then the
training augmentation (task.crop_padding/flip) drawn from ("pretrain-augment", seed, i). So a run
resumes exactly, and every worker count sees the same images per step. Not bitwise across worker
counts: each worker's BatchNorm normalises its own share (per-worker statistics, as RFS's
DataParallel), which changes the function, not only the summation order; a W-worker step equals the
mean of the W shares' gradients computed apart (tests/test_pretrain.py checks it for 2).
"""

from __future__ import annotations

import functools
import math
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from platform.cli import first_line, warn
from platform.config import ConfigError, RunConfig
from platform.driver import IterationRecord, connect_ray
from platform.images import augment
from platform.metatest import format_eval, meta_test
from platform.models import build_model, drawing_masks
from platform.observers import Observers
from platform.splits import split_sizes
from platform.streams import Stream
from platform.tasks import model_input, task_sampler
from platform.train import (
    Progress,
    StopRequest,
    checkpoint_after_a_bug,
    checkpointer,
    duration,
    finish,
    history_entry,
    initial_progress,
)

POLL_S = 0.1  # how often the driver collects what rank 0 sent


# -- the data: the train split as one labelled set; batches a pure function of (seed, step)


@dataclass(frozen=True, eq=False)
class TrainingImages:
    """Every image of the train split with its class (0..classes-1; an Omniglot rotation is a class)."""

    images: np.ndarray  # uint8, the source's array (a memory map of the cache)
    index: np.ndarray  # example -> row of `images`
    rotation: np.ndarray  # example -> quarter turns
    labels: np.ndarray  # example -> class
    classes: int

    def __len__(self) -> int:
        return len(self.index)

    def pixels(self, examples: np.ndarray) -> np.ndarray:
        rows = self.images[self.index[examples]]
        return np.stack([np.rot90(row, k=int(k), axes=(-2, -1)) for row, k in zip(rows, self.rotation[examples])])


def training_images(config: RunConfig) -> TrainingImages:
    """The train split's images as task_sampler(.., "train") sees them: the same classes and rotations."""
    sampler = task_sampler(config.task, "train")
    offsets, index, rotation, labels = sampler.images.offsets, [], [], []
    for label in range(sampler.num_classes):
        c = sampler.classes[label // sampler.rotations]
        rows = np.arange(offsets[c], offsets[c + 1])
        index.append(rows)
        rotation.append(np.full(len(rows), label % sampler.rotations))
        labels.append(np.full(len(rows), label))
    return TrainingImages(
        sampler.images.images, *(np.concatenate(a) for a in (index, rotation, labels)), sampler.num_classes
    )


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The examples of one epoch in the order they are used: a permutation owned by platform.streams."""
    return Stream("pretrain", seed, epoch).choice(count, count)


def mask_seed(seed: int, step: int, rank: int) -> int:
    """What worker `rank`'s training-time masks of SGD step `step` are drawn from (models.drawing_masks)."""
    return Stream("pretrain-masks", seed, step, rank).words(1)[0] >> 1


def batch_examples(config: RunConfig, step: int, count: int) -> np.ndarray:
    """The examples of SGD step `step` (0-based): batch_size of one epoch's order (the remainder dropped)."""
    size = config.pretrain.batch_size
    epoch, position = divmod(step, count // size)
    return epoch_order(config.seed, epoch, count)[position * size : (position + 1) * size]


def shard(
    config: RunConfig, data: TrainingImages, step: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker `rank`'s share of step `step`'s batch: (images as model input, labels)."""
    examples = batch_examples(config, step, len(data))
    pixels, t = data.pixels(examples), config.task
    if t.crop_padding or t.flip:  # drawn for the whole batch, so a share does not depend on the worker count
        pixels = augment(pixels, Stream("pretrain-augment", config.seed, step), t.crop_padding, t.flip)
    share = slice(rank * len(examples) // world, (rank + 1) * len(examples) // world)
    return model_input(pixels[share]), torch.from_numpy(data.labels[examples][share])


# -- the model and its optimiser


def train_classes(config: RunConfig) -> int:
    return split_sizes(config.task)["train"]


def classifier(config: RunConfig, classes: int) -> nn.Module:
    """The run's body (models.build_model) with a linear head over `classes`, initialised from `config.seed`
    (the body as build() draws it; torch's global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config)
        t = config.task.image_format
        with torch.no_grad():
            features = model.body(torch.zeros(2, t.channels, t.size, t.size)).shape[1]
        model.head = nn.Linear(features, classes)
    return model


def make_sgd(config: RunConfig, params) -> torch.optim.SGD:
    p = config.pretrain
    return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)


def learning_rate(config: RunConfig, step: int) -> float:
    """The rate of SGD step `step`: a function of the config alone (resumes need no scheduler state)."""
    p, total = config.pretrain, config.optim.iterations
    if p.schedule == "cosine":
        return p.lr * (1 + math.cos(math.pi * min(step, total) / total)) / 2
    return p.lr


def initial_classifier(config: RunConfig) -> tuple[dict[str, nn.Parameter], torch.optim.Optimizer]:
    """The initial parameters (body and head) and their optimiser: what train.initial_progress starts from."""
    params = dict(classifier(config, train_classes(config)).named_parameters())
    return params, make_sgd(config, list(params.values()))


def body_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in params.items() if not k.startswith("head.")}


def pretrained_body(config: RunConfig) -> dict[str, torch.Tensor]:
    """The body of the pretrain checkpoint `model.init_from`, for an episodic run to start from
    (Meta-Baseline); ConfigError unless it is a pretrain run of this body on images of this format."""
    from platform.checkpoint import CheckpointError, load_checkpoint

    where = f"model.init_from = {config.model.init_from!r}"
    try:
        state = load_checkpoint(config.model.init_from)
    except CheckpointError as e:
        raise ConfigError([f"{where}: {e}"]) from None
    saved = RunConfig.model_validate(state["config"])
    if saved.algorithm != "pretrain":
        raise ConfigError([f"{where}: a checkpoint of algorithm {saved.algorithm!r}; give one of algorithm 'pretrain'"])
    same = [("model", "kind"), ("model", "width"), ("task", "image_size"), ("task", "channels"), ("task", "mean")]
    same.append(("task", "std"))  # the body normalises pixels by them: other values, other features
    problems = [
        f"{where}: trained with {section}.{key} = {getattr(getattr(saved, section), key)!r}, this run has "
        f"{getattr(getattr(config, section), key)!r}"
        for section, key in same
        if getattr(getattr(saved, section), key) != getattr(getattr(config, section), key)
    ]
    if problems:
        raise ConfigError(problems)
    return body_params(state["params"])


def sgd_step(config: RunConfig, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, step: int):
    """One SGD step on (x, y) (`model` may be DDP-wrapped: the gradients are then averaged over the
    workers); returns (loss sum, correct predictions) of the examples."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    optimizer.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.item() * len(y), (logits.argmax(1) == y).sum().item()


# -- the workers (Ray Train) and the driver's channel to them


def on_cpu(value):
    """`value` (a state dict: dicts and lists of tensors and numbers) with its tensors copied to the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [on_cpu(v) for v in value]
    return value


@ray.remote(num_cpus=0)
class Channel:
    """What rank 0 sends the driver (in order: one submitter, one actor), and the driver's stop flag."""

    def __init__(self):
        self.items, self.stopping = [], False

    def put(self, item: dict) -> None:
        self.items.append(item)

    def take(self) -> list[dict]:
        items, self.items = self.items, []
        return items

    def stop(self) -> None:
        self.stopping = True

    def stop_requested(self) -> bool:
        return self.stopping


def worker_loop(loop_config: dict) -> None:
    """One Ray Train worker: SGD steps from the start state until optim.iterations or a stop."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config, channel, start = (
        RunConfig.model_validate(loop_config["config"]),
        loop_config["channel"],
        loop_config["start"],
    )
    torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))
    device = ray.train.torch.get_device()
    data = training_images(config)
    model = classifier(config, data.classes)
    model.load_state_dict(start["params"])
    model.to(device)
    optimizer = make_sgd(config, model.parameters())
    optimizer.load_state_dict(start["optimizer"])
    parallel = DistributedDataParallel(model)
    step, o = start["iteration"], config.optim
    while step < o.iterations:
        began = time.perf_counter()
        x, y = shard(config, data, step, rank, world)
        with drawing_masks(model, mask_seed(config.seed, step, rank), device):  # model.dropblock's, if any
            loss, correct = sgd_step(config, parallel, optimizer, x.to(device), y.to(device), step)
        step += 1
        stop = rank == 0 and ray.get(channel.stop_requested.remote())
        totals = torch.tensor([loss, correct, len(y), float(stop)], dtype=torch.float64)
        dist.all_reduce(totals)  # one collective: the step's statistics over all ranks and the stop flag
        stopping = bool(totals[3])
        if rank != 0:
            if stopping:
                return
            continue
        item = {
            "iteration": step,
            "loss": totals[0].item() / totals[2].item(),
            "accuracy": totals[1].item() / totals[2].item(),
        }
        item |= {"examples": int(totals[2].item()), "seconds": time.perf_counter() - began}
        if config.eval.every and (step % config.eval.every == 0 or step == o.iterations) and not stopping:
            params = body_params(dict(model.named_parameters()))
            item["val"] = meta_test(config, {k: v.cpu() for k, v in params.items()}, "val", config.eval.tasks, 0)
        if step % config.checkpoint.every == 0 or step == o.iterations or stopping:
            item["state"] = {
                "params": on_cpu(dict(model.named_parameters())),
                "optimizer": on_cpu(optimizer.state_dict()),  # the driver may have no GPU
            }
        channel.put.remote(item)
        if stopping:
            return


def trainer(config: RunConfig, progress: Progress, channel, storage: str):
    """The TorchTrainer of the run, starting from `progress` (its parameters and optimiser state)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    r = config.resources
    start = {
        "iteration": progress.iteration,
        "params": {k: v.detach().clone() for k, v in progress.params.items()},
        "optimizer": progress.optimizer.state_dict(),
    }
    resources = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})
    return TorchTrainer(
        worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "channel": channel, "start": start},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"pretrain-{progress.run_key}", storage_path=storage, failure_config=ray.train.FailureConfig(0)
        ),
    )


# -- the driver


@dataclass
class _Gang:
    """What train.finish reads of a pool: the Ray Train worker group's failures and restarts."""

    failures: int = 0
    restarts: int = 0


def lost_workers(error: Exception) -> bool:
    """Whether Ray Train failed because workers were lost (a dead process or node: Ray's own errors, such
    as a failed health check), not because our code raised in one (a bug, shown in full)."""
    from ray.train import WorkerGroupError

    if not isinstance(error, WorkerGroupError):
        return True  # the controller or the cluster, not a worker's code
    return any(type(e).__module__.startswith("ray.") for e in error.worker_failures.values())


def describe(error: Exception) -> str:
    """One line: what the failed workers reported; for lost workers only Ray's errors (the others then
    report only that their collective's peer went away)."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return first_line(error)
    ours = {rank: e for rank, e in failures.items() if type(e).__module__.startswith("ray.")} or failures
    return "; ".join(f"worker {rank}: {first_line(e)}" for rank, e in sorted(ours.items()))


def progress_line(config: RunConfig, item: dict, window: list[dict], examples: int) -> str:
    rate = sum(w["examples"] for w in window) / sum(w["seconds"] for w in window)
    epoch = item["iteration"] * config.pretrain.batch_size / examples
    eta = (config.optim.iterations - item["iteration"]) * config.pretrain.batch_size / rate
    return (
        f"iter {item['iteration']:>6}/{config.optim.iterations}  epoch {epoch:6.2f}  loss {item['loss']:.4f}"
        f"  acc {item['accuracy']:.3f}  {rate:7.1f} images/s  eta {duration(eta)}"
    )


def record_of(item: dict, train_s: float, workers: int) -> IterationRecord:
    """A step as the observers read an iteration (tasks: the step's images)."""
    return IterationRecord(
        iteration=item["iteration"], train_s=train_s, loss=item["loss"], accuracy=item["accuracy"],
        tasks=item["examples"], seconds=item["seconds"], actor_compute=item["seconds"], transfer=0.0,
        outer_update=0.0, bytes_out=0, bytes_back=0, workers_alive=workers, worker_failures=0,
        worker_restarts=0, val=item.get("val"), shard_compute=(item["seconds"],),
    )  # fmt: skip


class Relay:
    """The driver's side: rank 0's items -> observers, console, checkpoints; kept in `progress`."""

    def __init__(self, config: RunConfig, progress: Progress, watch: Observers, checkpoint, examples: int):
        self.config, self.progress, self.watch, self.checkpoint, self.examples = (
            config,
            progress,
            watch,
            checkpoint,
            examples,
        )
        self.window, self.pending = [], []  # since the last log line; history not yet in a checkpoint
        self.train_s = progress.history[-1]["train_s"] if progress.history else 0.0

    def receive(self, item: dict) -> None:
        c, iteration = self.config, item["iteration"]
        self.train_s += item["seconds"]
        record = record_of(item, self.train_s, c.resources.workers)
        self.window.append(item)
        last = iteration == c.optim.iterations
        logged = iteration % c.log_every == 0 or last
        if logged:
            print(progress_line(c, item, self.window, self.examples), flush=True)
        self.watch.on_iteration(record)
        if record.val is not None:
            print(f"meta-validation at {iteration}: {format_eval(record.val, True)}", flush=True)
            self.watch.on_validation(record)
        self.pending.append(history_entry(record, None))
        if logged:
            self.window = []
        if "state" in item:
            self._keep(item)
            if iteration % c.checkpoint.every == 0 and not last:
                self.checkpoint()

    def _keep(self, item: dict) -> None:
        """The state rank 0 sent becomes the progress: what the next checkpoint holds."""
        p = self.progress
        with torch.no_grad():
            for k, v in item["state"]["params"].items():
                p.params[k].copy_(v)
        p.optimizer.load_state_dict(item["state"]["optimizer"])
        p.iteration = item["iteration"]
        p.history += self.pending
        self.pending = []


def fit(trainer, channel, relay: Relay, stop: StopRequest) -> Exception | None:
    """trainer.fit(), relaying what rank 0 sends until it returns; the error it raised, if any. It runs in a
    thread: the main thread relays and takes the signals (a stop is passed on to rank 0)."""
    errors = []

    def run():
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - the caller decides: lost workers or a bug
            errors.append(e)

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while True:
        done = not thread.is_alive()  # read first: what arrives before the end is still taken below
        for item in ray.get(channel.take.remote()):
            relay.receive(item)
        if done:
            return errors[0] if errors else None
        if stop.signal:
            channel.stop.remote()
        time.sleep(POLL_S)


def pretrain(config: RunConfig, watch: Observers, store, start: dict | None, run_key: str | None) -> dict:
    """train() for algorithm pretrain: the same checkpoints, observers, stops and final state."""
    from platform.checkpoint import CheckpointWriter

    progress = initial_progress(config, store, start, run_key)
    writer = CheckpointWriter(store, report=warn, on_written=watch.on_checkpoint_written)
    checkpoint = checkpointer(config, progress, watch, writer)
    r = config.resources
    examples = len(training_images(config))  # builds this node's image cache before the workers read it
    if examples < config.pretrain.batch_size:
        writer.close()
        raise ConfigError(
            [f"pretrain.batch_size = {config.pretrain.batch_size}: more than the {examples} images of the train split"]
        )
    connect_ray(r.workers * r.cpus_per_worker)
    print(
        f"execution: Ray Train, {r.workers} DDP worker(s); {examples} training images of "
        f"{train_classes(config)} classes, {examples // config.pretrain.batch_size} steps per epoch"
    )
    stop, failure, channel, gang = StopRequest(), None, Channel.remote(), _Gang()
    try:
        context = {"run_key": progress.run_key, "resumed_from": progress.resumed_from, "branched": progress.branched}
        context |= {"workers": r.workers, "device": "cuda" if r.gpus_per_worker else "cpu", "ray_address": ""}
        watch.on_start(config, context, progress.observers)
        relay = Relay(config, progress, watch, checkpoint, examples)
        with tempfile.TemporaryDirectory(prefix="metaplatform-ray-train-") as storage:
            while (error := fit(trainer(config, progress, channel, storage), channel, relay, stop)) is not None:
                if not lost_workers(error):
                    raise error
                gang.failures += 1
                if stop.signal or gang.failures > r.max_worker_failures:
                    failure = f"Ray Train lost its workers ({gang.failures} time(s)): {describe(error)}"
                    break
                gang.restarts += 1
                warn(
                    f"Ray Train lost a worker ({describe(error)}); restarting its {r.workers} workers from "
                    f"iteration {progress.iteration} (failure {gang.failures} of at most {r.max_worker_failures})"
                )
                relay.pending = []  # the steps after that state are done again
    except BaseException:
        checkpoint_after_a_bug(checkpoint, watch)
        raise
    finally:
        ray.kill(channel)
    return finish(config, progress, store, writer, watch, checkpoint, stop, failure, None, gang)
