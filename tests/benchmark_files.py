"""Tiny stand-ins for the published few-shot benchmarks, written in their exact published layouts (a few
classes of a few small images each), for the tests of platform.published and of the benchmark presets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
CIFARFS_SPLIT = json.loads((REPO / "platform" / "split_lists" / "cifarfs.json").read_text())
FC100_SPLIT = json.loads((REPO / "platform" / "split_lists" / "fc100.json").read_text())


def pixels(seed: int, size: int = 12) -> np.ndarray:
    """A random RGB image (size, size, 3), different for every seed."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def wnids(split: str, count: int) -> list[str]:
    return [f"n{SPLITS.index(split) + 1}{c:07d}" for c in range(count)]


def miniimagenet_csv(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """Ravi & Larochelle's layout: train.csv/val.csv/test.csv of `filename,label` rows, JPEGs in images/."""
    (root / "images").mkdir(parents=True)
    for s, split in enumerate(SPLITS):
        rows = ["filename,label"]
        for c, wnid in enumerate(wnids(split, classes)):
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                Image.fromarray(pixels(s * 1000 + c * 100 + i)).save(root / "images" / name, quality=95)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def miniimagenet_pickles(root: Path, classes: int = 3, per_class: int = 4, size: int = 84) -> Path:
    """The shared caches mini-imagenet-cache-<split>.pkl: {image_data: uint8 (N, 84, 84, 3), class_dict: {wnid: [i]}}."""
    root.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(SPLITS):
        n = classes * per_class
        images = np.stack([pixels(s * 1000 + i, size) for i in range(n)])
        # Interleaved, as nothing promises a class's images are contiguous.
        class_dict = {wnid: list(range(c, n, classes)) for c, wnid in enumerate(wnids(split, classes))}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
    return root


def tieredimagenet(root: Path, classes: int = 3, per_class: int = 3) -> Path:
    """train/, val/, test/ folders of class folders of images (tiered-imagenet-tools' layout)."""
    for s, split in enumerate(SPLITS):
        for c, wnid in enumerate(wnids(split, classes)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(pixels(s * 1000 + c * 100 + i)).save(root / split / wnid / f"{wnid}_{i}.png")
    return root


def cifar100(root: Path, per_class: tuple[int, int] = (1, 1)) -> Path:
    """cifar-100-python/{train,test,meta} as the archive's Python pickles read with encoding='bytes' (b'data', ...):
    the 100 fine classes (superclass of fine class i: i % 20, enough for FC100's split), `per_class` (train, test)
    images each."""
    fine_names = sorted(name for split in SPLITS for name in CIFARFS_SPLIT[split])
    coarse_names = sorted(name for split in SPLITS for name in FC100_SPLIT[split])
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for p, (part, count) in enumerate(zip(("train", "test"), per_class)):
        fine = [c for c in range(100) for _ in range(count)]
        rows = np.stack([pixels(p * 100_000 + i, 32).transpose(2, 0, 1).reshape(-1) for i in range(len(fine))])
        data = {b"data": rows, b"fine_labels": fine, b"coarse_labels": [c % 20 for c in fine]}
        (base / part).write_bytes(pickle.dumps(data, protocol=2))
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def cub(root: Path, classes: int = 8, per_class: int = 3) -> Path:
    """CUB_200_2011/ with images/<NNN.Name>/<image>.jpg, images.txt and classes.txt (ids from 1)."""
    base = root / "CUB_200_2011"
    names = [f"{c + 1:03d}.Bird_{chr(65 + c)}" for c in range(classes)]
    image_lines, n = [], 0
    for c, name in enumerate(names):
        (base / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            n += 1
            relative = f"{name}/{name[4:]}_{i:04d}.jpg"
            Image.fromarray(pixels(c * 100 + i, 16)).save(base / "images" / relative, quality=95)
            image_lines.append(f"{n} {relative}")
    (base / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(names)))
    (base / "images.txt").write_text("\n".join(image_lines) + "\n")
    return root


# The presets name no data (it is the user's): the folder presets run on the shared CIFAR-10 photographs, the
# benchmark ones on stand-ins with enough classes and images for their tasks.
FOLDER_DATA = f"task.data={REPO.parent / 'shared' / 'data' / 'cifar10'}"
STAND_INS = {
    "miniimagenet": lambda root: miniimagenet_csv(root, classes=15, per_class=20),
    "cifarfs": lambda root: cifar100(root, per_class=(15, 5)),
    "cub": lambda root: cub(root, classes=20, per_class=21),
}


def stand_ins(root: Path) -> dict[str, Path]:
    """A stand-in for each benchmark a preset uses, under `root`: kind -> task.data."""
    return {kind: write(root / kind) for kind, write in STAND_INS.items()}


def preset_data(preset: Path, stand_ins: dict[str, Path]) -> list[str]:
    """The task.data override a preset needs to validate and run here (none for Omniglot and sinusoid)."""
    kind = yaml.safe_load(preset.read_text())["task"]["kind"]
    if kind == "folder":
        return [FOLDER_DATA]
    return [f"task.data={stand_ins[kind]}"] if kind in stand_ins else []
