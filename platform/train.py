"""Meta-train: `python -m platform.train [--config FILE] [--resume] [key=value ...]`.

This process is the Ray driver. Every meta-iteration it draws the iteration's task seeds, has the
adaptation actors compute the summed outer gradients of fixed-size chunks of them, sums the chunks
in order, and applies the outer optimiser. Checkpoints hold everything needed to continue exactly.
"""

from __future__ import annotations

import signal
import sys
import threading
import uuid
from dataclasses import dataclass, field, replace

import torch
from ray.exceptions import RayError, RayTaskError

from platform.algorithms import build
from platform.checkpoint import CheckpointError, CheckpointStore, CheckpointWriter
from platform.cli import config_parser, first_line, run, warn
from platform.config import ConfigError, RunConfig, load_config
from platform.data import DataError
from platform.driver import IterationRecord, make_optimizer, meta_step, meta_validate, window_rates, with_absolute_data
from platform.engine import WorkerFailureError, WorkerPool, WorkerStartError
from platform.local import execution
from platform.metatest import format_eval
from platform.observers import Observer, Observers, StopTraining

INTERRUPTED = 130


class RunEnded(Exception):
    """train() ended before `optim.iterations`; the message says why and how to go on."""

    def __init__(self, message: str, iteration: int, checkpoint: str | None):
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


class RunFailed(RunEnded):
    """The cluster, the workers or the checkpoint storage failed; resumable from `checkpoint` if any."""


class RunInterrupted(RunEnded):
    """Ctrl-C or SIGTERM: the current iteration was finished and checkpointed."""


class RunStopped(RunEnded):
    """An observer stopped the run (Ray Tune's scheduler); checkpointed, not a failure."""


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


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
    """Settings that must not change between a checkpoint and the run resuming from it (compared as
    stored: with URL passwords redacted)."""
    now = config.redacted()
    conflicts = []
    sections = ("seed", "task", "model", "algorithm", "optim") + (
        ("pretrain",) if config.algorithm == "pretrain" else ()
    )
    for section in sections:
        before, after = saved.get(section), now[section]
        if isinstance(after, dict):
            keys = [k for k in after if (section, k) != ("optim", "iterations")]
            pairs = [(f"{section}.{k}", before.get(k), after[k]) for k in keys]
        else:
            pairs = [(section, before, after)]
        conflicts += [f"{key} = {a!r}: the checkpoint was trained with {b!r}" for key, b, a in pairs if a != b]
    workers = saved.get("resources", {}).get("workers")
    if config.algorithm == "pretrain" and workers != config.resources.workers:
        conflicts.append(
            f"resources.workers = {config.resources.workers}: the checkpoint was trained with {workers}, and each "
            "Ray Train worker normalises its share of a batch by its own BatchNorm statistics (platform/pretrain.py)"
        )
    elif config.optim.chunk == "auto" and workers != config.resources.workers:
        conflicts.append(
            f"resources.workers = {config.resources.workers}: the checkpoint was trained with {workers}, and with "
            "optim.chunk auto the configured workers set the gradient chunks (fewer live workers are fine: "
            "resources.min_workers)"
        )
    return conflicts


def default_observers(config: RunConfig) -> list[Observer]:
    """What watches a run per its `tracking` section: MLflow, Prometheus."""
    # Imported here, each when asked for: MLflow and the Prometheus client are slow to import.
    observers: list[Observer] = []
    if config.tracking.mlflow:
        from platform.tracking import MlflowTracker

        observers.append(MlflowTracker(report=warn))
    if config.tracking.prometheus_port:
        from platform.metrics import PrometheusExporter

        observers.append(PrometheusExporter(config.tracking.prometheus_port))
    return observers


@dataclass
class Progress:
    """What a checkpoint holds of a run, besides its config: enough to continue it exactly."""

    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    run_key: str
    iteration: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    branched: bool = False  # continued from another run's checkpoint (PBT): its curve branches there
    observers: dict = field(default_factory=dict)  # what the observers saved in that checkpoint

    def state(self, config: RunConfig, observers: dict) -> dict:
        return {
            "iteration": self.iteration,
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "config": config.redacted(),  # read by others (evaluate, shared buckets): no URL passwords
            "history": self.history,
            "run_key": self.run_key,
            "observers": observers,
            # No RNG state: every random draw is a function of (seed, iteration), see tasks.py.
        }


def initial_model(config: RunConfig) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    """The initial parameters (from `config.seed`; the body from `model.init_from` when given) and their
    optimiser, before any resume."""
    if config.algorithm == "pretrain":
        from platform.pretrain import initial_classifier

        return initial_classifier(config)
    _, _, initial = build(config)
    if config.model.init_from:
        from platform.pretrain import pretrained_body

        initial |= pretrained_body(config)
    params = {k: torch.nn.Parameter(v) for k, v in initial.items()}
    return params, make_optimizer(config, list(params.values()))


