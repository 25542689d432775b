"""Fast adaptation as a product: adapt a trained meta-learner to your own few labelled examples, then predict.

    learner = load_learner("checkpoints/omniglot-5w1s")    # checkpoint file, folder, s3://, runs:/..., models:/...
    adapted = learner.adapt(["a1.png", "b1.png"], ["alpha", "beta"])     # adapt once ...
    adapted.predict(["q1.png", "q2.png"]).labels                        # ... predict many: ['beta', 'alpha']

It is meta-test's computation (`platform.algorithms`' adapt_to / query_outputs, what `evaluate`
runs): the run's inner rate (Meta-SGD: its learned per-parameter rates) for `optim.test_inner_steps`
steps unless told otherwise; ProtoNets build prototypes; pretrain fits its probe (platform/probe.py).

Labels are the user's own names (all strings or all integers, in any order). They are sorted, and
the i-th name becomes class i. ProtoNets and pretrain take any number of labels. A MAML-family model has a head
of as many outputs as the ways it was trained on: k < that many labels use the head's first k
outputs (its first k rows, and Meta-SGD's rates for them), a k-way classifier whose softmax is over
the user's labels only; more labels than outputs are an error.

Normalisation (`bn_stats`): "support" (the default here) normalises the queries with the support
set's BatchNorm statistics, so a query's prediction does not depend on the other queries sent with
it; "batch" is the papers' transductive protocol, where it does (models.py).

Inputs: image files (any size, grayscale or RGB, PNG/JPEG/...: converted exactly as the training
data, `platform.images`, to the run's task.image_size and task.channels), or float arrays / tensors
(n, C, S, S) in [0, 1], C and S the run's channels and image size ((n, S, S) for one channel; one
channel is ink high); the model normalises them by the run's task.mean/std itself. For regression,
x and y as numbers (n,) or (n, 1). Bad input raises InputError, one line per
problem naming the field.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from platform.algorithms import BN_STATS, INNER_LR, Params, build
from platform.checkpoint import load_checkpoint
from platform.config import EMBEDDING_ALGORITHMS, ConfigError, RunConfig
from platform.images import DataError, ImageFormat
from platform.tasks import model_input

MLFLOW_URIS = ("runs:/", "models:/")


class InputError(ConfigError):
    """Bad support or query input: one line per problem, naming the field, the value and the rule."""


def load_images(paths: Sequence[str | os.PathLike], image_format: ImageFormat) -> torch.Tensor:
    """Image files as the model's input, (n, *image_format.shape) float32: decoded as the training data
    was (platform.images), then /255 as in tasks.py. Every unreadable file is named at once."""
    arrays, problems = [], []
    for path in paths:
        try:
            arrays.append(image_format.decode(Path(path).read_bytes, str(path)))
        except DataError as e:
            problems.append(str(e))
    if problems:
        raise InputError(problems)
    return model_input(np.stack(arrays))


def _is_path_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, (str, os.PathLike)) for v in x)


def _stacked(x, field: str) -> np.ndarray | torch.Tensor:
    """A list of examples as one array; InputError naming the first example of another shape."""
    shapes = [tuple(np.shape(v)) for v in x]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise InputError([f"{field}: examples have different shapes: {shapes[0]} at 0, {shape} at {i}"])
    return torch.stack([torch.as_tensor(v) for v in x]) if torch.is_tensor(x[0]) else np.stack(x)


def _labels(y, count: int, field: str = "support_y") -> tuple[tuple, torch.Tensor]:
    """(the sorted label names, each example's class index)."""
    values = y.tolist() if isinstance(y, (np.ndarray, torch.Tensor)) else list(y)
    if len(values) != count:
        raise InputError([f"{field}: {len(values)} labels for {count} support examples; give one label per example"])
    kinds = {type(v) for v in values}
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (str, int))]
    if bad:
        raise InputError([f"{field}: label {bad[0]!r} ({type(bad[0]).__name__}): labels must be strings or integers"])
    if len(kinds) > 1:
        raise InputError([f"{field}: labels mix strings and integers; use one kind"])
    classes = tuple(sorted(set(values)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index[v] for v in values], dtype=torch.int64)


def _first_outputs(params: Params, ways: int) -> Params:
    """The classifier head cut to its first `ways` outputs (Meta-SGD's rates for it too): a `ways`-way model."""
    return {k: v[:ways] if k.removeprefix(INNER_LR).startswith("head.") else v for k, v in params.items()}


@dataclass(frozen=True)
class Predictions:
    """Class probabilities per query, columns in `classes` order, and the predicted label names."""

    classes: tuple
    probabilities: np.ndarray  # (queries, classes)
    labels: list


