"""What watches a training run: one small interface that MLflow, Prometheus and Ray Tune implement.

The training loop (platform.train) calls, in order:

    on_start(config, context, saved)   once; `context`: run facts (workers, device, Ray address,
                                       resumed_from, branched: continued from another run's
                                       checkpoint); `saved`: what state() returned when the
                                       checkpoint being resumed from was written ({} otherwise)
    on_iteration(record)               after every meta-iteration: a platform.driver.IterationRecord
    on_validation(record)              after a meta-validation; record.val holds its summary
    on_checkpoint(location, iteration, written)
                                       a checkpoint was queued; `written()` blocks until it is on
                                       storage and returns its location (or raises CheckpointError)
    on_checkpoint_written(location, iteration)
                                       that checkpoint is on storage and verified (called from the
                                       checkpoint writer's thread; never for one superseded or
                                       never written): what names a checkpoint waits for this
    on_end(status, final)              once: status "FINISHED", "FAILED" or "KILLED"; `final` holds
                                       the final checkpoint's location and state (None if none)

and `state()` each time it writes a checkpoint, so an observer resumes where it was (the MLflow
run id, for instance). Observers must not change the training: nothing they do reaches the
parameters. One may end it: raising StopTraining stops the run like a Ctrl-C (checkpointed,
status KILLED), and train() then raises RunStopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from platform.config import RunConfig

if TYPE_CHECKING:  # the driver imports the engine and Ray; observers need only the record's type
    from platform.driver import IterationRecord


class StopTraining(Exception):
    """Raised by an observer (Ray Tune's reporter, when the scheduler stops the trial) to end the run."""


class Observer:
    """Does nothing; subclasses override what they need. `name` keys its state in checkpoints."""

    name = "observer"

    def on_start(self, config: RunConfig, context: dict, saved: dict) -> None:
        pass

    def on_iteration(self, record: IterationRecord) -> None:
        pass

    def on_validation(self, record: IterationRecord) -> None:
        pass

    def on_checkpoint(self, location: str, iteration: int, written: Callable[[], str]) -> None:
        pass

    def on_checkpoint_written(self, location: str, iteration: int) -> None:
        pass

    def on_end(self, status: str, final: dict | None) -> None:
        pass

    def state(self) -> dict:
        return {}


class Observers(Observer):
    """Several observers as one, called in order."""

    def __init__(self, observers: list[Observer]):
        self.observers = observers

    def on_start(self, config, context, saved):
        for o in self.observers:
            o.on_start(config, context, saved.get(o.name, {}))

    def on_iteration(self, record):
        for o in self.observers:
            o.on_iteration(record)

    def on_validation(self, record):
        for o in self.observers:
            o.on_validation(record)

    def on_checkpoint(self, location, iteration, written):
        for o in self.observers:
            o.on_checkpoint(location, iteration, written)

    def on_checkpoint_written(self, location, iteration):
        for o in self.observers:
            o.on_checkpoint_written(location, iteration)

    def on_end(self, status, final):
        for o in self.observers:
            o.on_end(status, final)

    def state(self) -> dict:
        return {o.name: o.state() for o in self.observers}
