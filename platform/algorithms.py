"""Meta-learning algorithms as small functions of a parameter dict and tasks.

Every algorithm offers the same three operations, which is all the engine calls:

    init_params()                -> Params                 the meta-parameters to learn
    outer_grad(params, tasks)    -> (Params, Metrics)      SUM over the tasks of the outer gradient
    evaluate(params, task, steps)-> Metrics                adapt on the support set, score on the query set

Nothing here knows about Ray, tracking or the outer optimiser: the driver averages the sums and
applies the meta-update. `params` maps names to tensors; the model object is only a function
(`torch.func.functional_call`), so no module is ever cloned per task.

`bn_stats` says how query predictions are normalised (models.py): "batch", by the query batch's own
statistics (the papers' transductive protocol), or "support", by the support set's, so that a
query's prediction does not depend on the other queries. The support set is always processed on
its own (its batch statistics are the support statistics). For "adapt once, predict many" (the
learner API, platform/learner.py) both kinds offer `adapt_to(params, support_x, support_y, steps)`
and `query_outputs(adapted, support_x, query_x)`: the same computation as `evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from platform.config import VECTORIZABLE, RunConfig
from platform.models import MLP, build_model, drawing_masks
from platform.tasks import Task

Params = dict[str, torch.Tensor]
Metrics = dict[str, float]

INNER_LR = "inner_lr."  # Meta-SGD: prefix of the learned per-parameter inner learning rates
PROTOTYPES = "prototypes"  # ProtoNets: adapt_to's class means, kept beside the parameters
BN_STATS = ("batch", "support")


def _stats(rows: int | None) -> dict:
    """functional_call's kwargs: normalise by the first `rows` rows (None: by the whole batch, as before)."""
    return {} if rows is None else {"stats_rows": rows}


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _score(outputs: torch.Tensor, targets: torch.Tensor, classification: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy); accuracy is 0 for regression."""
    if classification:
        return F.cross_entropy(outputs, targets), (outputs.argmax(-1) == targets).float().mean()
    return F.mse_loss(outputs, targets), torch.zeros(())


def _leaves(params: Params) -> Params:
    """Fresh autograd leaves with the same values: what the outer gradient is taken against."""
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def _sum_over_tasks(model: nn.Module, params: Params, tasks: list[Task], task_grad) -> tuple[Params, Metrics]:
    """Sum `task_grad(leaves, task) -> (grads, loss, accuracy)` over tasks, in order, each with the
    model's training-time masks (if any) drawn from the task's seed."""
    params = _leaves(params)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    loss_sum = acc_sum = 0.0
    for task in tasks:
        with drawing_masks(model, task.seed, task.support_x.device):
            grads, loss, acc = task_grad(params, task)
        for k, g in grads.items():
            if g is not None:  # a Meta-SGD rate of an unused parameter
                total[k] += g
        loss_sum, acc_sum = loss_sum + loss.item(), acc_sum + acc.item()
    return total, {"loss": loss_sum, "accuracy": acc_sum, "tasks": len(tasks)}


@dataclass(frozen=True, eq=False)
class GradientMetaLearner:
    """MAML (second or first order), ANIL (`head_only`) and Meta-SGD (`learn_inner_lr`).

    The inner loop is plain gradient descent on the support loss. With `head_only` the body is not
    adapted, so its features are computed once per task and only the head runs in the inner loop.

    `vectorized` computes a list of tasks as one batched computation (`torch.func.vmap` over a
    per-task `torch.func.grad`) instead of one task after another: the same meta-gradient, for
    devices where one big kernel beats many small ones (GPUs). On CPU the loop is faster.
    """

    model: nn.Module
    inner_lr: float
    inner_steps: int
    first_order: bool
    classification: bool
    head_only: bool = False
    learn_inner_lr: bool = False
    vectorized: bool = False
    bn_stats: str = "batch"

    def init_params(self) -> Params:
        params = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        if self.learn_inner_lr:
            params |= {INNER_LR + k: torch.full_like(params[k], self.inner_lr) for k in self._adapted(params)}
        return params

    def _adapted(self, params: Params) -> list[str]:
        return [k for k in params if not k.startswith(INNER_LR) and (not self.head_only or k.startswith("head."))]

    def _encode(self, params: Params, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        if not self.head_only:
            return x
        return functional_call(self.model.body, _sub(params, "body."), (x,), _stats(stats_rows))

    def _predict(self, params: Params, z: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        if self.head_only:  # the head normalises nothing
            return functional_call(self.model.head, _sub(params, "head."), (z,))
        weights = {k: v for k, v in params.items() if not k.startswith(INNER_LR)}
        return functional_call(self.model, weights, (z,), _stats(stats_rows))

    def _support_normalised(self, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Outputs at query_x normalised by the support set's statistics: [support; query] through the
        network with statistics from the support rows, query rows kept."""
        n, x = len(support_x), torch.cat([support_x, query_x])
        if self.head_only:
            return self._predict(params, self._encode(params, x, n)[n:])
        return self._predict(params, x, n)[n:]

    def query_outputs(self, adapted: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Outputs at query_x of parameters adapted to support_x (adapt_to), normalised per bn_stats."""
        if self.bn_stats == "support":
            return self._support_normalised(adapted, support_x, query_x)
        return self._predict(adapted, self._encode(adapted, query_x))

    def adapt_to(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> Params:
        """The parameters after `steps` inner steps on a support set, detached: adapt once, predict many."""
        params = _leaves(params)
        fast = self.adapt(params, self._encode(params, support_x), support_y, steps, create_graph=False)
        return {k: v.detach() for k, v in fast.items()}

    def adapt(self, params: Params, z: torch.Tensor, y: torch.Tensor, steps: int, create_graph: bool) -> Params:
        """`steps` of gradient descent on (z, y); differentiable through the steps when `create_graph`."""
        names = self._adapted(params)
        for _ in range(steps):
            loss, _ = _score(self._predict(params, z), y, self.classification)
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
            params = self._descend(params, dict(zip(names, grads)))
        return params

    def _descend(self, params: Params, grads: Params) -> Params:
        """One inner step on the adapted parameters: a scalar rate, or Meta-SGD's learned per-parameter rates."""
        lr = {k: params[INNER_LR + k] if self.learn_inner_lr else self.inner_lr for k in grads}
        return params | {k: params[k] - lr[k] * g for k, g in grads.items()}

    def query_loss(self, params: Params, task: Task, steps: int, create_graph: bool):
        zs = self._encode(params, task.support_x)
        zq = self._encode(params, task.query_x) if self.bn_stats == "batch" else None
        fast = self.adapt(params, zs, task.support_y, steps, create_graph)
        outputs = (
            self._support_normalised(fast, task.support_x, task.query_x) if zq is None else self._predict(fast, zq)
        )
        return _score(outputs, task.query_y, self.classification)

    def outer_grad(self, params: Params, tasks: list[Task]) -> tuple[Params, Metrics]:
        if self.vectorized and isinstance(self.model, MLP):
            return self._outer_grad_batched(params, tasks)
        if self.vectorized:
            return self._outer_grad_vmap(params, tasks)

        def task_grad(params: Params, task: Task):
            loss, acc = self.query_loss(params, task, self.inner_steps, create_graph=not self.first_order)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            return dict(zip(params, grads)), loss, acc

        return _sum_over_tasks(self.model, params, tasks, task_grad)

    def _functional_query_loss(self, params: Params, support_x, support_y, query_x, query_y):
        """query_loss for one task written with torch.func transforms, so that vmap can batch it."""
        zs = self._encode(params, support_x)
        zq = self._encode(params, query_x) if self.bn_stats == "batch" else None
        names, fast = self._adapted(params), params
        for _ in range(self.inner_steps):
            grads = torch.func.grad(self._support_loss)({k: fast[k] for k in names}, fast, zs, support_y)
            if self.first_order:  # detached at the outer level: no gradient through the inner step
                grads = {k: g.detach() for k, g in grads.items()}
            fast = self._descend(fast, grads)
        outputs = self._support_normalised(fast, support_x, query_x) if zq is None else self._predict(fast, zq)
        loss, acc = _score(outputs, query_y, self.classification)
        return loss, (loss, acc)

    def _support_loss(self, adapted: Params, params: Params, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _score(self._predict(params | adapted, z), y, self.classification)[0]

    def _outer_grad_vmap(self, params: Params, tasks: list[Task]) -> tuple[Params, Metrics]:
        batch = [torch.stack([getattr(t, f) for t in tasks]) for f in ("support_x", "support_y", "query_x", "query_y")]
        params = {k: v.detach() for k, v in params.items()}
        per_task = torch.func.grad(self._functional_query_loss, has_aux=True)
        grads, (loss, acc) = torch.func.vmap(per_task, in_dims=(None, 0, 0, 0, 0))(params, *batch)
        total = {k: g.sum(0) for k, g in grads.items()}
        return total, {"loss": loss.sum().item(), "accuracy": acc.sum().item(), "tasks": len(tasks)}

    def _outer_grad_batched(self, params: Params, tasks: list[Task]) -> tuple[Params, Metrics]:
        """The vmap path's computation for the MLP, written out with batched matmuls (models.MLP.batched)
        instead of torch.func: each adapted parameter expanded to one copy per task, the tasks' losses
        summed (each task's inner gradient is then its own), and the meta-gradient's sum over tasks
        autograd's, through the expands. A third of vmap's time per call for the sinusoid's chunks,
        and no torch._dynamo import at an actor's first call (torch.func.grad's, ~1-2 s); the same
        meta-gradient to float64 rounding (tests/test_algorithms.py). The MLP normalises nothing, so
        bn_stats changes nothing here."""
        batch = [torch.stack([getattr(t, f) for t in tasks]) for f in ("support_x", "support_y", "query_x", "query_y")]
        leaves = _leaves(params)
        names = self._adapted(leaves)
        fast = leaves | {k: leaves[k].expand(len(tasks), *leaves[k].shape) for k in names}
        for _ in range(self.inner_steps):
            loss = self._batched_score(fast, batch[0], batch[1])[0].sum()
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not self.first_order)
            fast = self._descend(fast, dict(zip(names, grads)))
        loss, acc = self._batched_score(fast, batch[2], batch[3])
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
        total = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
        return total, {"loss": loss.sum().item(), "accuracy": acc.sum().item(), "tasks": len(tasks)}

    def _batched_score(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task (loss, accuracy) of the MLP on a batch of tasks (x: (T, n, ...)); accuracy 0 for regression."""
        outputs = self.model.batched({k: v for k, v in params.items() if not k.startswith(INNER_LR)}, x)
        if self.classification:
            losses = F.cross_entropy(outputs.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            return losses.mean(1), (outputs.argmax(-1) == y).float().mean(1)
        return F.mse_loss(outputs, y, reduction="none").flatten(1).mean(1), torch.zeros(len(x))

    def adapted_predict(self, params: Params, task: Task, x: torch.Tensor, steps: int) -> torch.Tensor:
        """Predictions at `x` after `steps` inner steps on the task's support set."""
        params = _leaves(params)
        fast = self.adapt(params, self._encode(params, task.support_x), task.support_y, steps, create_graph=False)
        if self.bn_stats == "support":
            return self._support_normalised(fast, task.support_x, x).detach()
        return self._predict(fast, self._encode(params, x)).detach()

    def evaluate(self, params: Params, task: Task, steps: int) -> Metrics:
        params = _leaves(params)  # the inner loop needs gradients; nothing flows back out
        if self.bn_stats == "support":
            unadapted = self._support_normalised(params, task.support_x, task.query_x)
        else:
            unadapted = self._predict(params, self._encode(params, task.query_x))
        before = _score(unadapted, task.query_y, self.classification)
        after = self.query_loss(params, task, steps, create_graph=False)
        return {
            "loss_before": before[0].item(),
            "accuracy_before": before[1].item(),
            "loss": after[0].item(),
            "accuracy": after[1].item(),
        }


@dataclass(frozen=True, eq=False)
class Reptile(GradientMetaLearner):
    """Reptile: the outer 'gradient' of a task is theta - theta_adapted (Nichol et al. 2018).

    The inner loop trains on all of a training task's examples (support and query together) and
    never builds a graph: it predicts no query, so `bn_stats` changes its evaluation only.
    Evaluation is the same as MAML's: adapt on support, score on query.
    """

    def outer_grad(self, params: Params, tasks: list[Task]) -> tuple[Params, Metrics]:
        def task_grad(params: Params, task: Task):
            x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
            fast = params
            for _ in range(self.inner_steps):
                fast = _leaves(self.adapt(fast, x, y, 1, create_graph=False))
            loss, acc = _score(self._predict(fast, x), y, self.classification)
            return {k: (params[k] - fast[k]).detach() for k in params}, loss, acc

        return _sum_over_tasks(self.model, params, tasks, task_grad)


@dataclass(frozen=True, eq=False)
class PrototypicalNetwork:
    """Prototypical Networks (Snell et al. 2017): logits are negative squared distances to class means."""

    model: nn.Module
    bn_stats: str = "batch"

    def init_params(self) -> Params:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def _embed_queries(self, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        if self.bn_stats == "batch":
            return functional_call(self.model, params, (query_x,))
        n = len(support_x)
        return functional_call(self.model, params, (torch.cat([support_x, query_x]),), _stats(n))[n:]

    @staticmethod
    def _prototypes(support: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        ways = int(support_y.max()) + 1
        counts = torch.bincount(support_y, minlength=ways).unsqueeze(1).to(support.dtype)
        prototypes = torch.zeros(ways, support.shape[1], dtype=support.dtype, device=support.device)
        return prototypes.index_add(0, support_y, support) / counts

    @staticmethod
    def _distances(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return -((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(-1)

    def logits(self, params: Params, task: Task) -> torch.Tensor:
        support = functional_call(self.model, params, (task.support_x,))
        query = self._embed_queries(params, task.support_x, task.query_x)
        return self._distances(query, self._prototypes(support, task.support_y))

    def adapt_to(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> Params:
        """The parameters and the class prototypes (under PROTOTYPES); `steps` is ignored: no inner loop."""
        with torch.no_grad():
            prototypes = self._prototypes(functional_call(self.model, params, (support_x,)), support_y)
        return params | {PROTOTYPES: prototypes}

    def query_outputs(self, adapted: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Logits at query_x: negative squared distances to adapt_to's prototypes."""
        params = {k: v for k, v in adapted.items() if k != PROTOTYPES}
        return self._distances(self._embed_queries(params, support_x, query_x), adapted[PROTOTYPES])

    def outer_grad(self, params: Params, tasks: list[Task]) -> tuple[Params, Metrics]:
        def task_grad(params: Params, task: Task):
            loss, acc = _score(self.logits(params, task), task.query_y, True)
            return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), loss, acc

        return _sum_over_tasks(self.model, params, tasks, task_grad)

    def evaluate(self, params: Params, task: Task, steps: int) -> Metrics:
        with torch.no_grad():
            loss, acc = _score(self.logits(params, task), task.query_y, True)
        return {"loss": loss.item(), "accuracy": acc.item()}


def vectorized(config: RunConfig, device: torch.device | str) -> bool:
    """resources.vectorize resolved for a device: `auto` batches tasks with vmap on GPUs, and on CPU for
    the MLP, whose per-task loop is all per-operation overhead (vmap's cost is ~per call, not per task:
    6x faster than the loop for a 25-task chunk); conv4 keeps the loop on CPU, where vmap's grouped
    convolutions are 2.2-2.4x slower (docs/benchmarks.md)."""
    choice = config.resources.vectorize
    if choice != "auto":
        return choice == "vmap"
    if config.model.recompute or config.model.dropblock:  # checkpointing's saved-tensor hooks; masks per task
        return False
    batches_well = torch.device(device).type == "cuda" or config.model.kind == "mlp"
    return batches_well and config.algorithm in VECTORIZABLE


def build_algorithm(config: RunConfig, model: nn.Module, device: torch.device | str = "cpu"):
    """The algorithm object for a run config on a device (`steps` for training come from optim.inner_steps)."""
    if config.algorithm == "protonet":
        return PrototypicalNetwork(model, bn_stats=config.model.bn_stats)
    if config.algorithm == "pretrain":
        from platform.probe import EmbeddingProbe  # imported here: probe.py builds on this module

        return EmbeddingProbe(model, probe=config.pretrain.probe, bn_stats=config.model.bn_stats)
    cls = Reptile if config.algorithm == "reptile" else GradientMetaLearner
    return cls(
        model=model,
        inner_lr=config.optim.inner_lr,
        inner_steps=config.optim.inner_steps,
        first_order=config.first_order,
        classification=config.classification,
        head_only=config.algorithm == "anil",
        learn_inner_lr=config.algorithm == "metasgd",
        vectorized=vectorized(config, device),
        bn_stats=config.model.bn_stats,
    )


def build(config: RunConfig, device: torch.device | str = "cpu"):
    """(model, algorithm for `device`, initial meta-parameters): the same in the driver and in every actor.
    The initial parameters are drawn from `config.seed`; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config)
    algorithm = build_algorithm(config, model, device)
    return model, algorithm, algorithm.init_params()
