"""What a sweep searches: spaces over dotted config keys, checked before anything runs, and the
Tune search algorithm and scheduler that draw from them (docs/tuning.md)."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from platform.config import ConfigError, RunConfig, field_annotation, is_key, with_values
from platform.published import BENCHMARKS

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "lograndint", "choice")
# Sensible first searches (docs/tuning.md): around the MAML paper's values.
DEFAULT_SPACES = {
    "sinusoid": {
        "optim.inner_lr": {"loguniform": [0.001, 0.1]},
        "optim.outer_lr": {"loguniform": [0.0001, 0.01]},
        "optim.inner_steps": {"choice": [1, 2, 5]},
    },
    "omniglot": {
        "optim.inner_lr": {"loguniform": [0.05, 1.0]},
        "optim.outer_lr": {"loguniform": [0.0001, 0.003]},
        "optim.inner_steps": {"choice": [1, 3, 5]},
    },
}
DEFAULT_SPACES["folder"] = DEFAULT_SPACES["omniglot"]
for _kind in BENCHMARKS:  # photographs: around MAML's miniImageNet eta 0.01
    DEFAULT_SPACES[_kind] = {**DEFAULT_SPACES["omniglot"], "optim.inner_lr": {"loguniform": [0.001, 0.1]}}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_space(space: Any, base: RunConfig, source: str) -> list[str]:
    """Problems of a search space over `base`, one line each (empty: the space is good).

    Beyond the shape of each entry, every value the space can reach at its extremes (both ends of
    a range, every choice) must make a valid config: a negative learning rate or too many workers
    for the meta-batch is caught here, not in a trial an hour later.
    """
    if not isinstance(space, dict) or not space:
        return [f"{source}: a search space is a non-empty mapping of config keys to distributions"]
    problems = []
    for key, spec in space.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not is_key(key):
            problems.append(f"{where}: not a config key (e.g. optim.inner_lr, optim.outer_lr, optim.inner_steps)")
            continue
        if key.startswith(("checkpoint.", "tracking.")) or key == "seed":
            problems.append(f"{where}: not searchable (it does not change what is learned, or is the sweep's own)")
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            problems.append(f"{where} = {spec!r}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}")
            continue
        ((kind, args),) = spec.items()
        annotation = field_annotation(key)
        numeric = annotation in (int, float) or set(typing.get_args(annotation)) <= {float, int, type(None)}
        integer = annotation is int
        if kind == "choice":
            if not isinstance(args, list) or not args:
                problems.append(f"{where}: choice needs a non-empty list of values, got {args!r}")
                continue
            reach = args
        else:
            if not numeric:
                problems.append(f"{where}: {kind} needs a numeric key; {key} takes {annotation}, use choice")
                continue
            if kind in ("randint", "lograndint") and not integer:
                problems.append(f"{where}: {kind} draws integers; {key} is a float, use uniform or loguniform")
                continue
            if kind in ("uniform", "loguniform") and integer:
                problems.append(f"{where}: {kind} draws floats; {key} is an integer, use randint, lograndint or choice")
                continue
            if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args)):
                problems.append(f"{where}: {kind} needs [low, high] (two numbers), got {args!r}")
                continue
            low, high = args
            if low >= high:
                problems.append(f"{where}: {kind} [{low}, {high}] is an empty range (low must be below high)")
                continue
            if kind.startswith("log") and low <= 0:
                problems.append(f"{where}: {kind} [{low}, {high}] needs low > 0")
                continue
            reach = [low, high - 1] if kind in ("randint", "lograndint") else [low, high]  # randint: high excluded
        for value in reach:
            try:
                with_values(base, {key: value}, source)
            except ConfigError as e:
                problems += [f"{where}: {kind} {args!r} reaches {value!r}, and then {p}" for p in e.problems]
                break
    return problems


def load_space(path: str | None, base: RunConfig) -> dict[str, dict]:
    if path is None:
        space, source = DEFAULT_SPACES[base.task.kind], "default space"
    else:
        try:
            space = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError([f"{path}: cannot read the search space: {e.strerror}"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: YAML syntax error: {e}"]) from None
        source = path
    problems = check_space(space, base, source)
    if problems:
        raise ConfigError(problems)
    return space


def tune_domain(spec: dict):
    ((kind, args),) = spec.items()
    return getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args)


def make_scheduler(name: str, config: RunConfig, space: dict):
    every = config.eval.every
    if name == "asha":
        return ASHAScheduler(
            time_attr="iteration", max_t=config.optim.iterations, grace_period=every, reduction_factor=2
        )
    if name == "pbt":
        return PopulationBasedTraining(
            time_attr="iteration",
            perturbation_interval=every,
            hyperparam_mutations={k: tune_domain(v) for k, v in space.items()},
            quantile_fraction=0.5,
            resample_probability=0.25,
        )
    return FIFOScheduler()


def make_search(name: str, metric: str, mode: str, seed: int):
    if name == "random":  # Tune's default, seeded: the same config draws the same trials
        return BasicVariantGenerator(random_state=seed)
    try:  # imported here: Optuna is an optional extra (OptunaSearch itself imports without it, and fails when used)
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            ["--search optuna: Optuna is not installed; install the extra: pip install 'metaplatform[optuna]'"]
        ) from None
    return OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=seed))
