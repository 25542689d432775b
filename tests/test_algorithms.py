"""Correctness of the meta-gradients in platform.algorithms, against independent computations.

Everything that is compared against an unrolled computation or finite differences runs in float64
on tiny models: the algorithms only see the model through `functional_call`, so float64 parameters
and inputs give float64 results whatever the module's own dtype.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch.func import functional_call

from benchmarks.reference import ref_body, ref_head
from platform.algorithms import (
    INNER_LR,
    GradientMetaLearner,
    PrototypicalNetwork,
    Reptile,
    build,
    build_algorithm,
    vectorized,
)
from platform.chunks import chunked
from platform.config import RunConfig, load_config
from platform.models import MLP, BatchNorm, Conv4, ResNet12, drop_block
from platform.tasks import Task

TIGHT = {"rtol": 1e-9, "atol": 1e-12}


# --- tiny models, tasks and an independent forward pass -------------------------------------------


def mlp(in_features: int = 1, width: int = 8, out: int | None = 1, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features, width, out)


def double(params: dict) -> dict:
    return {k: v.detach().double() for k, v in params.items()}


def regression_task(seed: int, shots: int = 5, query: int = 7) -> Task:
    g = torch.Generator().manual_seed(seed)
    amplitude, phase = 0.5 + 2 * torch.rand((), generator=g), 3 * torch.rand((), generator=g)
    x = 10 * torch.rand(shots + query, 1, generator=g, dtype=torch.float64) - 5
    y = amplitude * torch.sin(x - phase)
    return Task(x[:shots], y[:shots], x[shots:], y[shots:])


def image_task(
    seed: int, ways: int = 3, shots: int = 2, query: int = 3, size: int = 4, shuffle: bool = False, channels: int = 1
) -> Task:
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(ways, channels, size, size, generator=g, dtype=torch.float64)

    def draw(per_class: int):
        y = torch.arange(ways).repeat_interleave(per_class)
        if shuffle:
            y = y[torch.randperm(len(y), generator=g)]
        x = centers[y] + 0.3 * torch.rand(len(y), channels, size, size, generator=g, dtype=torch.float64)
        return x, y

    return Task(*draw(shots), *draw(query))


def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """MLP.forward written out, so the references do not go through the module."""
    h = x.flatten(1)
    h = F.relu(F.linear(h, p["body.1.weight"], p["body.1.bias"]))
    h = F.relu(F.linear(h, p["body.3.weight"], p["body.3.bias"]))
    return F.linear(h, p["head.weight"], p["head.bias"]) if "head.weight" in p else h


def body(p: dict, x: torch.Tensor) -> torch.Tensor:
    return forward({k: v for k, v in p.items() if k.startswith("body.")}, x)


def head(p: dict, z: torch.Tensor) -> torch.Tensor:
    return F.linear(z, p["head.weight"], p["head.bias"])


def loss_fn(classification: bool):
    return F.cross_entropy if classification else F.mse_loss


def leaves(params: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


def sgd(fast: dict, names: list[str], loss: torch.Tensor, lr, create_graph: bool) -> dict:
    """One explicit gradient step on `names`; `lr` is a float or a dict of per-parameter rates."""
    grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=create_graph)
    rate = lr if isinstance(lr, dict) else dict.fromkeys(names, lr)
    return fast | {k: fast[k] - rate[k] * g for k, g in zip(names, grads)}


def maml_reference(params, task, lr, steps, classification=False, first_order=False):
    """(meta-gradient, query loss) of MAML, unrolled by hand."""
    theta = leaves(params)
    fast, loss = dict(theta), loss_fn(classification)
    for _ in range(steps):
        if first_order:  # the adapted params as a function of theta: theta - lr * (constant gradients)
            fast = sgd(fast, list(fast), loss(forward(fast, task.support_x), task.support_y), lr, False)
        else:
            fast = sgd(fast, list(fast), loss(forward(fast, task.support_x), task.support_y), lr, True)
    query = loss(forward(fast, task.query_x), task.query_y)
    return dict(zip(theta, torch.autograd.grad(query, list(theta.values())))), query.detach()


def adapted_query_loss(params, task, lr, steps, classification=False) -> float:
    """The MAML objective as a plain function of the initial parameters (for finite differences)."""
    fast, loss = leaves(params), loss_fn(classification)
    for _ in range(steps):
        fast = leaves(sgd(fast, list(fast), loss(forward(fast, task.support_x), task.support_y), lr, False))
    with torch.no_grad():
        return loss(forward(fast, task.query_x), task.query_y).item()


def directional_fd(f, params: dict, direction: dict, eps: float = 1e-6) -> float:
    plus = {k: v + eps * direction[k] for k, v in params.items()}
    minus = {k: v - eps * direction[k] for k, v in params.items()}
    return (f(plus) - f(minus)) / (2 * eps)


def random_directions(params: dict, count: int, seed: int = 123) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()} for _ in range(count)]


def dot(a: dict, b: dict) -> float:
    return sum((a[k] * b[k]).sum().item() for k in a)


def assert_params_close(actual: dict, expected: dict, **tolerance) -> None:
    assert list(actual) == list(expected)
    for k, value in expected.items():
        torch.testing.assert_close(actual[k], value, **(tolerance or TIGHT), msg=k)


def maml(model, inner_lr=0.1, steps=1, first_order=False, classification=False, **kw) -> GradientMetaLearner:
    return GradientMetaLearner(model, inner_lr, steps, first_order, classification, **kw)


# --- float64 through functional_call ---------------------------------------------------------------


def test_float64_params_through_functional_call():
    model = mlp()
    params = double(dict(model.named_parameters()))
    x = regression_task(0).support_x
    out = functional_call(model, params, (x,))
    assert out.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32  # the module itself is untouched
    torch.testing.assert_close(out, forward(params, x), **TIGHT)
    torch.testing.assert_close(out, mlp().double()(x), **TIGHT)


# --- MAML ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_unrolled_and_finite_differences(steps):
    model = mlp()
    algo = maml(model, inner_lr=0.1, steps=steps)
    params = double(algo.init_params())
    task = regression_task(1)

    grads, metrics = algo.outer_grad(params, [task])
    expected, query_loss = maml_reference(params, task, 0.1, steps)
    assert_params_close(grads, expected)
    assert all(g.dtype == torch.float64 for g in grads.values())
    assert metrics["tasks"] == 1 and metrics["loss"] == pytest.approx(query_loss.item(), rel=1e-12)

    objective = lambda p: adapted_query_loss(p, task, 0.1, steps)
    for d in random_directions(params, 3):
        assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d), rel=1e-6, abs=1e-9)

    # The second-order term matters here, so the checks above tell MAML from first-order MAML.
    first_order, _ = maml_reference(params, task, 0.1, steps, first_order=True)
    assert max((grads[k] - first_order[k]).abs().max().item() for k in grads) > 1e-3


def test_maml_classification_meta_gradient_matches_unrolled():
    model = mlp(in_features=16, out=3)
    algo = maml(model, inner_lr=0.5, steps=2, classification=True)
    params = double(algo.init_params())
    task = image_task(2)
    grads, metrics = algo.outer_grad(params, [task])
    expected, query_loss = maml_reference(params, task, 0.5, 2, classification=True)
    assert_params_close(grads, expected)
    assert metrics["loss"] == pytest.approx(query_loss.item(), rel=1e-12)
    objective = lambda p: adapted_query_loss(p, task, 0.5, 2, classification=True)
    for d in random_directions(params, 2):
        assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d), rel=1e-6, abs=1e-9)


def test_maml_conv4_batchnorm_meta_gradient_matches_finite_differences():
    """Conv4 (batch-statistics BatchNorm, max-pooling) on 28x28 images: finite differences and unrolled."""
    torch.manual_seed(0)
    model = Conv4(1, 4, 2)
    algo = maml(model, inner_lr=0.3, steps=1, classification=True)
    params = double(algo.init_params())
    task = image_task(3, ways=2, shots=2, query=2, size=28)
    grads, _ = algo.outer_grad(params, [task])

    def objective(p):
        fast = leaves(p)
        loss = F.cross_entropy(functional_call(model, fast, (task.support_x,)), task.support_y)
        fast = sgd(fast, list(fast), loss, 0.3, False)
        with torch.no_grad():
            return F.cross_entropy(functional_call(model, fast, (task.query_x,)), task.query_y).item()

    # A small step: with thousands of ReLU and max-pool units a step of 1e-6 already crosses a kink here.
    for d in random_directions(params, 2):
        assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d, eps=1e-7), rel=1e-6, abs=1e-8)

    theta = leaves(params)
    loss = F.cross_entropy(functional_call(model, theta, (task.support_x,)), task.support_y)
    fast = sgd(theta, list(theta), loss, 0.3, True)
    query = F.cross_entropy(functional_call(model, fast, (task.query_x,)), task.query_y)
    assert_params_close(grads, dict(zip(theta, torch.autograd.grad(query, list(theta.values())))))


@pytest.mark.parametrize("steps", [1, 2])
def test_first_order_maml_drops_the_second_order_term(steps):
    model = mlp()
    algo = maml(model, inner_lr=0.1, steps=steps, first_order=True)
    params = double(algo.init_params())
    task = regression_task(4)
    grads, _ = algo.outer_grad(params, [task])

    # Independently: adapt without any graph, then the query-loss gradient at the adapted params.
    fast = leaves(params)
    for _ in range(steps):
        fast = leaves(sgd(fast, list(fast), F.mse_loss(forward(fast, task.support_x), task.support_y), 0.1, False))
    query = F.mse_loss(forward(fast, task.query_x), task.query_y)
    expected = dict(zip(fast, torch.autograd.grad(query, list(fast.values()))))
    assert_params_close(grads, expected)


# --- Reptile ---------------------------------------------------------------------------------------


def reptile_difference(params, task, lr, steps) -> dict:
    """theta - theta_adapted: `steps` full-batch SGD steps on support + query together."""
    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
    fast = leaves(params)
    for _ in range(steps):
        fast = leaves(sgd(fast, list(fast), F.mse_loss(forward(fast, x), y), lr, False))
    return {k: params[k] - fast[k].detach() for k in params}


def test_reptile_outer_grad_is_sum_of_parameter_differences():
    model = mlp()
    algo = Reptile(model, inner_lr=0.05, inner_steps=3, first_order=True, classification=False)
    params = double(algo.init_params())
    tasks = [regression_task(s) for s in (5, 6, 7)]
    grads, metrics = algo.outer_grad(params, tasks)
    diffs = [reptile_difference(params, t, 0.05, 3) for t in tasks]
    expected = {k: diffs[0][k] + diffs[1][k] + diffs[2][k] for k in params}
    assert_params_close(grads, expected)
    assert metrics["tasks"] == 3
    assert all(expected[k].abs().max() > 0 for k in expected)


def test_reptile_driver_average(monkeypatch):
    """Through the engine's worker and the driver's formula: rows summed in chunk order / meta_batch."""
    from platform import engine
    from platform.tasks import task_sampler

    config = RunConfig.model_validate(
        {
            "task": {"kind": "sinusoid", "shots": 5, "query": 5},
            "model": {"kind": "mlp", "width": 8},
            "algorithm": "reptile",
            "optim": {"inner_lr": 0.02, "inner_steps": 2, "meta_batch": 3, "chunk": 2},
            "resources": {"workers": 1},
        }
    )
    threads = torch.get_num_threads()
    try:
        worker = engine.AdaptationWorker(config.model_dump(mode="json"))
    finally:
        torch.set_num_threads(threads)  # the worker pins its process to cpus_per_worker threads
    _, _, initial = build(config)
    seeds = [11, 12, 13]
    result = worker.outer_grads(engine.flatten(initial), chunked(seeds, config.optim.chunk))
    assert result.grads.shape[0] == 2 and result.tasks.tolist() == [2, 1]
    average = engine.unflatten(result.grads.sum(axis=0) / config.optim.meta_batch, initial)

    sampler = task_sampler(config.task, "train")
    diffs = [reptile_difference(initial, sampler.sample(s), 0.02, 2) for s in seeds]
    expected = {k: sum(d[k] for d in diffs) / len(seeds) for k in initial}
    assert_params_close(average, expected, rtol=1e-4, atol=1e-6)


def test_build_algorithm_from_config():
    model = mlp()
    built = {name: build_algorithm(RunConfig(algorithm=name), model) for name in ("maml", "fomaml", "reptile")}
    assert type(built["maml"]) is GradientMetaLearner and not built["maml"].first_order
    assert built["fomaml"].first_order and type(built["reptile"]) is Reptile and built["reptile"].first_order
    assert build_algorithm(RunConfig.model_validate({"optim": {"first_order": True}}), model).first_order
    anil = build_algorithm(RunConfig(algorithm="anil"), model)
    assert anil.head_only and not anil.learn_inner_lr and not anil.first_order
    metasgd = build_algorithm(RunConfig(algorithm="metasgd"), model)
    assert metasgd.learn_inner_lr and not metasgd.head_only
    assert isinstance(build_algorithm(RunConfig(algorithm="protonet"), mlp(out=None)), PrototypicalNetwork)
    config = RunConfig.model_validate({"task": {"kind": "omniglot"}, "optim": {"inner_lr": 0.4, "inner_steps": 5}})
    algo = build_algorithm(config, model)
    assert algo.classification and algo.inner_lr == 0.4 and algo.inner_steps == 5


# --- Prototypical Networks -------------------------------------------------------------------------


def protonet_reference_logits(params, task) -> torch.Tensor:
    support, query = body(params, task.support_x), body(params, task.query_x)
    ways = int(task.support_y.max()) + 1
    prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(ways)])
    return -(torch.cdist(query, prototypes) ** 2)


def test_protonet_logits_and_outer_grad():
    model = mlp(in_features=16, out=None)
    algo = PrototypicalNetwork(model)
    params = double(algo.init_params())
    assert all(k.startswith("body.") for k in params)
    task = image_task(8, ways=3, shots=3, query=2, shuffle=True)  # labels not grouped by class
    torch.testing.assert_close(algo.logits(params, task), protonet_reference_logits(params, task), **TIGHT)

    grads, metrics = algo.outer_grad(params, [task])
    theta = leaves(params)
    loss = F.cross_entropy(protonet_reference_logits(theta, task), task.query_y)
    assert_params_close(grads, dict(zip(theta, torch.autograd.grad(loss, list(theta.values())))))
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    d = random_directions(params, 1)[0]
    objective = lambda p: F.cross_entropy(protonet_reference_logits(p, task), task.query_y).item()
    assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d), rel=1e-6, abs=1e-9)

    m = algo.evaluate(params, task, steps=0)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-12) and 0.0 <= m["accuracy"] <= 1.0


# --- ANIL ------------------------------------------------------------------------------------------


def test_anil_adapts_only_the_head():
    model = mlp(in_features=16, out=3)
    algo = maml(model, inner_lr=0.5, steps=3, classification=True, head_only=True)
    params = double(algo.init_params())
    task = image_task(9)
    z = algo._encode(params, task.support_x)
    adapted = algo.adapt(leaves(params), z, task.support_y, 3, create_graph=False)
    assert list(adapted) == list(params)
    for k in params:
        if k.startswith("head."):
            assert not torch.equal(adapted[k], params[k]), k
        else:
            assert torch.equal(adapted[k], params[k]), k


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_matches_head_only_unrolled(first_order):
    model = mlp(in_features=16, out=3)
    algo = maml(model, inner_lr=0.5, steps=2, classification=True, head_only=True, first_order=first_order)
    params = double(algo.init_params())
    task = image_task(10)
    grads, _ = algo.outer_grad(params, [task])

    theta = leaves(params)
    zs, zq = body(theta, task.support_x), body(theta, task.query_x)
    fast, names = dict(theta), ["head.weight", "head.bias"]
    for _ in range(2):
        fast = sgd(fast, names, F.cross_entropy(head(fast, zs), task.support_y), 0.5, not first_order)
    query = F.cross_entropy(head(fast, zq), task.query_y)
    expected = dict(zip(theta, torch.autograd.grad(query, list(theta.values()))))
    assert_params_close(grads, expected)
    assert all(grads[k].abs().max() > 0 for k in grads if k.startswith("body."))

    if not first_order:

        def objective(p):
            fast = leaves(p)
            for _ in range(2):
                loss = F.cross_entropy(head(fast, body(fast, task.support_x)), task.support_y)
                fast = leaves(sgd(fast, names, loss, 0.5, False))
            with torch.no_grad():
                return F.cross_entropy(head(fast, body(fast, task.query_x)), task.query_y).item()

        for d in random_directions(params, 2):
            assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d), rel=1e-6, abs=1e-9)


# --- Meta-SGD --------------------------------------------------------------------------------------


def test_metasgd_init_params():
    model = mlp()
    algo = maml(model, inner_lr=0.03, learn_inner_lr=True)
    params = algo.init_params()
    names = [k for k, _ in model.named_parameters()]
    assert sorted(params) == sorted(names + [INNER_LR + k for k in names])
    for k, v in model.named_parameters():
        assert torch.equal(params[k], v.detach())
        rate = params[INNER_LR + k]
        assert rate.shape == v.shape and torch.all(rate == 0.03)


@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_rate_gradient_matches_finite_differences(steps):
    model = mlp()
    algo = maml(model, inner_lr=0.05, steps=steps, learn_inner_lr=True)
    params = double(algo.init_params())
    g = torch.Generator().manual_seed(5)
    # Rates that differ per element, so a mix-up of rates and parameters would show.
    params = {
        k: v * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)) if k.startswith(INNER_LR) else v
        for k, v in params.items()
    }
    task = regression_task(11)
    grads, _ = algo.outer_grad(params, [task])
    names = [k for k in params if not k.startswith(INNER_LR)]

    def unrolled(p, create_graph):
        fast = dict(p)
        rates = {k: p[INNER_LR + k] for k in names}
        for _ in range(steps):
            fast = sgd(fast, names, F.mse_loss(forward(fast, task.support_x), task.support_y), rates, create_graph)
            if not create_graph:
                fast = leaves(fast)
        return F.mse_loss(forward(fast, task.query_x), task.query_y)

    theta = leaves(params)
    expected = dict(zip(theta, torch.autograd.grad(unrolled(theta, True), list(theta.values()))))
    assert_params_close(grads, expected)

    rates_only = [
        {k: v if k.startswith(INNER_LR) else torch.zeros_like(v) for k, v in d.items()}
        for d in random_directions(params, 3)
    ]
    objective = lambda p: unrolled(leaves(p), False).item()
    for d in rates_only:
        assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d), rel=1e-6, abs=1e-10)
    assert all(grads[INNER_LR + k].abs().max() > 0 for k in names)


def test_first_order_metasgd_rate_gradient_closed_form():
    """One first-order step: dL_q/d(rate) = -grad L_s(theta) * grad L_q(theta') elementwise."""
    model = mlp()
    algo = maml(model, inner_lr=0.05, steps=1, first_order=True, learn_inner_lr=True)
    params = double(algo.init_params())
    task = regression_task(12)
    grads, _ = algo.outer_grad(params, [task])
    names = [k for k in params if not k.startswith(INNER_LR)]
    theta = leaves({k: params[k] for k in names})
    support_loss = F.mse_loss(forward(theta, task.support_x), task.support_y)
    support_grads = torch.autograd.grad(support_loss, list(theta.values()))
    fast = leaves({k: theta[k] - params[INNER_LR + k] * g for k, g in zip(names, support_grads)})
    query_grads = torch.autograd.grad(F.mse_loss(forward(fast, task.query_x), task.query_y), list(fast.values()))
    for k, gs, gq in zip(names, support_grads, query_grads):
        torch.testing.assert_close(grads[INNER_LR + k], -gs * gq, **TIGHT)
        torch.testing.assert_close(grads[k], gq, **TIGHT)


# --- chunking and evaluation -----------------------------------------------------------------------


def algorithms() -> dict:
    reg, cls = mlp(), mlp(in_features=16, out=3)
    return {
        "maml": (maml(reg, steps=2), False),
        "fomaml": (maml(reg, steps=2, first_order=True), False),
        "metasgd": (maml(reg, steps=2, learn_inner_lr=True), False),
        "reptile": (Reptile(reg, 0.05, 3, True, False), False),
        "anil": (maml(cls, inner_lr=0.5, steps=2, classification=True, head_only=True), True),
        "protonet": (PrototypicalNetwork(mlp(in_features=16, out=None)), True),
        "maml-conv4": (maml(Conv4(1, 4, 3), inner_lr=0.3, steps=1, classification=True), True),
    }


@pytest.mark.parametrize("name", list(algorithms()))
def test_outer_grad_of_a_list_is_the_sum_over_its_tasks(name):
    algo, classification = algorithms()[name]
    params = double(algo.init_params())
    if name == "maml-conv4":
        tasks = [image_task(s, size=28) for s in (20, 21, 22)]
    else:
        tasks = [image_task(s, size=4) if classification else regression_task(s) for s in (20, 21, 22)]
    together, metrics = algo.outer_grad(params, tasks)
    alone = [algo.outer_grad(params, [t]) for t in tasks]
    expected = {k: alone[0][0][k] + alone[1][0][k] + alone[2][0][k] for k in params}
    assert_params_close(together, expected, rtol=1e-12, atol=1e-15)
    assert metrics["tasks"] == 3
    assert metrics["loss"] == pytest.approx(sum(m["loss"] for _, m in alone), rel=1e-12)
    assert metrics["accuracy"] == pytest.approx(sum(m["accuracy"] for _, m in alone), rel=1e-12)
    assert all(torch.equal(params[k], v) for k, v in double(algo.init_params()).items())  # inputs untouched


IMAGES_28 = lambda seed: image_task(seed, size=28)
VMAP_CASES = {  # the MLP's cases take the batched-matmul path (models.MLP.batched), conv4's torch.func.vmap
    "maml-mlp": (lambda: maml(mlp(), steps=2), regression_task),
    "fomaml-mlp": (lambda: maml(mlp(), steps=2, first_order=True), regression_task),
    "anil-mlp": (lambda: maml(mlp(), steps=2, head_only=True), regression_task),
    "metasgd-mlp": (lambda: maml(mlp(), steps=2, learn_inner_lr=True), regression_task),
    "maml-mlp-classes": (lambda: maml(mlp(16, out=3), inner_lr=0.3, steps=2, classification=True), image_task),
    "maml-conv4": (lambda: maml(Conv4(1, 4, 3), inner_lr=0.3, steps=2, classification=True), IMAGES_28),
    "fomaml-conv4": (lambda: maml(Conv4(1, 4, 3), inner_lr=0.3, first_order=True, classification=True), IMAGES_28),
    "anil-conv4": (lambda: maml(Conv4(1, 4, 3), inner_lr=0.3, steps=2, classification=True, head_only=True), IMAGES_28),
    "metasgd-conv4": (lambda: maml(Conv4(1, 4, 3), inner_lr=0.3, classification=True, learn_inner_lr=True), IMAGES_28),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vectorized_outer_grad_equals_the_task_loop(name):
    """resources.vectorize=vmap: one batched computation, the same meta-gradient as the loop."""
    make, task = VMAP_CASES[name]
    torch.manual_seed(0)
    loop = make()
    batched = dataclasses.replace(loop, vectorized=True)
    params = double(loop.init_params())
    tasks = [task(s) for s in (30, 31, 32)]
    expected, expected_metrics = loop.outer_grad(params, tasks)
    grads, metrics = batched.outer_grad(params, tasks)
    assert_params_close(grads, expected, rtol=1e-10, atol=1e-13)
    assert metrics["tasks"] == 3
    assert metrics["loss"] == pytest.approx(expected_metrics["loss"], rel=1e-10)
    assert metrics["accuracy"] == pytest.approx(expected_metrics["accuracy"], rel=1e-6)  # float32 means


def test_the_mlps_batched_path_never_imports_torch_dynamo():
    """torch.func.grad imports torch._dynamo at its first call (~1-2 s of a Ray actor's start, which
    makes no optimiser); the MLP's batched path is plain autograd."""
    code = (
        "import sys; from platform.config import RunConfig; from platform.algorithms import build; "
        "from platform.tasks import task_sampler; config = RunConfig(); _, algorithm, params = build(config); "
        "sampler = task_sampler(config.task, 'train'); "
        "assert algorithm.vectorized; algorithm.outer_grad(params, [sampler.sample(s) for s in range(3)]); "
        "assert 'torch._dynamo' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": str(REPO)})


def test_vectorize_auto_batches_on_gpus_and_for_the_mlp():
    config = lambda **r: RunConfig.model_validate({"algorithm": "maml", "resources": r})
    conv = lambda **r: RunConfig.model_validate(
        {"task": {"kind": "omniglot"}, "model": {"kind": "conv4"}, "resources": r}
    )
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert vectorized(config(), cpu) and vectorized(config(), cuda)  # the MLP: vmap wins on CPU too
    assert not vectorized(conv(), cpu) and vectorized(conv(), cuda)  # conv4 on CPU: the loop wins
    assert vectorized(conv(vectorize="vmap"), cpu) and not vectorized(config(vectorize="loop"), cuda)
    assert not vectorized(RunConfig(algorithm="reptile"), cuda)  # no vmap path: auto keeps the loop
    assert build_algorithm(config(vectorize="vmap"), mlp()).vectorized


def test_evaluate_regression_improves_on_an_easy_task():
    model = mlp(width=16)
    algo = maml(model, inner_lr=0.05, steps=1)
    params = algo.init_params()
    x = torch.linspace(-1, 1, 20).unsqueeze(1)
    task = Task(x[::2], 0.5 * x[::2] + 0.3, x[1::2], 0.5 * x[1::2] + 0.3)
    m = algo.evaluate(params, task, steps=50)
    assert m["loss"] < 0.5 * m["loss_before"]
    assert m["accuracy"] == 0.0 and m["accuracy_before"] == 0.0
    zero = algo.evaluate(params, task, steps=0)
    assert zero["loss"] == pytest.approx(zero["loss_before"])
    assert zero["loss_before"] == pytest.approx(m["loss_before"])


@pytest.mark.parametrize("kind", ["maml", "anil", "metasgd"])
def test_evaluate_classification_accuracy_is_a_fraction(kind):
    torch.manual_seed(0)
    model = Conv4(1, 4, 3)
    algo = maml(
        model, inner_lr=0.3, steps=1, classification=True, head_only=kind == "anil", learn_inner_lr=kind == "metasgd"
    )
    params = algo.init_params()
    task = image_task(30, ways=3, shots=2, query=4, size=28)
    task = dataclasses.replace(task, support_x=task.support_x.float(), query_x=task.query_x.float())
    m = algo.evaluate(params, task, steps=5)
    assert set(m) == {"loss_before", "accuracy_before", "loss", "accuracy"}
    for key in ("accuracy_before", "accuracy"):
        assert 0.0 <= m[key] <= 1.0
        assert (m[key] * 12) == pytest.approx(round(m[key] * 12))  # a count of the 12 query images
    assert m["loss"] > 0 and m["loss_before"] > 0


def paper_conv4(p: dict, x: torch.Tensor) -> torch.Tensor:
    """Conv4 as the MAML paper writes it: 4 x (conv, batch-statistics BN, ReLU, max-pool), then the head
    (the benchmarks' independent reference, shared)."""
    return ref_head(p, ref_body(p, x))


def conv4_setup(width: int, dtype: torch.dtype):
    """A Conv4 with BN scales and shifts of both signs, its params, one 3-way task (2 shots, 15 queries)."""
    torch.manual_seed(0)
    model = Conv4(1, width, 3)
    params = {k: v.detach().to(dtype) for k, v in model.named_parameters()}
    for i in range(4):
        params[f"body.{i}.1.weight"] = torch.randn(width, dtype=dtype)
        params[f"body.{i}.1.bias"] = 0.5 * torch.randn(width, dtype=dtype)
    task = image_task(7, ways=3, shots=2, query=15, size=28)
    task = Task(task.support_x.to(dtype), task.support_y, task.query_x.to(dtype), task.query_y)
    return model, params, task


def paper_meta_gradient(params: dict, task: Task) -> dict:
    theta = leaves(params)
    loss = F.cross_entropy(paper_conv4(theta, task.support_x), task.support_y)
    fast = sgd(theta, list(theta), loss, 0.4, True)
    query = F.cross_entropy(paper_conv4(fast, task.query_x), task.query_y)
    return dict(zip(theta, torch.autograd.grad(query, list(theta.values()))))


def test_conv4_is_the_papers_network_in_outputs_and_meta_gradients():
    """Ours pools before the ReLU and folds the first conv + BN into one matmul: same function, float64."""
    model, params, task = conv4_setup(width=6, dtype=torch.float64)
    torch.testing.assert_close(
        functional_call(model, params, (task.query_x,)), paper_conv4(params, task.query_x), rtol=1e-10, atol=1e-12
    )
    learner = GradientMetaLearner(model, inner_lr=0.4, inner_steps=1, first_order=False, classification=True)
    grads = learner.outer_grad(params, [task])[0]
    expected = paper_meta_gradient(params, task)
    # BN cancels the first conv's bias: its true gradient is 0, which the fold gives exactly.
    assert torch.equal(grads.pop("body.0.0.bias"), torch.zeros(6, dtype=torch.float64))
    assert expected.pop("body.0.0.bias").abs().max() < 1e-12
    assert_params_close(grads, expected, rtol=1e-9, atol=1e-13)


def test_conv4_on_rgb_images_of_another_size_is_the_papers_network():
    """3 channels at 32x32 (2x2 maps flattened into the head): the folded first block takes every channel's
    patches; outputs and the second-order meta-gradient equal the written-out network's, in float64."""
    torch.manual_seed(0)
    model = Conv4(3, 5, 3, image_size=32)
    assert model.head.in_features == 5 * 2 * 2
    params = double(dict(model.named_parameters()))
    task = image_task(5, ways=3, shots=2, query=4, size=32, channels=3)
    torch.testing.assert_close(
        functional_call(model, params, (task.query_x,)), paper_conv4(params, task.query_x), rtol=1e-10, atol=1e-12
    )
    grads = GradientMetaLearner(model, 0.4, 1, False, True).outer_grad(params, [task])[0]
    expected = paper_meta_gradient(params, task)
    grads.pop("body.0.0.bias"), expected.pop("body.0.0.bias")  # cancels in BN: 0 (ours exactly), 1e-13 noise
    assert_params_close(grads, expected, rtol=1e-9, atol=1e-13)


def test_pixel_normalisation_is_part_of_the_model_and_no_parameter():
    """task.mean/std: the body normalises its input per channel, exactly as normalising the images first;
    the constants are neither meta-parameters nor in the state dict (they travel in the run config)."""
    torch.manual_seed(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain, normalising = Conv4(3, 4, 5, image_size=20), Conv4(3, 4, 5, image_size=20, pixels=(mean, std))
    params = dict(plain.named_parameters())
    assert [k for k, _ in normalising.named_parameters()] == list(params)
    assert normalising.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(6, 3, 20, 20)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ours = functional_call(normalising, params, (x,))
    assert torch.equal(ours, functional_call(plain, params, (normalised,)))
    assert not torch.allclose(ours, functional_call(plain, params, (x,)))


def test_conv4_float32_meta_gradient_is_accurate():
    """In float32 the folded first block (statistics in float64) stays within 1e-5 of the float64 truth."""
    model, params, task = conv4_setup(width=16, dtype=torch.float32)
    learner = GradientMetaLearner(model, inner_lr=0.4, inner_steps=1, first_order=False, classification=True)
    grads = learner.outer_grad(params, [task])[0]
    truth = paper_meta_gradient(
        double(params), dataclasses.replace(task, support_x=task.support_x.double(), query_x=task.query_x.double())
    )
    for k in truth:
        if k.endswith(".0.bias") and k.startswith("body."):
            continue  # conv biases before BN: true gradient 0, float32 gives rounding noise
        error = ((grads[k].double() - truth[k]).norm() / truth[k].norm()).item()
        assert error < 1e-5, (k, error)


def test_batchnorm_is_accurate_on_channels_last_input():
    """The first block hands channels-last memory on; PyTorch's channels-last BatchNorm kernel is ~50x
    less accurate (4e-5 here), so models.BatchNorm normalises on NCHW memory (8e-7 here)."""
    torch.manual_seed(0)
    x = (0.5 * torch.randn(75, 64, 28, 28) + 3).contiguous(memory_format=torch.channels_last)
    truth = F.batch_norm(x.double(), None, None, training=True)
    assert (BatchNorm(64)(x).double() - truth).abs().max() < 5e-6


# --- bn_stats: support (queries normalised by the support set's statistics) ----------------------


def paper_conv4_support(p: dict, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    """paper_conv4 on the queries with every BatchNorm's statistics taken from the support images."""
    s, q = support_x, query_x
    for i in range(4):
        s, q = (F.conv2d(x, p[f"body.{i}.0.weight"], p[f"body.{i}.0.bias"], padding=1) for x in (s, q))
        mean, var = s.mean((0, 2, 3), keepdim=True), s.var((0, 2, 3), correction=0, keepdim=True)
        w, b = (p[f"body.{i}.1.{k}"].view(1, -1, 1, 1) for k in ("weight", "bias"))
        s, q = (F.max_pool2d(F.relu((x - mean) / torch.sqrt(var + 1e-5) * w + b), 2) for x in (s, q))
    return F.linear(q.flatten(1), p["head.weight"], p["head.bias"])


def test_conv4_with_support_statistics_is_the_papers_network_normalised_by_the_support_set():
    """stats_rows=n: every block (the folded first one too) normalises all rows by the first n rows' statistics."""
    model, params, task = conv4_setup(width=6, dtype=torch.float64)
    n = len(task.support_x)
    ours = functional_call(model, params, (torch.cat([task.support_x, task.query_x]),), {"stats_rows": n})[n:]
    torch.testing.assert_close(ours, paper_conv4_support(params, task.support_x, task.query_x), rtol=1e-10, atol=1e-12)
    batch = functional_call(model, params, (task.query_x,))
    assert (ours - batch).abs().max() > 1e-3  # the query batch's own statistics give other outputs


def test_maml_meta_gradient_with_support_statistics_flows_through_the_statistics():
    """Training with bn_stats=support: the query loss's gradient includes the support statistics' dependence
    on the parameters (F.batch_norm with given statistics would drop it), against an unrolled reference."""
    model, params, task = conv4_setup(width=6, dtype=torch.float64)
    learner = GradientMetaLearner(model, 0.4, 1, False, True, bn_stats="support")
    grads = learner.outer_grad(params, [task])[0]
    theta = leaves(params)
    fast = sgd(theta, list(theta), F.cross_entropy(paper_conv4(theta, task.support_x), task.support_y), 0.4, True)
    query = F.cross_entropy(paper_conv4_support(fast, task.support_x, task.query_x), task.query_y)
    expected = dict(zip(theta, torch.autograd.grad(query, list(theta.values()))))
    grads.pop("body.0.0.bias"), expected.pop("body.0.0.bias")  # cancels in BN: 0 (ours exactly), 1e-13 noise
    assert_params_close(grads, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["maml-conv4", "anil-conv4"])
def test_vectorized_outer_grad_equals_the_task_loop_with_support_statistics(name):
    loop = dataclasses.replace(VMAP_CASES[name][0](), bn_stats="support")
    params = double(loop.init_params())
    tasks = [image_task(s, size=28) for s in (30, 31)]
    expected, _ = loop.outer_grad(params, tasks)
    grads, _ = dataclasses.replace(loop, vectorized=True).outer_grad(params, tasks)
    assert_params_close(grads, expected, rtol=1e-10, atol=1e-13)


def _bn_learners() -> dict:
    torch.manual_seed(0)
    conv = Conv4(1, 16, 5)
    return {
        "maml": maml(conv, inner_lr=0.4, steps=2, classification=True),
        "anil": maml(conv, inner_lr=0.4, steps=2, classification=True, head_only=True),
        "protonet": PrototypicalNetwork(Conv4(1, 16, None)),
    }


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
def test_with_support_statistics_a_query_does_not_depend_on_the_other_queries(name):
    """query_outputs of one image alone and inside a batch of 50: equal to 1e-6 with support statistics
    (not bitwise: the kernels may block a batch of 51 rows differently from one of 6), far apart with
    the batch's own."""
    task = image_task(3, ways=5, shots=1, query=10, size=28)
    queries = task.query_x.float()
    for bn_stats, close in (("support", True), ("batch", False)):
        algo = dataclasses.replace(_bn_learners()[name], bn_stats=bn_stats)
        adapted = algo.adapt_to(algo.init_params(), task.support_x.float(), task.support_y, 2)
        with torch.no_grad():
            alone = algo.query_outputs(adapted, task.support_x.float(), queries[:1])[0]
            together = algo.query_outputs(adapted, task.support_x.float(), queries)[0]
        assert torch.allclose(alone.softmax(-1), together.softmax(-1), rtol=0, atol=1e-6) == close, bn_stats


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
@pytest.mark.parametrize("bn_stats", ["batch", "support"])
def test_adapt_to_and_query_outputs_are_evaluates_computation(name, bn_stats):
    """Adapt once, predict many (the learner API) scores a task exactly as evaluate does."""
    algo = dataclasses.replace(_bn_learners()[name], bn_stats=bn_stats)
    params = algo.init_params()
    task = image_task(4, ways=5, shots=2, query=6, size=28)
    task = Task(task.support_x.float(), task.support_y, task.query_x.float(), task.query_y)
    adapted = algo.adapt_to(params, task.support_x, task.support_y, 3)
    with torch.no_grad():
        outputs = algo.query_outputs(adapted, task.support_x, task.query_x)
    metrics = algo.evaluate(params, task, 3)
    assert F.cross_entropy(outputs, task.query_y).item() == metrics["loss"]
    assert (outputs.argmax(-1) == task.query_y).float().mean().item() == metrics["accuracy"]


# --- ResNet-12 -------------------------------------------------------------------------------------


def ref_resnet12(p: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-12's body written out with torch.nn.functional (batch-statistics BatchNorm), as MetaOptNet's."""

    def bn(h, name):
        return F.batch_norm(h, None, None, p[f"{name}.weight"], p[f"{name}.bias"], training=True)

    for i in range(4):
        stage, h = f"body.{i}", x
        for j in range(3):
            h = bn(F.conv2d(h, p[f"{stage}.convs.{j}.weight"], padding=1), f"{stage}.norms.{j}")
            h = F.leaky_relu(h, 0.1) if j < 2 else h
        shortcut = bn(F.conv2d(x, p[f"{stage}.shortcut.weight"]), f"{stage}.shortcut_norm")
        x = F.max_pool2d(F.leaky_relu(h + shortcut, 0.1), 2)
    return x.mean((2, 3))


def test_resnet12_is_metaoptnets_network():
    """Width 64: the 64-160-320-640 stages; any input size ends in 10 x width averaged features; the
    module's function is the written-out one (float64)."""
    stages = ResNet12(3, 64, 5).body[:4]
    assert [(s.convs[0].in_channels, s.convs[0].out_channels) for s in stages] == [
        (3, 64),
        (64, 160),
        (160, 320),
        (320, 640),
    ]
    torch.manual_seed(0)
    model = ResNet12(3, 4, 5)
    params = double(dict(model.named_parameters()))
    for size in (84, 16):
        x = torch.rand(3, 3, size, size, dtype=torch.float64)
        assert functional_call(
            model.body, {k[5:]: v for k, v in params.items() if k.startswith("body.")}, (x,)
        ).shape == (3, 40)
        torch.testing.assert_close(
            functional_call(model, params, (x,)), ref_head(params, ref_resnet12(params, x)), rtol=1e-10, atol=1e-12
        )


def resnet12_reference(name: str, params: dict, task: Task, lr: float, steps: int) -> dict:
    """Each algorithm's outer gradient on one task, unrolled by hand through ref_resnet12."""
    full = lambda p, x: ref_head(p, ref_resnet12(p, x))
    theta = leaves(params)
    if name == "protonet":
        support, query = ref_resnet12(theta, task.support_x), ref_resnet12(theta, task.query_x)
        prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(int(task.support_y.max()) + 1)])
        loss = F.cross_entropy(-(torch.cdist(query, prototypes) ** 2), task.query_y)
        return dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    if name == "reptile":
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        fast = leaves(params)
        for _ in range(steps):
            fast = leaves(sgd(fast, list(fast), F.cross_entropy(full(fast, x), y), lr, False))
        return {k: params[k] - fast[k].detach() for k in params}
    weights = [k for k in theta if not k.startswith(INNER_LR)]
    if name == "anil":  # features once; only the head adapts
        zs, zq, predict = ref_resnet12(theta, task.support_x), ref_resnet12(theta, task.query_x), ref_head
        names = ["head.weight", "head.bias"]
    else:
        zs, zq, predict, names = task.support_x, task.query_x, full, weights
    rate = {k: theta[INNER_LR + k] for k in names} if name == "metasgd" else lr
    fast = dict(theta)
    for _ in range(steps):
        fast = sgd(fast, names, F.cross_entropy(predict(fast, zs), task.support_y), rate, name != "fomaml")
    query = F.cross_entropy(predict(fast, zq), task.query_y)
    return dict(zip(theta, torch.autograd.grad(query, list(theta.values()))))


def resnet12_learner(name: str):
    torch.manual_seed(0)
    if name == "protonet":
        return PrototypicalNetwork(ResNet12(3, 2, None))
    model = ResNet12(3, 2, 2)
    if name == "reptile":
        return Reptile(model, 0.3, 2, True, True)
    return maml(
        model, 0.3, 2, first_order=name == "fomaml", classification=True,
        head_only=name == "anil", learn_inner_lr=name == "metasgd",
    )  # fmt: skip


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "protonet", "anil", "metasgd"])
def test_every_algorithms_meta_gradient_on_a_tiny_resnet12_matches_the_unrolled_reference(name):
    """Widths 2-5-10-20 on 2-way RGB 16x16 tasks, float64; second-order MAML also against finite differences."""
    algo = resnet12_learner(name)
    params = double(algo.init_params())
    task = image_task(40, ways=2, shots=2, query=2, size=16, channels=3)
    grads, metrics = algo.outer_grad(params, [task])
    assert metrics["tasks"] == 1
    assert_params_close(grads, resnet12_reference(name, params, task, 0.3, 2))
    if name == "maml":

        def objective(p):
            fast = leaves(p)
            for _ in range(2):
                loss = F.cross_entropy(functional_call(algo.model, fast, (task.support_x,)), task.support_y)
                fast = leaves(sgd(fast, list(fast), loss, 0.3, False))
            with torch.no_grad():
                return F.cross_entropy(functional_call(algo.model, fast, (task.query_x,)), task.query_y).item()

        # A sharp objective (tiny BatchNorm batches, eta 0.3): central differences converge only below 1e-7.
        for d in random_directions(params, 2):
            assert dot(grads, d) == pytest.approx(directional_fd(objective, params, d, eps=1e-8), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("dropblock", [0.0, 0.3], ids=["plain", "dropblock"])
def test_a_resnet12_chunks_gradient_does_not_depend_on_the_worker_or_what_it_computed_before(cifar10_source, dropblock):
    """What makes runs bitwise the same for 1 or 2 actors: each chunk's row is a function of its seeds
    alone. One worker computing all 4 chunks, two fresh workers 2 each, and the first worker again in
    reverse order give identical rows (real RGB photographs through the task pipeline), with
    model.dropblock's masks too (drawn from each task's seed)."""
    from platform import engine
    from platform.tasks import iteration_seeds

    overrides = ["task.kind=folder", f"task.data={cifar10_source}", "task.channels=3", "task.image_size=16"]
    overrides += ["task.ways=2", "task.shots=1", "task.query=2", "task.flip=true", "task.crop_padding=2"]
    overrides += ["model.kind=resnet12", "model.width=2", "optim.meta_batch=4", "optim.chunk=1"]
    config = load_config(None, [*overrides, f"model.dropblock={dropblock}"]).model_dump(mode="json")
    threads = torch.get_num_threads()
    try:
        workers = [engine.AdaptationWorker(config) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)  # the worker pins its process to cpus_per_worker threads
    flat = engine.flatten(workers[0].template)
    chunks = chunked(iteration_seeds(0, 0, 4), 1)
    alone = workers[0].outer_grads(flat, chunks).grads
    shared = np.concatenate(
        [workers[1].outer_grads(flat, chunks[:2]).grads, workers[2].outer_grads(flat, chunks[2:]).grads]
    )
    again = workers[0].outer_grads(flat, chunks[::-1]).grads[::-1]
    assert np.array_equal(alone, shared) and np.array_equal(alone, again)
    assert len({row.tobytes() for row in alone}) == 4 and np.abs(alone).max() > 0


# --- memory options: recomputed blocks, bf16 --------------------------------------------------------


def with_body_options(algo, recompute: bool = False, autocast_dtype=None):
    model = algo.model
    model.body.recompute, model.body.autocast_dtype = recompute, autocast_dtype
    return algo


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "protonet", "anil", "metasgd"])
def test_recomputed_blocks_give_the_same_bits_and_keep_only_block_inputs(name):
    """model.recompute (activation checkpointing) recomputes each block in the backward passes, second
    order included, from its explicitly passed (adapted) weights: bitwise the same outer gradient in
    float32, with a fraction of the forward's saved tensors."""
    task = image_task(41, ways=2, shots=2, query=3, size=16, channels=3)
    task = dataclasses.replace(task, support_x=task.support_x.float(), query_x=task.query_x.float())
    plain = resnet12_learner(name)
    params = plain.init_params()
    recomputing = with_body_options(resnet12_learner(name), recompute=True)
    expected, _ = plain.outer_grad(params, [task])
    grads, _ = recomputing.outer_grad(params, [task])
    assert all(torch.equal(grads[k], expected[k]) for k in expected)

    def saved_bytes(algo) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        leaves_ = {k: v.detach().requires_grad_() for k, v in params.items() if not k.startswith(INNER_LR)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(algo.model, leaves_, (task.query_x,))
        return total

    assert saved_bytes(recomputing) * 3 < saved_bytes(plain)  # 4.9x here; 28x for 75 queries at 64x64


def test_recompute_and_vmap_do_not_go_together():
    """torch.func's transforms refuse checkpointing's saved-tensor hooks: auto keeps the loop, vmap is refused;
    the MLP has no blocks to recompute (nor to run in bf16)."""
    config = RunConfig.model_validate({"task": {"kind": "omniglot"}, "model": {"kind": "conv4", "recompute": True}})
    assert not vectorized(config, "cpu") and not vectorized(config, "cuda")
    conv4 = ["task.kind=omniglot", "model.kind=conv4", "model.recompute=true"]
    with pytest.raises(Exception, match="resources.vectorize = 'vmap': not with model.recompute"):
        load_config(None, [*conv4, "resources.vectorize=vmap"])
    for field in ("model.recompute=true", "model.precision=bf16"):
        with pytest.raises(Exception, match="for the convolutional bodies .conv4, resnet12.; the MLP has no blocks"):
            load_config(None, [field])


@pytest.mark.parametrize("name", ["fomaml", "protonet"])
def test_bf16_keeps_parameters_and_outputs_in_float32_and_the_meta_gradient_close(name):
    """model.precision bf16: autocast in the body (BatchNorm's statistics in float32), the head, losses
    and every gradient in float32; Conv4-32's outer gradient points where float32's does (bf16 has 8
    bits of mantissa: a width-2 ResNet-12 with eta 0.3 is too sharp for it, cosine 0.13)."""
    g = torch.Generator().manual_seed(43)
    x, y = torch.rand(20, 1, 28, 28, generator=g), torch.arange(5).repeat(4)
    task = Task(x[:5], y[:5], x[5:], y[5:])
    torch.manual_seed(0)
    model = Conv4(1, 32, None if name == "protonet" else 5)
    if name == "protonet":
        algo = PrototypicalNetwork(model)
    else:
        algo = maml(model, 0.01, 1, first_order=True, classification=True)
    params = algo.init_params()
    expected, _ = algo.outer_grad(params, [task])
    model.body.autocast_dtype = torch.bfloat16
    assert functional_call(model, params, (task.query_x,)).dtype == torch.float32
    grads, _ = algo.outer_grad(params, [task])
    assert all(g.dtype == torch.float32 for g in grads.values())
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])
    assert F.cosine_similarity(flat(grads), flat(expected), 0) > 0.9
    assert not torch.equal(flat(grads), flat(expected))  # bf16 arithmetic did happen


