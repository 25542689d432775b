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
import threading
import time
import uuid

import numpy as np
import ray
import torch
from ray.exceptions import RayError, RayTaskError

from platform.algorithms import build
from platform.checkpoint import CheckpointError, CheckpointStore, CheckpointWriter
from platform.cli import config_parser, run, warn
from platform.config import ConfigError, RunConfig, load_config
from platform.engine import (
    GRAD_METRICS,
    WorkerFailureError,
    WorkerPool,
    WorkerStartError,
    chunked,
    flatten,
)
from platform.metatest import format_eval, summarize
from platform.observers import Observer, Observers
from platform.tasks import evaluation_seeds, iteration_seeds

INTERRUPTED = 130


def connect_ray(cpus_needed: float) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a private local instance
    with at least `cpus_needed` logical CPUs (so the actors' reservations always fit)."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "configure_logging": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(
            address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), include_dashboard=False, **quiet
        )


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


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
        self.signal, self._previous = None, {}
        if threading.current_thread() is not threading.main_thread():
            return  # a Ray Tune trial runs train() in a thread: Tune stops it, not signals
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers from before the run: train() may be one step of a longer program (a benchmark
        that meta-tests afterwards), whose Ctrl-C must not be swallowed."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)


def resume_conflicts(saved: dict, config: RunConfig) -> list[str]:
    """Settings that must not change between a checkpoint and the run resuming from it."""
    now = config.model_dump(mode="json")
    conflicts = []
    for section in ("seed", "task", "model", "algorithm", "optim"):
        before, after = saved.get(section), now[section]
        if isinstance(after, dict):
            keys = [k for k in after if (section, k) != ("optim", "iterations")]
            pairs = [(f"{section}.{k}", before.get(k), after[k]) for k in keys]
        else:
            pairs = [(section, before, after)]
        conflicts += [f"{key} = {a!r}: the checkpoint was trained with {b!r}" for key, b, a in pairs if a != b]
    return conflicts


def set_outer_lr(optimizer, scheduler, config: RunConfig, iteration: int) -> None:
    """Make a restored optimizer follow `config`'s lambda from `iteration` on (PBT may have changed it)."""
    o = config.optim
    lr = o.outer_lr * (1 + math.cos(math.pi * iteration / o.iterations)) / 2 if o.schedule == "cosine" else o.outer_lr
    scheduler.base_lrs = [o.outer_lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["lr"], group["initial_lr"] = lr, o.outer_lr


def apply_meta_gradient(params: dict, rows: np.ndarray, config: RunConfig, optimizer, scheduler) -> None:
    """Sum the chunk rows in chunk order, average over the meta-batch, clip, step."""
    grad = torch.from_numpy(rows[:, : -len(GRAD_METRICS)].sum(axis=0) / config.optim.meta_batch)
    start = 0
    for p in params.values():
        p.grad = grad[start : start + p.numel()].view_as(p).clone()
        start += p.numel()
    if config.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.optim.grad_clip)
    optimizer.step()
    scheduler.step()


HISTORY_KEYS = ("iteration", "train_s", "loss", "accuracy", "tasks_per_s", "driver_share", "val")


def default_observers(config: RunConfig) -> list[Observer]:
    """What watches a run per its `tracking` section: MLflow, Prometheus."""
    from platform.metrics import PrometheusExporter
    from platform.tracking import MlflowTracker

    observers: list[Observer] = []
    if config.tracking.mlflow:
        observers.append(MlflowTracker(report=warn))
    if config.tracking.prometheus_port:
        observers.append(PrometheusExporter(config.tracking.prometheus_port))
    return observers


