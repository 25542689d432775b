"""Class splits: which classes meta-training, meta-validation and meta-test draw their tasks from.

Needs no image and no torch, so checking a config (platform.config) can count a split's classes;
tasks.py builds the samplers on the same functions, so what is checked is what is sampled.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from platform.data import DataError, list_image_folder
from platform.published import BENCHMARKS, EXPECTED, benchmark_counts
from platform.streams import permutation

if TYPE_CHECKING:  # for annotations only: platform.config imports this module
    from platform.config import TaskConfig

TASK_SPLITS = ("train", "val", "test")
OMNIGLOT_IMAGES_PER_CLASS = 20
ROTATIONS = 4  # 0/90/180/270 degrees: each rotation of an Omniglot character is a class of its own
# Omniglot's splits as shipped data (how they were made: its "about"); docs/results.md was measured on them.
OMNIGLOT_SPLITS_FILE = Path(__file__).with_name("omniglot_splits.json")
FOLDER_MIN_CLASSES = len(TASK_SPLITS)  # one class each at least
_FOLDER_VAL = _FOLDER_TEST = 0.15


def omniglot_characters(scheme: str, split: str) -> np.ndarray:
    """Indices (into load_omniglot()'s classes, sorted) of the characters of one split of a scheme.

    standard: 1028 train + 172 val (the usual 1200, as in Vinyals et al.) and 423 test characters of
    all 1623; background: the background alphabets less 100 validation characters, test = evaluation.
    """
    return np.asarray(_omniglot_splits()[scheme][split], dtype=np.int64)


def folder_classes(count: int, split: str) -> np.ndarray:
    """Indices (sorted) of the classes of one split of a folder of `count` classes: 70/15/15 by a fixed
    SHA-256 permutation (platform.streams), the same on every machine and library version."""
    order = permutation(count, "folder-split")  # changing the key changes every folder split
    n_val, n_test = max(1, round(count * _FOLDER_VAL)), max(1, round(count * _FOLDER_TEST))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return np.sort(parts[split])


def folder_split(task: TaskConfig, names: Sequence[str], split: str) -> np.ndarray:
    """Indices (sorted) into a folder's classes `names` of one split: task.classes when given, else
    folder_classes. DataError for a listed class the folder does not have."""
    if task.classes is None:
        if len(names) < FOLDER_MIN_CLASSES:
            raise DataError(
                f"{data_source(task)}: {len(names)} class folder(s); a folder data set needs at least "
                f"{FOLDER_MIN_CLASSES}, one each for meta-training, meta-validation and meta-test"
            )
        return folder_classes(len(names), split)
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in task.classes[split] if name not in index]
    if missing:
        raise DataError(f"task.classes.{split}: {missing[:3]} not class folders of {data_source(task)}")
    return np.sort(np.array([index[name] for name in task.classes[split]], dtype=np.int64))


def data_source(task: TaskConfig) -> str:
    """task.data of a folder data set or a published benchmark; DataError when it is not given."""
    if not task.data:
        expected = "a folder laid out as <root>/<class>/<image>" if task.kind == "folder" else EXPECTED[task.kind]
        raise DataError(f"task.kind {task.kind!r} needs task.data: {expected}")
    return task.data


def split_sizes(task: TaskConfig) -> dict[str, int]:
    """Classes in each split, without reading any image (lists a folder data set's files, or a benchmark's)."""
    if task.kind == "omniglot":
        return {split: len(omniglot_characters(task.split, split)) * ROTATIONS for split in TASK_SPLITS}
    if task.kind == "folder":
        names = [name for name, _ in list_image_folder(data_source(task))]
        return {split: len(folder_split(task, names, split)) for split in TASK_SPLITS}
    if task.kind in BENCHMARKS:
        return {split: len(counts) for split, counts in benchmark_counts(task.kind, data_source(task)).items()}
    raise ValueError("sinusoid tasks have no classes")


def images_per_class(task: TaskConfig) -> int | None:
    """The fewest images any class (of a split) has (None for regression, and for a benchmark whose counts
    are not published and not downloaded yet: CUB from a URL)."""
    if task.kind == "omniglot":
        return OMNIGLOT_IMAGES_PER_CLASS
    if task.kind == "folder":
        listing = list_image_folder(data_source(task))
        used = {i for split in TASK_SPLITS for i in folder_split(task, [name for name, _ in listing], split)}
        return min(len(listing[i][1]) for i in used)
    if task.kind in BENCHMARKS:
        counts = benchmark_counts(task.kind, data_source(task)).values()
        return None if any(None in split for split in counts) else min(min(split, default=0) for split in counts)
    return None


@functools.cache
def _omniglot_splits() -> dict:
    return json.loads(OMNIGLOT_SPLITS_FILE.read_text())
