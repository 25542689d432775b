"""Meta-test results: adapt to held-out tasks and summarise, shared by training (meta-validation),
`platform.evaluate` and the benchmarks."""

from __future__ import annotations

import numpy as np

from platform.config import EMBEDDING_ALGORITHMS, ConfigError, RunConfig, with_values
from platform.engine import EVAL_METRICS, AdaptationWorker, flatten
from platform.tasks import evaluation_seeds


def summarize(rows: np.ndarray, classification: bool) -> dict:
    """Means and 95% confidence half-widths over tasks of EVAL_METRICS rows."""
    key = "accuracy" if classification else "loss"
    col = rows[:, EVAL_METRICS.index(key)]
    out = {k: float(np.mean(rows[:, i])) for i, k in enumerate(EVAL_METRICS) if not np.isnan(rows[:, i]).all()}
    out[f"{key}_ci95"] = float(1.96 * np.std(col, ddof=1) / np.sqrt(len(col))) if len(col) > 1 else float("nan")
    out["tasks"] = len(rows)
    return out


def format_eval(result: dict, classification: bool) -> str:
    if classification:
        return f"accuracy {result['accuracy']:.4f} ± {result['accuracy_ci95']:.4f}"
    return f"mse {result['loss']:.4f} ± {result['loss_ci95']:.4f} (before adaptation {result['loss_before']:.4f})"


def meta_test(config: RunConfig, params: dict, split: str, tasks: int, steps: int) -> dict:
    """Meta-test `params` in this process on `tasks` fixed tasks of `split`, after `steps` inner steps."""
    worker = AdaptationWorker(config.model_dump(mode="json"))
    rows = worker.evaluate(flatten(params), split, steps, evaluation_seeds(tasks))
    return summarize(rows, config.classification)


def test_time_config(
    config: RunConfig, ways: int | None, shots: int | None, query: int | None
) -> tuple[RunConfig, str]:
    """The run's config with the test-time task settings, and their name when they differ from the
    run's ("20w1s15q": what the MLflow metrics of this evaluation are prefixed with), else ""."""
    values = {f"task.{k}": v for k, v in {"ways": ways, "shots": shots, "query": query}.items() if v is not None}
    if not values:
        return config, ""
    if ways is not None and ways != config.task.ways and config.algorithm not in EMBEDDING_ALGORITHMS:
        head = f"a {config.algorithm} model's classifier head has {config.task.ways} outputs"
        only = " and ".join(EMBEDDING_ALGORITHMS)
        raise ConfigError([f"--ways {ways}: {head} (trained {config.task.ways}-way); only {only} evaluate other ways"])
    tested = with_values(config, values, "test-time settings")
    t, run = tested.task, config.task
    if (t.ways, t.shots, t.query) == (run.ways, run.shots, run.query):
        return tested, ""
    return tested, f"{t.ways}w{t.shots}s{t.query}q" if tested.classification else f"k{t.shots}q{t.query}"