def train(
    config: RunConfig,
    observers: list[Observer] | None = None,
    *,
    start: dict | None = None,
    run_key: str | None = None,
) -> dict:
    """Meta-train per `config`, watched by `observers` (default: per `config.tracking`); returns the
    final checkpoint state.

    `start` is a checkpoint state to continue from instead of `--resume`'s: Ray Tune restoring a
    trial, under PBT from another trial's checkpoint, so the hyperparameters are this config's.
    `run_key` names the run for the observers (default: the resumed checkpoint's, else a new one).
    """
    o = config.optim
    watch = Observers(default_observers(config) if observers is None else observers)
    store = CheckpointStore(config.checkpoint.dir, keep=config.checkpoint.keep)
    _, _, initial = build(config)
    params = {k: torch.nn.Parameter(v) for k, v in initial.items()}
    optimizer, scheduler = make_optimizer(config, list(params.values()))
    iteration, history, saved, resumed_from, state = 0, [], {}, None, start
    if start is None and config.checkpoint.resume:
        if store.latest() is None:
            print(f"no checkpoint in {config.checkpoint.dir}: starting from iteration 0")
        else:
            state = store.load()  # the newest intact one
            conflicts = resume_conflicts(state["config"], config)
            if conflicts:
                raise ConfigError([f"--resume from {store.location}: {c}" for c in conflicts])
            run_key, saved = run_key or state.get("run_key"), state.get("observers", {})
            print(f"resumed from {config.checkpoint.dir} at iteration {state['iteration']}")
    if state is not None:
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        iteration, history, resumed_from = state["iteration"], state["history"], state["iteration"]
        if start is not None:
            set_outer_lr(optimizer, scheduler, config, iteration)
    run_key = run_key or uuid.uuid4().hex  # names this run across resumes (MLflow tag, Prometheus label)
    # Continued from another run's checkpoint (PBT): its curve branches off that run's at resumed_from.
    branched = state is not None and state.get("run_key") != run_key

    writer = CheckpointWriter(store, report=warn)

    def checkpoint(final: bool = False) -> str:
        """Queue a checkpoint of the current state; a final one is waited for (bounded)."""
        state = {
            "iteration": iteration,
            "params": {k: v.detach().clone() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": config.model_dump(mode="json"),
            "history": history,
            "run_key": run_key,
            "observers": watch.state(),
            # No RNG state: every random draw is a function of (seed, iteration), see tasks.py.
        }
        where = writer.submit(state, iteration)
        if final:
            writer.flush(config.checkpoint.write_timeout_s)
        watch.on_checkpoint(where, iteration, lambda: writer.flush(config.checkpoint.write_timeout_s))
        return where

    connect_ray(config.resources.workers * config.resources.cpus_per_worker)
    stop = StopRequest()
    pool, failure, tune_stop = None, None, None
    try:
        pool = WorkerPool(config)
        print(
            f"{len(pool.live)} workers: "
            + ", ".join(f"pid {i['pid']} ({i['device']} on node {i['node'][:8]})" for i in pool.infos)
        )
        context = {
            "run_key": run_key,
            "resumed_from": resumed_from,
            "branched": branched,
            "workers": len(pool.live),
            "device": pool.infos[0]["device"],
            "ray_address": ray.get_runtime_context().gcs_address,
        }
        watch.on_start(config, context, saved)
        window_start, window_tasks, window_driver = time.perf_counter(), 0, 0.0
        # Training wall time so far, without meta-validation: what time-to-accuracy is measured in.
        train_seconds = history[-1]["train_s"] if history else 0.0
        while iteration < o.iterations and not stop.signal:
            t0 = time.perf_counter()
            flat = flatten(params)
            flat_ref = ray.put(flat)
            chunks = chunked(iteration_seeds(config.seed, iteration, o.meta_batch), o.chunk)
            t1 = time.perf_counter()
            shards = pool.map("outer_grads", chunks, flat_ref)
            t2 = time.perf_counter()
            rows = np.concatenate(shards)
            apply_meta_gradient(params, rows, config, optimizer, scheduler)
            iteration += 1
            t3 = time.perf_counter()

            # Driver time: everything but the slowest actor's compute (dispatch, transfer, reduce, step).
            metrics = dict(zip(GRAD_METRICS, rows[:, -len(GRAD_METRICS) :].sum(axis=0).tolist()))
            actor_seconds = min(t2 - t1, max(shard[:, -1].sum() for shard in shards))  # GRAD_METRICS ends with seconds
            window_tasks += o.meta_batch
            window_driver += (t3 - t0) - actor_seconds
            train_seconds += t3 - t0
            record = {
                "iteration": iteration,
                "train_s": train_seconds,
                "loss": metrics["loss"] / metrics["tasks"],
                "accuracy": metrics["accuracy"] / metrics["tasks"],
                "seconds": t3 - t0,
                "tasks": o.meta_batch,
                "phases": {
                    "actor_compute": actor_seconds,
                    "transfer": (t2 - t0) - actor_seconds,
                    "outer_update": t3 - t2,
                },
                "gradient_bytes": rows.nbytes + flat.nbytes * len(shards),
                "workers": {"alive": len(pool.live), "failures": pool.failures, "restarts": pool.restarts},
            }
            if iteration % config.log_every == 0 or iteration == o.iterations:
                elapsed = time.perf_counter() - window_start
                rate = window_tasks / elapsed
                eta = (o.iterations - iteration) * o.meta_batch / rate
                acc = f"  acc {record['accuracy']:.3f}" if config.classification else ""
                print(
                    f"iter {iteration:>6}/{o.iterations}  loss {record['loss']:.4f}{acc}  {rate:7.1f} tasks/s"
                    f"  driver {window_driver / elapsed:5.1%}  eta {duration(eta)}",
                    flush=True,
                )
                record |= {"tasks_per_s": rate, "driver_share": window_driver / elapsed}
                window_start, window_tasks, window_driver = time.perf_counter(), 0, 0.0
            watch.on_iteration(record)
            if config.eval.every and (iteration % config.eval.every == 0 or iteration == o.iterations):
                eval_start = time.perf_counter()
                record["val"] = meta_validate(pool, config, ray.put(flatten(params)))
                print(
                    f"meta-validation at {iteration}: {format_eval(record['val'], config.classification)}", flush=True
                )
                watch.on_validation(record)
                window_start += time.perf_counter() - eval_start  # keep tasks/s about training
            history.append({k: record[k] for k in HISTORY_KEYS if k in record})
            if iteration % config.checkpoint.every == 0 and iteration < o.iterations:
                checkpoint()
    except (WorkerStartError, WorkerFailureError) as e:
        failure = str(e)
    except RayError as e:
        if isinstance(e, RayTaskError):  # our own code failed inside an actor: a bug, shown in full
            checkpoint_after_a_bug(checkpoint, watch)
            raise
        failure = f"the Ray cluster failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    except SystemExit as e:
        # Ray Tune stops a trial by raising SystemExit from tune.report (platform.tune): a stop like
        # Ctrl-C, so the progress is checkpointed and the observers hear of it.
        tune_stop = e
    except BaseException:
        checkpoint_after_a_bug(checkpoint, watch)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    status = "FAILED" if failure else "KILLED" if stop.signal or tune_stop else "FINISHED"
    try:
        where = checkpoint(final=True)
    except CheckpointError as e:
        watch.on_end("FAILED", None)
        print(f"error: the final checkpoint could not be written: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        writer.close()
        stop.restore()
    final = store.load(iteration)
    watch.on_end(status, {"location": where, "state": final})
    if failure:
        print(
            f"error: {failure}\nstopped after iteration {iteration}; checkpoint {where}; resume with --resume",
            file=sys.stderr,
        )
        sys.exit(1)
    if tune_stop is not None:
        print(f"stopped by Ray Tune's scheduler after iteration {iteration}; checkpoint {where}", flush=True)
        raise tune_stop
    if stop.signal:
        print(
            f"{stop.signal}: stopped after iteration {iteration}; checkpoint {where}\n"
            f"resume with the same command plus --resume (or checkpoint.resume=true)",
            file=sys.stderr,
        )
        sys.exit(INTERRUPTED)
    print(
        f"done: {iteration} iterations, {pool.failures} worker failures, {pool.restarts} restarts; "
        f"final checkpoint {where}"
    )
    return final


def checkpoint_after_a_bug(checkpoint, watch: Observers) -> None:
    """Keep the progress made before an unexpected error, without hiding the error itself."""
    try:
        print(f"unexpected error: checkpoint {checkpoint(final=True)}", file=sys.stderr)
        watch.on_end("FAILED", None)
    except Exception as e:  # noqa: BLE001 - whatever broke the checkpoint, the original error matters more
        print(f"unexpected error, and no checkpoint could be written: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("Meta-train a model over a distribution of tasks on Ray actors.")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint (checkpoint.resume=true)"
    )
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    config = load_config(args.config, args.overrides + (["checkpoint.resume=true"] if args.resume else []))
    print("resolved config:\n" + config.to_yaml(), flush=True)
    train(config)
    return 0


if __name__ == "__main__":
    run(main)
