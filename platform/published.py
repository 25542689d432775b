"""The published few-shot benchmarks, read in the layouts they are distributed in, from a local folder
(`task.data`), or (all but tieredimagenet) from an http(s) or s3:// base URL serving the files named in
REMOTE_FILES, downloaded once per node into the download cache as Omniglot's zips (archives extracted
once beside them):

* miniimagenet: Ravi & Larochelle's `train.csv`, `val.csv`, `test.csv` (`filename,label` rows) beside
  `images/`; or, without the CSVs, the shared pickle caches `mini-imagenet-cache-{train,val,test}.pkl`
  (dicts with `image_data`, uint8 (N, 84, 84, 3), and `class_dict`, {wnid: [indices]});
* tieredimagenet: `train/`, `val/`, `test/`, each a folder of class folders of images (the layout
  tiered-imagenet-tools writes from Ren et al.'s split);
* cifarfs, fc100: CIFAR-100's python archive, `cifar-100-python/` (or its contents: the `train`,
  `test` and `meta` pickles), split by the published lists in platform/split_lists;
* cub: `CUB_200_2011/` (or its contents: `images/`, `images.txt`, `classes.txt`), split by
  Chen et al.'s rule (platform/split_lists/README.md).

From a URL: miniimagenet's three pickle caches (no checksum is published for them: never verified),
CIFAR-100's `cifar-100-python.tar.gz` and CUB's `CUB_200_2011.tgz` (md5-verified when the base is the
official one, CIFAR100_URL or CUB_URL; other URLs are NOT verified).

Listing a benchmark (image counts per class, to check a config) decodes no image and downloads nothing
(the published counts until the files are in the download cache); loading goes through platform.data's
cache like every image source (decoded once per node, keyed by the content of the files and the format).
Classes are named "<split>/<class>" and come train, val, test in that order.
Pickles are read with an unpickler that builds plain data only: a pickle from the internet runs no code.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from platform.data import (
    Classes,
    ImageClasses,
    cache_dir,
    cached_classes,
    check_downloads,
    download,
    download_path,
    list_image_folder,
    made_once,
    source_kind,
)
from platform.images import DataError, ImageFormat

SPLITS = ("train", "val", "test")
BENCHMARKS = ("miniimagenet", "tieredimagenet", "cifarfs", "fc100", "cub")
NATIVE_SIZE = {"miniimagenet": 84, "tieredimagenet": 84, "cifarfs": 32, "fc100": 32, "cub": 84}
SPLIT_LISTS = Path(__file__).with_name("split_lists")
EXPECTED = {
    "miniimagenet": "train.csv, val.csv, test.csv and images/ (Ravi & Larochelle), or mini-imagenet-cache-{train,val,test}.pkl",
    "tieredimagenet": "train/, val/ and test/, each laid out as <split>/<class>/<image>",
    "cifarfs": "cifar-100-python/ (train, test and meta) from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "fc100": "cifar-100-python/ (train, test and meta) from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cub": "CUB_200_2011/ (images/, images.txt, classes.txt) from the CUB-200-2011 archive",
}
MINIIMAGENET_PICKLES = tuple(f"mini-imagenet-cache-{split}.pkl" for split in SPLITS)
# CIFAR-100's python archive: `<base>/cifar-100-python.tar.gz`, the official base verified by its published
# md5 (the one torchvision checks); 600 images per fine class, 5 fine classes per superclass.
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_PARTS = ("train", "test", "meta")
CIFAR100_IMAGES_PER_CLASS, CIFAR100_CLASSES_PER_SUPERCLASS = 600, 5
# CUB-200-2011's archive: `<base>/CUB_200_2011.tgz`, the official base (CaltechDATA) verified by the md5
# the CUB loaders check (e.g. avalanche's CUB200); 200 classes, their image counts vary.
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files"
CUB_ARCHIVE = "CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_CLASSES = 200
# Ravi & Larochelle's split of Vinyals et al.'s 100 classes of 600 images each.
MINIIMAGENET_CLASSES, MINIIMAGENET_IMAGES_PER_CLASS = {"train": 64, "val": 16, "test": 20}, 600
# What an http(s) or s3:// base URL must serve, per kind (tieredimagenet has no published file to download).
REMOTE_FILES = {
    "miniimagenet": MINIIMAGENET_PICKLES,
    "cifarfs": (CIFAR100_ARCHIVE,),
    "fc100": (CIFAR100_ARCHIVE,),
    "cub": (CUB_ARCHIVE,),
}
OFFICIAL = {CIFAR100_ARCHIVE: (CIFAR100_URL, CIFAR100_MD5), CUB_ARCHIVE: (CUB_URL, CUB_MD5)}
# What a plain data pickle may name: NumPy's array reconstruction (and the bytes codec protocol 2 uses).
_PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}
_UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)


@dataclass(frozen=True)
class _Found:
    """A benchmark as found at its root, before any image is decoded."""

    key_files: list[tuple[str, Path]]  # every file its images come from (labelled), for the cache key
    classes: Callable[[], Classes]  # its classes and their images, "<split>/<class>", in split order
    counts: Callable[[], dict[str, list[int]]]  # split -> images per class, in the same order


def benchmark_counts(kind: str, source: str | Path) -> dict[str, list[int | None]]:
    """Images per class of each split (train, val, test), in class order; decodes no image. A URL source
    is not fetched for this: until its files are in the download cache, their URLs are checked
    (check_downloads) and the counts are the published ones (None where they are not published: CUB's
    differ by class), checked against the files by the first check that finds them downloaded."""
    source = str(source)
    if source_kind(source) != "folder":
        urls = _remote_urls(kind, source)
        check_downloads(source, urls)
        if not all(download_path(url).exists() for url in urls):
            return _published_counts(kind)
    return _found(kind, source).counts()


def load_benchmark(kind: str, source: str | Path, image_format: ImageFormat) -> ImageClasses:
    """All classes of the benchmark in `image_format`, train then val then test (see split_classes)."""
    found = _found(kind, str(source))
    return cached_classes(kind, image_format, found.key_files, found.classes)


def split_classes(images: ImageClasses, split: str) -> np.ndarray:
    """Indices of the classes of one split in what load_benchmark returned."""
    return np.array([i for i, name in enumerate(images.names) if name.startswith(f"{split}/")], dtype=np.int64)


def _found(kind: str, source: str) -> _Found:
    """The benchmark in a local folder, or at a base URL: its files downloaded (archives extracted) once per node."""
    if source_kind(source) == "folder":
        return _find(kind, Path(source).expanduser())
    downloads = [download(url, _official_md5(source, url)) for url in _remote_urls(kind, source)]
    if kind == "miniimagenet":
        return _pickle_caches(downloads)
    return _find(kind, _extracted(downloads[0], REMOTE_FILES[kind][0]))


def _remote_urls(kind: str, source: str) -> list[str]:
    if kind not in REMOTE_FILES:
        raise DataError(
            f"{source}: task.kind {kind} reads a local folder (holding {EXPECTED[kind]}); download the data set "
            "there and give that folder"
        )
    return [f"{source.rstrip('/')}/{name}" for name in REMOTE_FILES[kind]]


def _official_md5(source: str, url: str) -> str | None:
    """The published md5 of a file from its official base URL; None (not verified) for any other URL."""
    official = OFFICIAL.get(url.rsplit("/", 1)[1])
    return official[1] if official and source.rstrip("/") == official[0] else None


def _published_counts(kind: str) -> dict[str, list[int | None]]:
    if kind == "miniimagenet":
        return {split: [MINIIMAGENET_IMAGES_PER_CLASS] * n for split, n in MINIIMAGENET_CLASSES.items()}
    if kind == "cub":
        splits = [_cub_split(position) for position in range(CUB_CLASSES)]
        return {split: [None] * splits.count(split) for split in SPLITS}
    listed = json.loads((SPLIT_LISTS / f"{kind}.json").read_text())
    per_entry = 1 if kind == "cifarfs" else CIFAR100_CLASSES_PER_SUPERCLASS
    return {split: [CIFAR100_IMAGES_PER_CLASS] * (per_entry * len(listed[split])) for split in SPLITS}


# --- downloaded archives --------------------------------------------------------------------------


def _cifar100_member(name: str) -> bool:
    return name in {f"cifar-100-python/{part}" for part in CIFAR100_PARTS}


def _cub_member(name: str) -> bool:
    """CUB's two lists and images/<class>/<image> (not its parts, attributes, segmentations)."""
    parts = name.split("/")
    if parts[0] != "CUB_200_2011" or any(part in ("", ".", "..") for part in parts):
        return False
    return parts[1:] in (["images.txt"], ["classes.txt"]) or (len(parts) == 4 and parts[1] == "images")


