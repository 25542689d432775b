"""Test-time adaptation of a pre-trained embedding (algorithm pretrain, RFS: Tian et al. 2020): the
backbone stays frozen, and a linear classifier is fitted on each task's support embeddings.

The embedding is the model's body, L2-normalised (as RFS). `probe` is "logistic": multinomial logistic
regression with sklearn's default objective, 0.5 ||W||^2 + C * sum of cross-entropies (C = 1, the
intercept not penalised), minimised by L-BFGS in torch, so it runs on the learner's device and is the
same computation in meta-test, the adaptation API, the MLflow model and Ray Serve; or "centroid": the
nearest class mean (logits: negative squared distances, as ProtoNets). The pre-training classifier
head (`head.*`, over the meta-training classes) is not used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from platform.algorithms import Params, PrototypicalNetwork, _score, _stats

PROBE_WEIGHT, PROBE_BIAS = "probe.weight", "probe.bias"  # adapt_to's fitted classifier, beside the parameters
LOGISTIC_C = 1.0  # sklearn's and RFS's default inverse regularisation strength
LBFGS_STEPS = 100


def fit_logistic(z: torch.Tensor, y: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (ways, d), bias (ways,)) minimising 0.5 ||W||^2 + C * sum_i CE(z_i W^T + b, y_i): a strictly
    convex problem, so L-BFGS reaches sklearn's LogisticRegression optimum. Deterministic on CPU."""
    z = z.detach()
    weight = torch.zeros(ways, z.shape[1], dtype=z.dtype, device=z.device, requires_grad=True)
    bias = torch.zeros(ways, dtype=z.dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=LBFGS_STEPS, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )

    def objective():
        optimizer.zero_grad()
        loss = LOGISTIC_C * F.cross_entropy(z @ weight.T + bias, y, reduction="sum") + 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()


@dataclass(frozen=True, eq=False)
class EmbeddingProbe:
    """The pre-trained body, frozen, with a per-task linear probe. `model` has no head (models.build_model)."""

    model: nn.Module
    probe: str = "logistic"
    bn_stats: str = "batch"

    def init_params(self) -> Params:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def _embed(self, params: Params, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        body = {k: v for k, v in params.items() if k in self._names}
        return F.normalize(functional_call(self.model, body, (x,), _stats(stats_rows)), dim=1)

    @property
    def _names(self) -> set[str]:
        return {k for k, _ in self.model.named_parameters()}

    def _embed_queries(self, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        if self.bn_stats == "batch":
            return self._embed(params, query_x)
        n = len(support_x)
        return self._embed(params, torch.cat([support_x, query_x]), n)[n:]

    def adapt_to(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> Params:
        """The parameters and the probe fitted to the support set (PROBE_WEIGHT, PROBE_BIAS); `steps` is ignored."""
        with torch.no_grad():
            z = self._embed(params, support_x)
        ways = int(support_y.max()) + 1
        if self.probe == "centroid":
            weight, bias = PrototypicalNetwork._prototypes(z, support_y), torch.zeros(ways, device=z.device)
        else:
            weight, bias = fit_logistic(z, support_y, ways)
        return params | {PROBE_WEIGHT: weight, PROBE_BIAS: bias}

    def query_outputs(self, adapted: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Logits at query_x of adapt_to's probe."""
        with torch.no_grad():
            z = self._embed_queries(adapted, support_x, query_x)
        if self.probe == "centroid":
            return PrototypicalNetwork._distances(z, adapted[PROBE_WEIGHT])
        return z @ adapted[PROBE_WEIGHT].T + adapted[PROBE_BIAS]

    def evaluate(self, params: Params, task, steps: int) -> dict:
        adapted = self.adapt_to(params, task.support_x, task.support_y, steps)
        loss, acc = _score(self.query_outputs(adapted, task.support_x, task.query_x), task.query_y, True)
        return {"loss": loss.item(), "accuracy": acc.item()}