def initial_progress(config: RunConfig, store: CheckpointStore, start: dict | None, run_key: str | None) -> Progress:
    """A new run, or the one in `start` (a Tune trial's restore), or per `checkpoint.resume` the newest
    intact checkpoint in `store`."""
    params, optimizer = initial_model(config)
    state, saved = start, {}
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
    run_key = run_key or uuid.uuid4().hex  # names this run across resumes (MLflow tag, Prometheus label)
    progress = Progress(params, optimizer, run_key, observers=saved)
    if state is not None:
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        progress.iteration = progress.resumed_from = state["iteration"]
        progress.history = state["history"]
        progress.branched = state.get("run_key") != run_key
    return progress


def history_entry(record: IterationRecord, window: list[IterationRecord] | None) -> dict:
    """What the checkpoint's history keeps of an iteration; the rates over `window` at a log line."""
    entry = {"iteration": record.iteration, "train_s": record.train_s, "loss": record.loss, "accuracy": record.accuracy}
    if window:
        entry["tasks_per_s"], entry["driver_share"] = window_rates(window)
    if record.val is not None:
        entry["val"] = record.val
    return entry


def progress_line(config: RunConfig, record: IterationRecord, window: list[IterationRecord]) -> str:
    rate, driver = window_rates(window)
    eta = (config.optim.iterations - record.iteration) * config.optim.meta_batch / rate
    acc = f"  acc {record.accuracy:.3f}" if config.classification else ""
    return (
        f"iter {record.iteration:>6}/{config.optim.iterations}  loss {record.loss:.4f}{acc}  {rate:7.1f} tasks/s"
        f"  driver {driver:5.1%}  eta {duration(eta)}"
    )


def train_loop(config: RunConfig, progress: Progress, pool: WorkerPool, watch: Observers, checkpoint, stop) -> None:
    """Meta-iterations until `optim.iterations` or a stop: step, observe, validate, checkpoint."""
    o, window = config.optim, []
    train_s = progress.history[-1]["train_s"] if progress.history else 0.0
    while progress.iteration < o.iterations and not stop.signal:
        record = meta_step(config, progress.params, progress.optimizer, pool, progress.iteration, train_s)
        progress.iteration, train_s = record.iteration, record.train_s
        window.append(record)
        last = record.iteration == o.iterations
        logged = record.iteration % config.log_every == 0 or last
        if logged:
            print(progress_line(config, record, window), flush=True)
        watch.on_iteration(record)
        if config.eval.every and (record.iteration % config.eval.every == 0 or last):
            val = meta_validate(pool, config, progress.params, cancel=lambda: stop.signal is not None)
            if val is not None:
                print(f"meta-validation at {record.iteration}: {format_eval(val, config.classification)}", flush=True)
                record = replace(record, val=val)
                watch.on_validation(record)
        progress.history.append(history_entry(record, window if logged else None))
        if logged:
            window = []
        if record.iteration % config.checkpoint.every == 0 and not last:
            checkpoint()


def train(
    config: RunConfig,
    observers: list[Observer] | None = None,
    *,
    start: dict | None = None,
    run_key: str | None = None,
) -> dict:
    """Meta-train per `config`, watched by `observers` (default: per `config.tracking`); returns the
    final checkpoint state. Raises RunFailed, RunInterrupted or RunStopped when the run ends early
    (after checkpointing what it did).

    `start` is a checkpoint state to continue from instead of `--resume`'s: Ray Tune restoring a
    trial, under PBT from another trial's checkpoint, so the hyperparameters are this config's.
    `run_key` names the run for the observers (default: the resumed checkpoint's, else a new one).
    """
    watch = Observers(default_observers(config) if observers is None else observers)
    store = CheckpointStore(config.checkpoint.dir, keep=config.checkpoint.keep)
    with store.exclusive():  # one run writes a folder at a time
        if config.algorithm == "pretrain":
            from platform.pretrain import pretrain  # imported here: Ray Train is slow to import

            return pretrain(config, watch, store, start, run_key)
        return _train(config, watch, store, start, run_key)


def checkpointer(config: RunConfig, progress: Progress, watch: Observers, writer: CheckpointWriter):
    """`checkpoint(final=False) -> location`: queue a checkpoint of the current state; a final one is
    waited for (bounded)."""

    def checkpoint(final: bool = False) -> str:
        # An observer that has not started (no workers yet) keeps what it saved in the resumed checkpoint.
        observers = progress.observers | {k: v for k, v in watch.state().items() if v}
        where = writer.submit(progress.state(config, observers), progress.iteration)
        wait = lambda: writer.flush(config.checkpoint.write_timeout_s)
        if final:
            wait()
        watch.on_checkpoint(where, progress.iteration, wait)
        return where

    return checkpoint