# archive -> (which members are extracted, those it must have, what the source must serve)
_ARCHIVES = {
    CIFAR100_ARCHIVE: (
        _cifar100_member,
        [f"cifar-100-python/{part}" for part in CIFAR100_PARTS],
        "CIFAR-100's python archive",
    ),
    CUB_ARCHIVE: (
        _cub_member,
        ["CUB_200_2011/classes.txt", "CUB_200_2011/images.txt"],
        "the CUB-200-2011 archive",
    ),
}


def _extracted(archive: Path, name: str) -> Path:
    """What the benchmark reads of a downloaded archive (`name`: which one), extracted once beside it
    (`<archive>.d/cifar-100-python/`, `<archive>.d/CUB_200_2011/`): one extractor at a time (a file lock),
    published with one atomic rename."""
    wanted, required, what = _ARCHIVES[name]
    dest = archive.with_name(f"{archive.name}.d")

    def extract() -> None:
        for stale in dest.parent.glob(f".{dest.name}-*"):  # we hold the lock: their extractors died
            shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            extracted = set()
            for member, content in _archive_members(archive, wanted):
                (tmp / member).parent.mkdir(parents=True, exist_ok=True)
                (tmp / member).write_bytes(content)  # the folder is published whole: no file is half-written
                extracted.add(member)
            missing = [member for member in required if member not in extracted]
            if missing:
                raise DataError(f"{archive}: no {missing[0]} in it; the source must serve {what}")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return made_once(dest, extract)


