"""Task distributions. Every task is a pure function of (split, task seed).

The same seed gives the same task on any machine and in any worker, so the driver ships
seeds, never data. `task_sampler(config, split).sample(seed)` is that function. Every draw comes
from platform.streams (SHA-256), not from NumPy's generators, so no library upgrade changes a task;
the classes of each split come from platform.splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from platform.config import TaskConfig
from platform.data import ImageClasses, load_image_folder, load_omniglot
from platform.images import augment
from platform.published import load_benchmark, split_classes
from platform.splits import ROTATIONS, TASK_SPLITS, data_source, folder_split, omniglot_characters
from platform.streams import Stream


@dataclass(frozen=True)
class Task:
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    # The task seed it was sampled from: what its training-time masks are drawn from (model.dropblock).
    seed: int | None = None

    def to(self, device) -> Task:
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y)
        return Task(*(t.to(device) for t in tensors), seed=self.seed)


def model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, H, W) or (n, C, H, W) as the model takes them: float32 (n, C, H, W) in [0, 1]
    (the model normalises them further when task.mean/std are set: platform.models)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x


def iteration_seeds(seed: int, iteration: int, count: int) -> list[int]:
    """The task seeds of one meta-iteration: a pure function of the run seed and the iteration (63 bits)."""
    return [w >> 1 for w in Stream("iteration", seed, iteration).words(count)]


def evaluation_seeds(count: int) -> list[int]:
    """Fixed task seeds for meta-validation and meta-test, the same for every run and checkpoint."""
    return list(range(count))


class SinusoidTasks:
    """Regression y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5] (the MAML paper)."""

    def __init__(self, split: str, shots: int, query: int):
        self.split, self.shots, self.query = split, shots, query

    def _draw(self, seed: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        """The task's x (shots + query of them, float64) and its curve: one read of its stream (words 0
        and 1 the amplitude and phase, then the x), the same words as drawing them one by one."""
        f = Stream("task", self.split, seed).fractions(2 + self.shots + self.query)
        amplitude, phase = 0.1 + (5.0 - 0.1) * f[0], np.pi * f[1]
        return -5.0 + 10.0 * f[2:], lambda x: amplitude * np.sin(x - phase)

    def curve(self, seed: int, x: np.ndarray) -> np.ndarray:
        """The task's true function at `x` (for pictures: a task itself holds only its samples)."""
        return self._draw(seed)[1](x)

    def sample(self, seed: int) -> Task:
        x, curve = self._draw(seed)
        x = x.reshape(-1, 1).astype(np.float32)
        x, y = torch.from_numpy(x), torch.from_numpy(curve(x).astype(np.float32))
        return Task(x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :])


class ImageClassificationTasks:
    """N-way K-shot classification over a fixed list of classes.

    A class is (source class index, rotation); `rotations` is 4 for Omniglot, 1 for the other data sets.
    Labels are 0..N-1 in the order the classes were drawn, so their meaning changes per task.
    Training tasks are augmented (`crop_padding`, `flip`: platform.images.augment) from a stream of
    their own, so a task's classes and images are the same with augmentation on or off.
    """

    def __init__(
        self,
        split: str,
        images: ImageClasses,
        classes: np.ndarray,
        ways: int,
        shots: int,
        query: int,
        rotations: int,
        crop_padding: int = 0,
        flip: bool = False,
    ):
        self.split, self.images, self.classes = split, images, classes
        self.ways, self.shots, self.query, self.rotations = ways, shots, query, rotations
        self.augments = split == "train" and (crop_padding > 0 or flip)
        self.crop_padding, self.flip = crop_padding, flip

    @property
    def num_classes(self) -> int:
        return len(self.classes) * self.rotations

    def sample(self, seed: int) -> Task:
        stream = Stream("task", self.split, seed)
        picked = stream.choice(self.num_classes, self.ways)
        per_class = self.shots + self.query
        batch = np.empty((self.ways, per_class, *self.images.images.shape[1:]), dtype=np.uint8)
        for label, c in enumerate(picked):
            pool = self.images.class_images(self.classes[c // self.rotations])
            chosen = pool[stream.choice(len(pool), per_class)]
            batch[label] = np.rot90(chosen, k=int(c % self.rotations), axes=(-2, -1))
        images = batch.reshape(-1, *batch.shape[2:])
        if self.augments:
            images = augment(images, Stream("augment", self.split, seed), self.crop_padding, self.flip)
        x = model_input(images)
        x = x.view(self.ways, per_class, *x.shape[1:])  # (ways, per_class, C, H, W)
        y = torch.arange(self.ways).unsqueeze(1).expand(self.ways, per_class)
        s = self.shots
        return Task(
            x[:, :s].reshape(-1, *x.shape[2:]),
            y[:, :s].reshape(-1),
            x[:, s:].reshape(-1, *x.shape[2:]),
            y[:, s:].reshape(-1),
            seed=seed,
        )


def task_sampler(config: TaskConfig, split: str):
    """The task distribution of one split: an object with `sample(seed) -> Task`."""
    if split not in TASK_SPLITS:
        raise ValueError(f"split must be one of {TASK_SPLITS}, got {split!r}")
    if config.kind == "sinusoid":
        return SinusoidTasks(split, config.shots, config.query)
    if config.kind == "omniglot":
        images = load_omniglot(config.data, config.image_format)
        classes, rotations = omniglot_characters(config.split, split), ROTATIONS
    elif config.kind == "folder":
        images = load_image_folder(data_source(config), config.image_format)
        classes, rotations = folder_split(config, images.names, split), 1
    else:
        images = load_benchmark(config.kind, data_source(config), config.image_format)
        classes, rotations = split_classes(images, split), 1
    return ImageClassificationTasks(
        split, images, classes, config.ways, config.shots, config.query, rotations, config.crop_padding, config.flip
    )
