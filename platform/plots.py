"""Pictures of runs: learning curves and the MAML paper's sinusoid adaptation figure (for MLflow), and
time-to-accuracy curves (benchmarks.time_to_accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # not pyplot: files only, no backend or global figure state

from platform.algorithms import build
from platform.config import RunConfig
from platform.tasks import task_sampler

ADAPTATION_STEPS = (0, 1, 10)  # the MAML paper's figure: before adaptation, after 1 and 10 steps


def learning_curves(history: list[dict], classification: bool, path: Path) -> Path:
    """Meta-training loss (and accuracy) per iteration, with meta-validation where it ran."""
    iterations = np.array([r["iteration"] for r in history])
    fig = Figure(figsize=(11 if classification else 6, 4))
    axes = fig.subplots(1, 2 if classification else 1, squeeze=False)
    loss = axes[0][0]
    loss.plot(iterations, [r["loss"] for r in history], lw=0.6, alpha=0.6, label="meta-train (query loss)")
    val = [r for r in history if "val" in r]
    if classification:
        acc = axes[0][1]
        acc.plot(iterations, [r["accuracy"] for r in history], lw=0.6, alpha=0.6, label="meta-train")
        if val:
            acc.errorbar(
                [r["iteration"] for r in val],
                [r["val"]["accuracy"] for r in val],
                yerr=[r["val"]["accuracy_ci95"] for r in val],
                marker="o",
                capsize=3,
                label="meta-validation (95% CI)",
            )
        acc.set(xlabel="meta-iteration", ylabel="query accuracy after adaptation", title="Accuracy")
        acc.legend()
    elif val:
        loss.errorbar(
            [r["iteration"] for r in val],
            [r["val"]["loss"] for r in val],
            yerr=[r["val"]["loss_ci95"] for r in val],
            marker="o",
            capsize=3,
            label="meta-validation MSE (95% CI)",
        )
    loss.set(xlabel="meta-iteration", ylabel="loss", title="Loss", yscale="log")
    loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def accuracy_over_time(curves: dict[str, list[dict]], split: str, thresholds: tuple[float, ...], path: Path) -> Path:
    """Accuracy (with 95% CIs) against minutes of training, one line per run: time to accuracy."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.errorbar(
            [r["train_s"] / 60 for r in curve],
            [r[split]["accuracy"] for r in curve],
            yerr=[r[split]["accuracy_ci95"] for r in curve],
            marker=".",
            capsize=2,
            label=label,
        )
    for threshold in thresholds:
        ax.axhline(threshold, color="grey", lw=0.5, ls=":")
    name = {"val": "meta-validation", "test": "meta-test"}[split]
    ax.set(xlabel="training wall time (min)", ylabel=f"{name} accuracy", ylim=(min(thresholds) - 0.05, 1.0))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def sinusoid_adaptation(config: RunConfig, params: dict[str, torch.Tensor], path: Path, seed: int = 0) -> Path:
    """A held-out sinusoid: the true function, the K support points, and the model's prediction
    before adaptation and after 1 and 10 inner steps on them (Finn et al. 2017, figure 2)."""
    _, algorithm, _ = build(config)
    sampler = task_sampler(config.task, "test")
    task = sampler.sample(seed)
    x = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(x, sampler.curve(seed, x.numpy()), color="black", lw=2, label="true function")
    for steps in ADAPTATION_STEPS:
        label = "before adaptation" if steps == 0 else f"after {steps} step{'s' * (steps > 1)}"
        ax.plot(x, algorithm.adapted_predict(params, task, x, steps), ls="--" if steps == 0 else "-", label=label)
    ax.scatter(
        task.support_x,
        task.support_y,
        color="black",
        marker="^",
        zorder=3,
        label=f"{len(task.support_x)} support points",
    )
    ax.set(xlabel="x", ylabel="y", title=f"{config.algorithm}: adapting to a held-out sinusoid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