def test_dropblock_drops_blocks_at_about_its_rate_and_keeps_the_mean():
    torch.manual_seed(0)
    out = drop_block(torch.ones(64, 32, 10, 10), 0.1)
    dropped = out == 0
    assert 0.07 < dropped.float().mean() < 0.13 and out.mean().item() == pytest.approx(1.0)
    # Every dropped pixel lies in a wholly dropped 5x5 block: the opening (erosion, then dilation) of
    # the dropped map by a 5x5 square covers it.
    eroded = -F.max_pool2d(-dropped.float(), 5, stride=1)
    opened = F.max_pool2d(F.pad(eroded, [4] * 4), 5, stride=1)
    assert opened.shape == dropped.shape and bool((opened.bool() | ~dropped).all())


def test_dropblock_masks_come_from_the_task_seed_in_training_only():
    """model.dropblock changes the outer gradient (masks drawn from the task's seed: the same seed,
    the same gradient; another seed, another), and nothing at meta-test or adaptation."""
    cfg = lambda rate: RunConfig.model_validate({
        "task": {"kind": "folder", "ways": 2, "shots": 1, "query": 2, "image_size": 16, "channels": 3},
        "model": {"kind": "resnet12", "width": 2, "dropblock": rate}, "algorithm": "maml",
    })  # fmt: skip
    _, plain, params = build(cfg(0.0))
    _, dropping, _ = build(cfg(0.5))
    task = image_task(44, ways=2, shots=1, query=2, size=16, channels=3)
    task = dataclasses.replace(task, support_x=task.support_x.float(), query_x=task.query_x.float())
    seeded = lambda seed: dataclasses.replace(task, seed=seed)
    flat = lambda g: torch.cat([v.flatten() for v in g[0].values()])
    reference = flat(plain.outer_grad(params, [seeded(1)]))
    masked = flat(dropping.outer_grad(params, [seeded(1)]))
    assert not torch.equal(masked, reference)
    assert torch.equal(flat(dropping.outer_grad(params, [seeded(1)])), masked)
    assert not torch.equal(flat(dropping.outer_grad(params, [seeded(2)])), masked)
    assert dropping.evaluate(params, seeded(1), 2) == plain.evaluate(params, seeded(1), 2)
    adapted = dropping.adapt_to(params, task.support_x, task.support_y, 2)
    assert torch.equal(dropping.query_outputs(adapted, task.support_x, task.query_x),
                       plain.query_outputs(plain.adapt_to(params, task.support_x, task.support_y, 2),
                                           task.support_x, task.query_x))  # fmt: skip
    with pytest.raises(ValueError, match="from its seed: this task has none"):
        dropping.outer_grad(params, [task])


def test_dropblock_is_a_resnet12_option_and_not_vectorised():
    with pytest.raises(Exception, match="model.dropblock = 0.1: only for model.kind 'resnet12'"):
        load_config(None, ["model.dropblock=0.1"])
    config = RunConfig.model_validate({"task": {"kind": "folder"}, "model": {"kind": "resnet12", "dropblock": 0.1}})
    assert not vectorized(config, "cuda")
