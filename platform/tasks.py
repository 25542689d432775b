"""Task distributions. Every task is a pure function of (split, task seed).

The same seed gives the same task on any machine and in any worker, so the driver ships
seeds, never data. `task_sampler(config, split).sample(seed)` is that function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from platform.config import TaskConfig
from platform.data import DataError, ImageClasses, list_image_folder, load_image_folder, load_omniglot

SPLITS = ("train", "val", "test")
OMNIGLOT_IMAGES_PER_CLASS = 20
ROTATIONS = 4  # 0/90/180/270 degrees: each rotation of an Omniglot character is a class of its own

# Omniglot characters: 964 in the background alphabets, then 659 in the evaluation alphabets.
_BACKGROUND, _EVALUATION = 964, 659
# The standard split: 1200 meta-training characters (1028 train + 172 validation, as in
# Vinyals et al.) and 423 meta-test characters, drawn from all 1623 by a fixed permutation.
_STANDARD = {"train": 1028, "val": 172, "test": 423}
_BACKGROUND_VAL = 100  # background split: characters held out of the background alphabets for validation
_SPLIT_SEED = 0  # fixed: changing it changes which characters are meta-test
_FOLDER_VAL = _FOLDER_TEST = 0.15


@dataclass(frozen=True)
class Task:
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device) -> Task:
        return Task(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


def iteration_seeds(seed: int, iteration: int, count: int) -> list[int]:
    """The task seeds of one meta-iteration: a pure function of the run seed and the iteration."""
    return np.random.default_rng([seed, iteration]).integers(0, 2**63 - 1, size=count).tolist()


def evaluation_seeds(count: int) -> list[int]:
    """Fixed task seeds for meta-validation and meta-test, the same for every run and checkpoint."""
    return list(range(count))


class SinusoidTasks:
    """Regression y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5] (the MAML paper)."""

    def __init__(self, split: str, shots: int, query: int):
        self.split, self.shots, self.query = split, shots, query

    def _draw(self, seed: int):
        rng = np.random.default_rng([SPLITS.index(self.split), seed])
        amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
        return rng, lambda x: amplitude * np.sin(x - phase)

    def curve(self, seed: int, x: np.ndarray) -> np.ndarray:
        """The task's true function at `x` (for pictures: a task itself holds only its samples)."""
        return self._draw(seed)[1](x)

    def sample(self, seed: int) -> Task:
        rng, curve = self._draw(seed)
        x = rng.uniform(-5.0, 5.0, size=(self.shots + self.query, 1)).astype(np.float32)
        y = curve(x).astype(np.float32)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        return Task(x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :])


class ImageClassificationTasks:
    """N-way K-shot classification over a fixed list of classes.

    A class is (source class index, rotation); `rotations` is 4 for Omniglot, 1 for a user's folder.
    Labels are 0..N-1 in the order the classes were drawn, so their meaning changes per task.
    """

    def __init__(
        self, split: str, images: ImageClasses, classes: np.ndarray, ways: int, shots: int, query: int, rotations: int
    ):
        self.split, self.images, self.classes = split, images, classes
        self.ways, self.shots, self.query, self.rotations = ways, shots, query, rotations

    @property
    def num_classes(self) -> int:
        return len(self.classes) * self.rotations

    def sample(self, seed: int) -> Task:
        rng = np.random.default_rng([SPLITS.index(self.split), seed])
        picked = rng.choice(self.num_classes, size=self.ways, replace=False)
        per_class = self.shots + self.query
        batch = np.empty((self.ways, per_class, *self.images.images.shape[1:]), dtype=np.uint8)
        for label, c in enumerate(picked):
            pool = self.images.class_images(self.classes[c // self.rotations])
            chosen = pool[rng.choice(len(pool), size=per_class, replace=False)]
            batch[label] = np.rot90(chosen, k=int(c % self.rotations), axes=(1, 2))
        x = torch.from_numpy(batch).float().div_(255.0).unsqueeze(2)  # (ways, per_class, 1, H, W)
        y = torch.arange(self.ways).unsqueeze(1).expand(self.ways, per_class)
        s = self.shots
        return Task(
            x[:, :s].reshape(-1, *x.shape[2:]),
            y[:, :s].reshape(-1),
            x[:, s:].reshape(-1, *x.shape[2:]),
            y[:, s:].reshape(-1),
        )


def _omniglot_characters(split_scheme: str, split: str) -> np.ndarray:
    """Indices (into load_omniglot()'s classes) of the characters of one split."""
    if split_scheme == "standard":
        order = np.random.default_rng(_SPLIT_SEED).permutation(_BACKGROUND + _EVALUATION)
        start = {"train": 0, "val": _STANDARD["train"], "test": _STANDARD["train"] + _STANDARD["val"]}[split]
        return np.sort(order[start : start + _STANDARD[split]])
    if split == "test":
        return np.arange(_BACKGROUND, _BACKGROUND + _EVALUATION)
    order = np.random.default_rng(_SPLIT_SEED).permutation(_BACKGROUND)
    return np.sort(order[:_BACKGROUND_VAL] if split == "val" else order[_BACKGROUND_VAL:])


def _folder_classes(count: int, split: str) -> np.ndarray:
    order = np.random.default_rng(_SPLIT_SEED).permutation(count)
    n_val, n_test = max(1, round(count * _FOLDER_VAL)), max(1, round(count * _FOLDER_TEST))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return np.sort(parts[split])


def _folder_root(config: TaskConfig) -> Path:
    if not config.data:
        raise DataError("task.kind 'folder' needs task.data: a folder laid out as <root>/<class>/<image>")
    return Path(config.data)


def _folder_class_dirs(config: TaskConfig) -> list[Path]:
    """The class folders load_image_folder reads (hidden ones are skipped there too)."""
    root = _folder_root(config)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def num_classes(config: TaskConfig, split: str) -> int:
    """Classes in a split, without loading any image (for checking a config)."""
    if config.kind == "omniglot":
        return len(_omniglot_characters(config.split, split)) * ROTATIONS
    if config.kind == "folder":
        return len(_folder_classes(len(list_image_folder(_folder_root(config))), split))
    raise ValueError("sinusoid tasks have no classes")


def images_per_class(config: TaskConfig) -> int | None:
    """The fewest images any class has (None for regression)."""
    if config.kind == "omniglot":
        return OMNIGLOT_IMAGES_PER_CLASS
    if config.kind == "folder":
        return min(len(files) for _, files in list_image_folder(_folder_root(config)))
    return None


def task_sampler(config: TaskConfig, split: str):
    """The task distribution of one split: an object with `sample(seed) -> Task`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if config.kind == "sinusoid":
        return SinusoidTasks(split, config.shots, config.query)
    if config.kind == "omniglot":
        images = load_omniglot(config.data)
        classes, rotations = _omniglot_characters(config.split, split), ROTATIONS
    else:
        images = load_image_folder(_folder_root(config))
        classes, rotations = _folder_classes(len(images), split), 1
    return ImageClassificationTasks(split, images, classes, config.ways, config.shots, config.query, rotations)