def _train(
    config: RunConfig, watch: Observers, store: CheckpointStore, start: dict | None, run_key: str | None
) -> dict:
    progress = initial_progress(config, store, start, run_key)
    writer = CheckpointWriter(store, report=warn, on_written=watch.on_checkpoint_written)
    checkpoint = checkpointer(config, progress, watch, writer)
    pool_type = execution(config)  # in-process or Ray actors, said in one line; Ray joined or started here
    stop = StopRequest()
    pool, failure, stopped = None, None, None
    try:
        pool = pool_type(config)
        print(pool.summary)
        context = {
            "run_key": progress.run_key,
            "resumed_from": progress.resumed_from,
            "branched": progress.branched,
            "workers": len(pool.live),
            "device": pool.infos[0].device,
            "ray_address": pool.address,
        }
        watch.on_start(config, context, progress.observers)
        train_loop(config, progress, pool, watch, checkpoint, stop)
    except DataError as e:  # an actor's node cannot load the task data
        if progress.iteration != (progress.resumed_from or 0):
            failure = str(e)  # mid-run (a replacement actor's node): the progress is kept
        else:  # nothing trained, nothing to keep: a usage error, said in one line
            writer.close()
            stop.restore()
            raise
    except (WorkerStartError, WorkerFailureError) as e:
        failure = str(e)
    except RayError as e:
        if isinstance(e, RayTaskError):  # our own code failed inside an actor: a bug, shown in full
            checkpoint_after_a_bug(checkpoint, watch)
            raise
        failure = f"the Ray cluster failed: {first_line(e)}"
    except StopTraining as e:  # Ray Tune's scheduler: a stop like Ctrl-C, checkpointed and observed
        stopped = e
    except BaseException:
        checkpoint_after_a_bug(checkpoint, watch)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    return finish(config, progress, store, writer, watch, checkpoint, stop, failure, stopped, pool)


def finish(config, progress, store, writer, watch, checkpoint, stop, failure, stopped, pool) -> dict:
    """The final checkpoint and the observers' end; the final state, or the RunEnded saying why not."""
    status = "FAILED" if failure else "KILLED" if stop.signal or stopped else "FINISHED"
    iteration = progress.iteration
    try:
        if iteration == progress.resumed_from and iteration in store.iterations():
            where = store.uri(iteration)  # nothing trained since the resume: that checkpoint is the final one
        else:
            where = checkpoint(final=True)
    except CheckpointError as e:
        watch.on_end("FAILED", None)
        raise RunFailed(f"the final checkpoint could not be written: {e}", iteration, None) from None
    finally:
        writer.close()
        stop.restore()
    final = store.load(iteration)
    watch.on_end(status, {"location": where, "state": final})
    if failure:
        raise RunFailed(
            f"{failure}\nstopped after iteration {iteration}; checkpoint {where}; resume with --resume",
            iteration,
            where,
        )
    if stopped is not None:
        raise RunStopped(
            f"stopped by Ray Tune's scheduler after iteration {iteration}; checkpoint {where}", iteration, where
        )
    if stop.signal:
        raise RunInterrupted(
            f"{stop.signal}: stopped after iteration {iteration}; checkpoint {where}\n"
            f"resume with the same command plus --resume (or checkpoint.resume=true)",
            iteration,
            where,
        )
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


def refuse_another_runs_folder(config: RunConfig) -> None:
    """A new run never writes over another run's checkpoints (same numbers, pruned by number)."""
    latest = CheckpointStore(config.checkpoint.dir).latest()
    if latest is not None:
        problem = (
            f"checkpoint.dir = {config.checkpoint.dir!r}: holds another run's checkpoints (the newest at "
            f"iteration {latest}); continue that run with --resume, or give this one another checkpoint.dir"
        )
        raise ConfigError([problem])


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("Meta-train a model over a distribution of tasks on Ray actors.")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint (checkpoint.resume=true)"
    )
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    config = load_config(args.config, args.overrides + (["checkpoint.resume=true"] if args.resume else []))
    config = with_absolute_data(config)
    print("resolved config:\n" + config.to_yaml(), flush=True)
    if not config.checkpoint.resume:
        refuse_another_runs_folder(config)
    try:
        train(config)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    # The main of the module `platform.train`, not of this `__main__` copy: platform.pretrain raises that
    # module's RunEnded classes, which this copy's `except` clauses would not know.
    from platform.train import main as module_main

    run(module_main)
