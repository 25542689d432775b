"""What both benchmark harnesses share, none of it needing Ray: the settings, the reference
meta-gradient (written independently of platform/algorithms.py), FLOP counts, the matmul peak and
the float64 truth that float32 meta-gradients are measured against."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from platform.algorithms import build
from platform.config import RunConfig
from platform.tasks import Task, iteration_seeds, task_sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "omniglot-5w1s.yaml")

# name -> (algorithm, inner steps)
SETTINGS = {
    "maml-1": ("maml", 1),
    "maml-5": ("maml", 5),
    "fomaml-1": ("fomaml", 1),
    "fomaml-5": ("fomaml", 5),
    "anil-1": ("anil", 1),
    "anil-5": ("anil", 5),
}
TINY = ["model.width=8", "optim.meta_batch=8", "optim.chunk=2"]


# --- the reference: independent of platform/algorithms.py --------------------------------------


def ref_body(p: dict, x: torch.Tensor) -> torch.Tensor:
    """Conv4's body written out: 4 x (conv 3x3, batch-statistics BatchNorm, ReLU, 2x2 max-pool), flatten."""
    for i in range(4):
        x = F.conv2d(x, p[f"body.{i}.0.weight"], p[f"body.{i}.0.bias"], padding=1)
        x = F.batch_norm(x, None, None, p[f"body.{i}.1.weight"], p[f"body.{i}.1.bias"], training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1)


def ref_head(p: dict, z: torch.Tensor) -> torch.Tensor:
    return F.linear(z, p["head.weight"], p["head.bias"])


def reference_meta_grad(
    params: dict, tasks: list[Task], inner_lr: float, steps: int, first_order: bool, head_only: bool
) -> tuple[dict, float]:
    """Sum over tasks of the MAML / FOMAML / ANIL outer gradient, one task and one backward at a time."""
    theta = {k: v.detach().requires_grad_() for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    loss_sum = 0.0
    for task in tasks:
        if head_only:  # ANIL: features once, only the head adapts
            zs, zq = ref_body(theta, task.support_x), ref_body(theta, task.query_x)
            adapted = ["head.weight", "head.bias"]
            predict = ref_head
        else:
            zs, zq = task.support_x, task.query_x
            adapted = list(theta)
            predict = lambda p, x: ref_head(p, ref_body(p, x))
        fast = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(predict(fast, zs), task.support_y)
            grads = torch.autograd.grad(loss, [fast[k] for k in adapted], create_graph=not first_order)
            fast = fast | {k: fast[k] - inner_lr * g for k, g in zip(adapted, grads)}
        query_loss = F.cross_entropy(predict(fast, zq), task.query_y)
        grads = torch.autograd.grad(query_loss, list(theta.values()), allow_unused=True)
        for k, g in zip(theta, grads):
            if g is not None:
                total[k] += g
        loss_sum += query_loss.item()
    return total, loss_sum


def add_common_arguments(parser: argparse.ArgumentParser, device_help: str, default_device: str = "cpu") -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base run config (default: omniglot-5w1s)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device, help=device_help)
    parser.add_argument("--tiny", action="store_true", help="CI smoke: width 8, meta-batch 8, 1 round, maml-1")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. optim.chunk=16)")


def resolve_common_arguments(parser: argparse.ArgumentParser, args) -> tuple[list[str], list[str]]:
    """(setting names, base config overrides); `args.device` becomes a torch.device. Usage errors exit 2."""
    base = list(args.overrides)
    if args.tiny:
        base = TINY + base
        if args.settings == ",".join(SETTINGS):
            args.settings = "maml-1"
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return names, base


def device_peak(device: torch.device, tiny: bool) -> tuple[float, str]:
    """(GFLOP/s, dtype name) of the device's matmul peak: fp32 on CPU, bf16 on GPU."""
    if device.type == "cuda":
        return matmul_peak(512 if tiny else 8192, 0.3 if tiny else 2.0, device, torch.bfloat16), "bf16"
    return matmul_peak(512 if tiny else 2048, 0.3 if tiny else 2.0, device, torch.float32), "fp32"


def config_meta_grad(config: RunConfig, params: dict, tasks: list[Task]) -> dict:
    """reference_meta_grad with the run config's algorithm and inner loop."""
    o = config.optim
    head_only = config.algorithm == "anil"
    return reference_meta_grad(params, tasks, o.inner_lr, o.inner_steps, config.first_order, head_only)[0]


def write_json(path: str, header: dict, results: list[dict]) -> None:
    """A harness's results file: what ran it (the header, the command line), then one entry per setting."""
    with open(path, "w") as f:
        json.dump(header | {"argv": sys.argv, "results": results}, f, indent=2)


def matmul_peak(n: int, seconds: float, device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of an n x n torch.mm loop (on CPU with all of torch's threads)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.mm(a, b)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            torch.mm(a, b)
        sync()
        count += 10
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def flops_per_task(config: RunConfig) -> float:
    """FLOPs of one task's outer_grad in the platform's algorithm."""
    _, algorithm, params = build(config)
    task = task_sampler(config.task, "train").sample(iteration_seeds(config.seed, 0, 1)[0])
    with FlopCounterMode(display=False) as counter:
        algorithm.outer_grad(params, [task])
    return float(counter.get_total_flops())


def in_float64(task: Task) -> Task:
    return dataclasses.replace(task, support_x=task.support_x.double(), query_x=task.query_x.double())


class Float64Truth:
    """The reference meta-gradient in float64 on CPU for the first 4 tasks of iteration 0: what the
    harnesses measure float32 meta-gradients against (largest relative error over parameter tensors)."""

    def __init__(self, config: RunConfig):
        self.config = config
        _, _, self.params = build(config)
        sampler = task_sampler(config.task, "train")
        self.tasks = [sampler.sample(s) for s in iteration_seeds(config.seed, 0, min(4, config.optim.meta_batch))]
        self.truth = self.reference(
            {k: v.double() for k, v in self.params.items()}, [in_float64(t) for t in self.tasks]
        )
        # Conv biases before batch-statistics BatchNorm have a true gradient of 0: only rounding noise to compare.
        self.keys = [k for k in self.truth if not (k.startswith("body.") and k.endswith(".0.bias"))]

    def reference(self, params: dict, tasks: list[Task]) -> dict:
        return config_meta_grad(self.config, params, tasks)

    def error(self, meta_grad, device: torch.device) -> float:
        """Error of `meta_grad(params, tasks) -> grads` run in float32 on `device`."""
        params = {k: v.to(device) for k, v in self.params.items()}
        grads = meta_grad(params, [t.to(device) for t in self.tasks])
        t = self.truth
        return max(float((grads[k].cpu().double() - t[k]).norm() / t[k].norm()) for k in self.keys)