@dataclass(frozen=True, eq=False)
class Learner:
    """A trained meta-learner: the run config, its meta-parameters and the algorithm that adapts them."""

    config: RunConfig
    params: Params
    algorithm: object  # platform.algorithms: GradientMetaLearner or PrototypicalNetwork
    device: torch.device

    @property
    def classification(self) -> bool:
        return self.config.classification

    @property
    def image_format(self) -> ImageFormat:
        return self.config.task.image_format

    @property
    def head_outputs(self) -> int | None:
        """How many labels a task may have at most (None: any, ProtoNets)."""
        head = self.params.get("head.weight")
        return None if head is None or self.config.algorithm in EMBEDDING_ALGORITHMS else head.shape[0]

    def label_problems(self, count: int, field: str = "support_y") -> list[str]:
        """Why a task of `count` labels cannot be adapted to (none: it can)."""
        if self.head_outputs is None or count <= self.head_outputs:
            return []
        head = f"this {self.config.algorithm} model's classifier head has {self.head_outputs} outputs"
        trained = f"trained {self.config.task.ways}-way"
        return [f"{field}: {count} labels, but {head} ({trained}): give at most {self.head_outputs} labels"]

    def examples(self, x, field: str) -> torch.Tensor:
        """Support or query inputs as the model's input tensor on the learner's device."""
        if isinstance(x, (str, os.PathLike)):
            raise InputError([f"{field}: {x!s}: give a list of examples (image files), not a single one"])
        if self.classification and _is_path_list(x):
            x = load_images(x, self.image_format)
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], (np.ndarray, torch.Tensor, list)):
            x = _stacked(x, field)
        t = torch.as_tensor(np.asarray(x) if isinstance(x, (list, tuple)) else x)
        if t.numel() == 0 or t.ndim == 0:
            raise InputError([f"{field}: no examples"])
        if not t.is_floating_point():
            what = "float images in [0, 1], or image files" if self.classification else "numbers"
            raise InputError([f"{field}: dtype {t.dtype}: give {what}"])
        shape = self.image_format.shape if self.classification else (1,)
        if self.classification and shape[0] == 1 and t.shape[1:] == shape[1:]:
            t = t.unsqueeze(1)  # (n, S, S): one channel
        elif not self.classification and t.ndim == 1:
            t = t.unsqueeze(1)
        if t.shape[1:] != shape:
            raise InputError([f"{field}: examples of shape {tuple(t.shape[1:])}; this model takes {shape}"])
        if not torch.isfinite(t).all():
            raise InputError([f"{field}: holds NaN or infinite values"])
        return t.to(self.device, torch.float32)

    def adapt(self, support_x, support_y, steps: int | None = None) -> AdaptedModel:
        """The model adapted to a support set (`steps` inner steps; default: the run's optim.test_inner_steps)."""
        steps = self.config.optim.test_inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise InputError([f"steps = {steps!r}: must be an integer >= 0"])
        x = self.examples(support_x, "support_x")
        params = self.params
        if self.classification:
            classes, y = _labels(support_y, len(x))
            if problems := self.label_problems(len(classes)):
                raise InputError(problems)
            if self.head_outputs is not None and len(classes) < self.head_outputs:
                params = _first_outputs(params, len(classes))
        else:
            classes, y = None, self.examples(support_y, "support_y")
            if len(y) != len(x):
                raise InputError([f"support_y: {len(y)} values for {len(x)} support examples"])
        adapted = self.algorithm.adapt_to(params, x, y.to(self.device), int(steps))
        return AdaptedModel(self, adapted, x, classes)

    def module(self) -> nn.Module:
        """The meta-trained network itself (un-adapted; Meta-SGD's learned rates left out)."""
        model = copy.deepcopy(self.algorithm.model)
        model.load_state_dict({k: v for k, v in self.params.items() if not k.startswith(INNER_LR)})
        return model.eval()


@dataclass(frozen=True, eq=False)
class AdaptedModel:
    """A learner adapted to one support set: fast weights (or prototypes), ready for any number of queries."""

    learner: Learner
    adapted: Params
    support_x: torch.Tensor
    classes: tuple | None  # the label names, in class order (None: regression)

    def outputs(self, query_x) -> torch.Tensor:
        """Raw outputs (logits, or regression values) at the queries."""
        x = self.learner.examples(query_x, "query_x")
        with torch.no_grad():
            return self.learner.algorithm.query_outputs(self.adapted, self.support_x, x)

    def predict(self, query_x) -> Predictions | np.ndarray:
        """Predictions (classification) or the predicted values, one per query (regression)."""
        out = self.outputs(query_x).cpu()
        if self.classes is None:
            return out[:, 0].numpy()
        labels = [self.classes[i] for i in out.argmax(-1).tolist()]  # argmax of the logits, as meta-test scores
        return Predictions(self.classes, torch.softmax(out, -1).numpy(), labels)


def learner_from(config: RunConfig, params: Params, bn_stats: str = "support", device: str = "cpu") -> Learner:
    """A Learner for meta-parameters of a run; `bn_stats` overrides the run's model.bn_stats."""
    if bn_stats not in BN_STATS:
        raise ConfigError([f"bn_stats = {bn_stats!r}: must be one of {', '.join(BN_STATS)}"])
    config = config.model_copy(update={"model": config.model.model_copy(update={"bn_stats": bn_stats})})
    device = torch.device(device)
    model, algorithm, _ = build(config, device)
    model.to(device)
    return Learner(config, {k: v.to(device) for k, v in params.items()}, algorithm, device)


def load_learner(location: str | os.PathLike, bn_stats: str = "support", device: str = "cpu") -> Learner:
    """The learner in a checkpoint (file, folder or s3:// prefix: its newest) or an MLflow model
    (`runs:/<run id>/model`, `models:/<name>@<alias>` or `models:/<name>/<version>`)."""
    if str(location).startswith(MLFLOW_URIS):
        from platform.mlflow_model import load_run_state  # imported here: mlflow is slow to import

        state = load_run_state(str(location))
    else:
        state = load_checkpoint(location)
    return learner_from(RunConfig.model_validate(state["config"]), state["params"], bn_stats, device)