def _archive_members(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the wanted files of a tar.gz, one at a time; a read error is a DataError (and the
    writer's errors, raised outside this generator, stay OSErrors: a full disk is not a corrupt archive)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"{archive}: not a readable tar.gz ({e}); delete it from the download cache to fetch it again"
        ) from None


def _find(kind: str, root: Path) -> _Found:
    if not root.is_dir():
        raise DataError(
            f"{root}: {kind} data folder not found; give task.data = a local folder holding {EXPECTED[kind]}"
        )
    finders = {
        "miniimagenet": _miniimagenet,
        "tieredimagenet": _tieredimagenet,
        "cifarfs": functools.partial(_cifar100, "cifarfs"),
        "fc100": functools.partial(_cifar100, "fc100"),
        "cub": _cub,
    }
    return finders[kind](root)


def _listed(classes: Classes, key_files: list[tuple[str, Path]]) -> _Found:
    """A benchmark whose images are files, all listed already: counting is free."""

    def counts() -> dict[str, list[int]]:
        return {split: [len(items) for name, items in classes if name.startswith(f"{split}/")] for split in SPLITS}

    return _Found(key_files, lambda: classes, counts)


def _text_lines(path: Path, kind: str) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: not found; task.kind {kind} needs {EXPECTED[kind]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as text ({e}); replace it with the published file") from None


def _image_file(path: Path, listed_in: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: not found, but {listed_in} lists it; every listed image must be there")
    return path


def _disjoint(splits: dict[str, list[str]], where: Path) -> None:
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = sorted(set(splits[a]) & set(splits[b]))
            if shared:
                raise DataError(f"{where}: classes {shared[:3]} are in both {a} and {b}; the splits must be disjoint")


# --- miniImageNet ---------------------------------------------------------------------------------


def _miniimagenet(root: Path) -> _Found:
    if any((root / f"{split}.csv").exists() for split in SPLITS) or (root / "images").is_dir():
        return _miniimagenet_csv(root)
    pickles = [root / name for name in MINIIMAGENET_PICKLES]
    if not any(p.exists() for p in pickles):
        raise DataError(
            f"{root}: holds no miniImageNet files; give task.data = the folder holding {EXPECTED['miniimagenet']}"
        )
    for path in pickles:
        if not path.is_file():
            raise DataError(f"{path}: not found; the pickle caches come as a set of three: {EXPECTED['miniimagenet']}")
    return _pickle_caches(pickles)


def _pickle_caches(pickles: list[Path]) -> _Found:
    """The three pickle caches (train, val, test), from a folder or downloaded (keyed by their published names)."""
    return _Found(
        list(zip(MINIIMAGENET_PICKLES, pickles)),
        lambda: _miniimagenet_pickle_classes(pickles),
        lambda: _pickle_counts(pickles),
    )


def _miniimagenet_csv(root: Path) -> _Found:
    """Ravi & Larochelle's layout: `<split>.csv` rows `filename,label`, the files in `images/`."""
    classes, key_files, wnids = [], [], {}
    for split in SPLITS:
        csv = root / f"{split}.csv"
        groups = defaultdict(list)
        for filename, label in _csv_rows(csv):
            path = _image_file(root / "images" / filename, csv.name)
            groups[label].append((str(path), path.read_bytes))
            key_files.append((f"images/{filename}", path))
        classes += [(f"{split}/{label}", groups[label]) for label in sorted(groups)]
        wnids[split] = list(groups)
        key_files.append((csv.name, csv))
    _disjoint(wnids, root)
    return _listed(classes, key_files)


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    lines = _text_lines(path, "miniimagenet")
    if not lines or lines[0].strip() != "filename,label":
        first = lines[0] if lines else ""
        raise DataError(
            f"{path}: line 1 is {first!r}; a miniImageNet split file starts with the header 'filename,label'"
        )
    rows = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.strip().split(",")
        if fields == [""]:
            continue
        if len(fields) != 2 or not all(fields) or "/" in fields[0]:
            raise DataError(
                f"{path}: line {number} is {line!r}; expected '<image file in images/>,<class>', "
                "e.g. n0153282900000005.jpg,n01532829"
            )
        rows.append((fields[0], fields[1]))
    if not rows:
        raise DataError(f"{path}: lists no images; a split file has one 'filename,label' row per image")
    return rows


def _miniimagenet_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    data = _unpickle(path, "a miniImageNet cache is a dict with image_data and class_dict")
    images, class_dict = data.get("image_data"), data.get("class_dict")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{path}: image_data is {got}; expected uint8 images (N, height, width, 3)")
    if not (isinstance(class_dict, dict) and class_dict):
        raise DataError(f"{path}: class_dict is {type(class_dict).__name__}; expected {{wnid: [image indices]}}")
    for wnid, indices in class_dict.items():
        if not (isinstance(indices, list) and indices and all(0 <= int(i) < len(images) for i in indices)):
            raise DataError(
                f"{path}: class_dict[{wnid!r}] is not a non-empty list of indices into image_data (0..{len(images) - 1})"
            )
    return images, {str(wnid): [int(i) for i in indices] for wnid, indices in class_dict.items()}


def _miniimagenet_pickle_classes(pickles: list[Path]) -> Classes:
    classes, wnids = [], {}
    for split, path in zip(SPLITS, pickles):
        images, class_dict = _miniimagenet_pickle(path)
        wnids[split] = list(class_dict)
        classes += [
            (
                f"{split}/{wnid}",
                [(f"{path}: image {i}", functools.partial(images.__getitem__, i)) for i in class_dict[wnid]],
            )
            for wnid in sorted(class_dict)
        ]
    _disjoint(wnids, pickles[0].parent)
    return classes


def _pickle_counts(pickles: list[Path]) -> dict[str, list[int]]:
    return {split: list(_miniimagenet_counts(str(p), *_stat(p))) for split, p in zip(SPLITS, pickles)}


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _miniimagenet_counts(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    """Kept per file version: checking a config lists a split twice, and unpickling one is seconds."""
    _, class_dict = _miniimagenet_pickle(Path(path))
    return tuple(len(class_dict[wnid]) for wnid in sorted(class_dict))


# --- tieredImageNet -------------------------------------------------------------------------------


def _tieredimagenet(root: Path) -> _Found:
    classes, key_files, names = [], [], {}
    for split in SPLITS:
        listing = list_image_folder(root / split)
        names[split] = [name for name, _ in listing]
        classes += [(f"{split}/{name}", [(str(p), p.read_bytes) for p in files]) for name, files in listing]
        key_files += [(f"{split}/{name}/{p.name}", p) for name, files in listing for p in files]
    _disjoint(names, root)
    return _listed(classes, key_files)


# --- CIFAR-FS and FC100 ---------------------------------------------------------------------------


def _cifar100(kind: str, root: Path) -> _Found:
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    parts = [base / name for name in ("train", "test", "meta")]
    for path in parts:
        if not path.is_file():
            raise DataError(f"{path}: not found; task.kind {kind} needs {EXPECTED[kind]}, extracted")
    split_file = SPLIT_LISTS / f"{kind}.json"
    key_files = [(f"cifar-100-python/{p.name}", p) for p in parts] + [(f"split_lists/{split_file.name}", split_file)]

    def labels() -> dict:
        return _cifar_labels(*(str(p) for p in parts), *(v for p in parts for v in _stat(p)))

    def classes() -> Classes:
        pixels = np.concatenate([_cifar_part(path)["data"] for path in parts[:2]])  # rows: train, then test
        names = labels()["fine_names"]
        return [
            (
                f"{split}/{names[fine]}",
                [(f"{base}: image {i}", functools.partial(_cifar_image, pixels, i)) for i in rows],
            )
            for split, members in _cifar_split(kind, labels(), parts[2]).items()
            for fine, rows in members
        ]

    def counts() -> dict[str, list[int]]:
        return {
            split: [len(rows) for _, rows in members]
            for split, members in _cifar_split(kind, labels(), parts[2]).items()
        }

    return _Found(key_files, classes, counts)


def _cifar_image(pixels: np.ndarray, i: int) -> np.ndarray:
    return pixels[i].reshape(3, 32, 32).transpose(1, 2, 0)  # CIFAR rows are channel-major


def _cifar_part(path: Path) -> dict:
    """One of CIFAR-100's `train`/`test` pickles, checked: data (N, 3072) uint8 with N fine and coarse labels."""
    data = _unpickle(path, "CIFAR-100's train and test pickles are dicts with data, fine_labels and coarse_labels")
    pixels = data.get("data")
    if not (
        isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2 and pixels.shape[1] == 3072
    ):
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DataError(f"{path}: data is {got}; expected CIFAR's uint8 rows (N, 3072)")
    for field in ("fine_labels", "coarse_labels"):
        if not (isinstance(data.get(field), list) and len(data[field]) == len(pixels)):
            raise DataError(f"{path}: {field} is not a list of {len(pixels)} labels, one per row of data")
    return data


@functools.lru_cache(maxsize=4)
def _cifar_labels(train: str, test: str, meta: str, *stats: int) -> dict:
    """The labels and names of CIFAR-100 (no pixels), kept per version of the files (`stats`)."""
    parts = [_cifar_part(Path(p)) for p in (train, test)]
    names = _unpickle(Path(meta), "CIFAR-100's meta pickle is a dict with fine_label_names and coarse_label_names")
    for field in ("fine_label_names", "coarse_label_names"):
        if not (isinstance(names.get(field), list) and names[field]):
            raise DataError(f"{meta}: {field} is missing or empty; use the meta file of CIFAR-100's python archive")
    fine, coarse = (
        np.concatenate([np.asarray(p[f], dtype=np.int64) for p in parts]) for f in ("fine_labels", "coarse_labels")
    )
    fine_names, coarse_names = ([_text(n) for n in names[f]] for f in ("fine_label_names", "coarse_label_names"))
    if fine.min(initial=0) < 0 or fine.max(initial=0) >= len(fine_names) or coarse.max(initial=0) >= len(coarse_names):
        raise DataError(
            f"{Path(train).parent}: labels beyond the names in meta; the pickles are not one CIFAR-100 archive"
        )
    return {"fine": fine, "coarse": coarse, "fine_names": fine_names, "coarse_names": coarse_names}


def _cifar_split(kind: str, labels: dict, meta: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """split -> [(fine class, its rows)], from the shipped list: fine classes (CIFAR-FS) or superclasses (FC100)."""
    listed = json.loads((SPLIT_LISTS / f"{kind}.json").read_text())
    field = "fine_names" if kind == "cifarfs" else "coarse_names"
    index = {name: i for i, name in enumerate(labels[field])}
    missing = [name for split in SPLITS for name in listed[split] if name not in index]
    if missing:
        raise DataError(
            f"{meta}: {field.replace('_names', '_label_names')} lacks {missing[:3]} (of the {kind} split, "
            f"platform/split_lists/{kind}.json); use the meta file of CIFAR-100's python archive"
        )
    fine, coarse = labels["fine"], labels["coarse"]
    split = {}
    for name in SPLITS:
        if kind == "cifarfs":
            members = sorted(index[c] for c in listed[name])
        else:
            superclasses = {index[c] for c in listed[name]}
            members = sorted(set(fine[np.isin(coarse, list(superclasses))].tolist()))
        split[name] = [(c, np.flatnonzero(fine == c)) for c in members]
        empty = [labels["fine_names"][c] for c, rows in split[name] if not len(rows)]
        if empty:
            raise DataError(f"{meta.parent}: no image of the {name} class(es) {empty[:3]}; the archive is incomplete")
    return split


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


# --- CUB-200-2011 ---------------------------------------------------------------------------------


def _cub(root: Path) -> _Found:
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    class_names = [
        _id_and_value(line, number, base / "classes.txt") for number, line in _numbered(base / "classes.txt")
    ]
    images = defaultdict(list)
    for number, line in _numbered(base / "images.txt"):
        relative = _id_and_value(line, number, base / "images.txt")
        folder = relative.split("/")[0]
        if folder not in class_names or relative.count("/") != 1:
            raise DataError(
                f"{base / 'images.txt'}: line {number} names {relative!r}; expected <class folder of classes.txt>/<image>"
            )
        images[folder].append(_image_file(base / "images" / relative, "images.txt"))
    ordered = sorted(class_names)  # the rule below is over the class folders sorted by name (001. to 200.)
    split_of = {name: _cub_split(i) for i, name in enumerate(ordered)}
    classes = [
        (f"{split}/{name}", [(str(p), p.read_bytes) for p in images[name]])
        for split in SPLITS
        for name in ordered
        if split_of[name] == split
    ]
    empty = [name for name in ordered if not images[name]]
    if empty:
        raise DataError(f"{base / 'images.txt'}: lists no image of class(es) {empty[:3]}; use the complete images.txt")
    key_files = [(f"CUB_200_2011/{n}", base / n) for n in ("classes.txt", "images.txt")]
    key_files += [(f"CUB_200_2011/images/{p.parent.name}/{p.name}", p) for name in ordered for p in images[name]]
    return _listed(classes, key_files)


def _cub_split(position: int) -> str:
    """Chen et al.'s CUB split (write_CUB_filelist.py): even classes train, then val and test alternate."""
    return "train" if position % 2 == 0 else "val" if position % 4 == 1 else "test"


def _numbered(path: Path) -> list[tuple[int, str]]:
    lines = [(number, line) for number, line in enumerate(_text_lines(path, "cub"), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty; use the file of the CUB-200-2011 archive")
    return lines


def _id_and_value(line: str, number: int, path: Path) -> str:
    fields = line.split()
    if len(fields) != 2 or not fields[0].isdigit():
        raise DataError(
            f"{path}: line {number} is {line!r}; expected '<number> <name>', as in the CUB-200-2011 archive"
        )
    return fields[1]


# --- pickles --------------------------------------------------------------------------------------


class _DataUnpickler(pickle.Unpickler):
    """Builds plain data only (dicts, lists, numbers, strings, NumPy arrays); any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not plain data")


def _unpickle(path: Path, shape: str) -> dict:
    """A pickled dict (keys as str); latin1 reads the Python 2 pickles CIFAR ships as the Python 3 ones."""
    try:
        with open(path, "rb") as f:
            data = _DataUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {shape}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except _UNPICKLING_ERRORS as e:
        raise DataError(f"{path}: not a readable data pickle ({e}); {_remedy(path)}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}; {shape}")
    return {_text(k): v for k, v in data.items()}


def _remedy(path: Path) -> str:
    """What to do with a broken file: a download is fetched again once deleted from the download cache."""
    downloaded = path.is_relative_to(cache_dir() / "downloads")
    return "delete it from the download cache to fetch it again" if downloaded else "replace it with a complete copy"
