"""Image data for few-shot classification: Omniglot and the user's own image folders (the published
benchmarks' layouts are read by platform.published, through the same cache).

Every source is decoded once into a compact uint8 array (in an `ImageFormat`: 28x28 grayscale with
ink high by default, platform.images) and cached on disk under `cache_dir()`, keyed by the content
of the source files and the format, so later loads only memory-map the cached array; several
processes on one node then share its pages.
"""

import contextlib
import fcntl
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from platform.files import atomic_file, atomic_write
from platform.images import OMNIGLOT_FORMAT, DataError, ImageFormat

OFFICIAL_OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
# Published checksums of the official zips (the ones torchvision checks).
OFFICIAL_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
# Omniglot comes in two sets of alphabets, images_<set>.zip (not to be confused with the class splits, splits.py).
OMNIGLOT_SETS = ("background", "evaluation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# (where the image comes from, for messages; a function that reads its bytes)
Item = tuple[str, Callable[[], bytes | np.ndarray]]  # an image file's bytes, or pixels (images.ImageFormat.decode)
Classes = list[tuple[str, list[Item]]]


# eq=False: the generated == and hash would compare and hash numpy arrays, which does not work.
@dataclass(frozen=True, eq=False)
class ImageClasses:
    """Images grouped by class: class c owns `images[offsets[c]:offsets[c + 1]]`.

    `images` is uint8, (M, size, size) grayscale with 0 = background and 255 = ink, or (M, 3, size,
    size) RGB (platform.images.ImageFormat); when loaded from the cache it is a read-only memory map.
    """

    images: np.ndarray
    offsets: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def class_images(self, c: int) -> np.ndarray:
        return self.images[self.offsets[c] : self.offsets[c + 1]]


def default_omniglot_source() -> str:
    return os.environ.get("METAPLATFORM_OMNIGLOT") or OFFICIAL_OMNIGLOT_URL


def cache_dir() -> Path:
    return Path(os.environ.get("METAPLATFORM_CACHE") or "~/.cache/metaplatform").expanduser()


def load_omniglot(source: str | None = None, image_format: ImageFormat = OMNIGLOT_FORMAT) -> ImageClasses:
    """All 1623 Omniglot characters (964 background, then 659 evaluation).

    `source` (default: `default_omniglot_source()`) is one of
    * a local folder holding `images_background.zip` and `images_evaluation.zip`, or the two
      folders `images_background/` and `images_evaluation/` extracted from them;
    * an http(s) URL base: `<base>/images_<set>.zip` are downloaded into the cache. Downloads
      from `OFFICIAL_OMNIGLOT_URL` are checked against the published md5 checksums; downloads
      from any other URL are NOT verified;
    * `s3://bucket/prefix`, read with boto3 (endpoint, region and credentials come from the
      standard AWS environment variables, e.g. AWS_ENDPOINT_URL for MinIO).
    A download is reused as long as it is in the cache; delete it there to fetch it again.

    Class names are "<set>/<Alphabet>/<characterNN>", sorted by set, alphabet, character;
    each class's images are sorted by file name.
    """
    source = source or default_omniglot_source()
    paths = {part: _fetch(source, f"images_{part}") for part in OMNIGLOT_SETS}
    files = {part: _omniglot_files(part, path) for part, path in paths.items()}
    with contextlib.ExitStack() as open_zips:  # the zips stay open while the images are decoded

        def classes() -> Classes:
            return [c for part in OMNIGLOT_SETS for c in _omniglot_classes(part, paths[part], files[part], open_zips)]

        return cached_classes("omniglot", image_format, [f for part in OMNIGLOT_SETS for f in files[part]], classes)


def check_omniglot_source(source: str) -> None:
    """Checks what can be checked of an Omniglot source cheaply, before any worker loads it; DataError if not.

    A local folder must hold both zips (or the extracted folders); an http(s) URL must be well-formed
    (nothing is fetched); an s3:// URI must be well-formed and, when AWS credentials are at hand, both
    objects must exist (one HEAD request each, skipped for a download already in the cache).
    """
    if source_kind(source) == "folder":
        for part in OMNIGLOT_SETS:
            _local_path(Path(source).expanduser(), f"images_{part}")
        return
    check_downloads(source, [f"{source.rstrip('/')}/images_{part}.zip" for part in OMNIGLOT_SETS])


def check_downloads(source: str, urls: list[str]) -> None:
    """The files `urls` of a well-formed http(s) or s3 `source`, as far as a check can without fetching
    them: S3 objects must exist (one HEAD each, when AWS credentials are at hand and the download is
    not in the cache yet); http(s) URLs are only parsed."""
    missing = [url for url in urls if not download_path(url).exists()]
    if source_kind(source) == "s3" and missing:
        _check_s3_objects(missing)


def list_image_folder(root: str | Path) -> list[tuple[str, list[Path]]]:
    """The classes of `root/<class>/<image>` and their image files, sorted by name, as load_image_folder reads them.

    Names starting with "." and files without a suffix in IMAGE_SUFFIXES are ignored. Listing only:
    checking a config with it reads no image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{root}: image folder not found (no such folder); expected a folder laid out as <root>/<class>/<image>"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: holds no class folders; put each class's images in <root>/<class>/")
    listing = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))
        if not files:
            raise DataError(
                f"{folder}: class folder holds no images (suffixes {', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        listing.append((folder.name, files))
    return listing


def load_image_folder(root: str | Path, image_format: ImageFormat = OMNIGLOT_FORMAT) -> ImageClasses:
    """The user's own images, laid out as `root/<class>/<image>` (see list_image_folder).

    Images (any format PIL reads) are converted to `image_format` (platform.images): transparent
    parts become white, then resized (aspect ratio not kept); RGB photographs stay as they are, and
    grayscale (the default, Omniglot's preprocessing) is inverted, so dark drawings on a light
    background come out with ink high, like Omniglot, and light-on-dark images the other way round.
    """
    listing = list_image_folder(root)
    key_files = [(f"{name}/{p.name}", p) for name, files in listing for p in files]
    classes = [(name, [(str(p), p.read_bytes) for p in files]) for name, files in listing]
    return cached_classes("folder", image_format, key_files, lambda: classes)


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def source_kind(source: str) -> str:
    """ "http", "s3" or "folder"; DataError for a URL that is not well-formed or of another scheme."""
    scheme, sep, _ = source.partition("://")
    if not sep:
        return "folder"
    parsed = urlparse(source)
    if scheme == "s3":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parsed.netloc):
            raise DataError(
                f"{source}: not a well-formed s3:// URI; expected s3://<bucket>/<prefix> with a valid bucket name"
            )
        return "s3"
    if scheme in ("http", "https"):
        if not _url_host(parsed) or re.search(r"\s", source):
            raise DataError(f"{source}: not a well-formed {scheme} URL; expected {scheme}://<host>[:<port>]/<path>")
        return "http"
    raise DataError(f"{source}: unsupported scheme {scheme!r}; use a local folder, an http(s):// URL or an s3:// URI")


def _url_host(parsed) -> str | None:
    """The URL's host; None without one or with a port that is not a number."""
    try:
        return parsed.hostname if parsed.port is None or parsed.port >= 0 else None
    except ValueError:
        return None


def _fetch(source: str, name: str) -> Path:
    """Local path of `<name>.zip` or of the extracted folder `<name>/` from an Omniglot source."""
    if source_kind(source) != "folder":
        base = source.rstrip("/")
        expected = OFFICIAL_MD5[f"{name}.zip"] if base == OFFICIAL_OMNIGLOT_URL else None
        return download(f"{base}/{name}.zip", expected)
    return _local_path(Path(source).expanduser(), name)


def _local_path(root: Path, name: str) -> Path:
    """`root/<name>.zip` or the extracted folder `root/<name>/`, whichever exists."""
    if not root.is_dir():
        raise DataError(
            f"{root}: Omniglot source folder not found; give a folder holding images_background.zip "
            "and images_evaluation.zip (or set METAPLATFORM_OMNIGLOT), an http(s):// URL or an s3:// URI"
        )
    for path in (root / f"{name}.zip", root / name):
        if path.exists():
            return path
    raise DataError(
        f"{root / name}.zip not found (nor the extracted folder {root / name}/); "
        f"download it from {OFFICIAL_OMNIGLOT_URL}/{name}.zip into {root}"
    )


def download_path(url: str) -> Path:
    return cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{url.rsplit('/', 1)[1]}"


def download(url: str, expected_md5: str | None) -> Path:
    """Downloads `url` into the cache once; only a complete (and verified) file gets its name.

    One downloader at a time per file (a file lock), so the temp files of killed downloaders are
    removed by the next one, and a failing disk is told apart from a failing network.
    """
    dest = download_path(url)

    def fetch() -> None:
        for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # we hold the lock: their writers died
            stale.unlink()
        _download_to(url, dest, expected_md5)

    return made_once(dest, fetch)


def made_once(dest: Path, make: Callable[[], None]) -> Path:
    """`dest` in the download cache (a file or a folder), made by `make()` unless it is there already:
    one maker per node at a time (a file lock beside it; a waiter finds it made), and an OSError while
    making it is the disk's, one DataError naming the folder (network and format errors are DataErrors
    of their own)."""
    if dest.exists():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{dest}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not dest.exists():  # another process may have made it while we waited
                make()
    except OSError as e:
        raise DataError(
            f"cannot write the download cache in {dest.parent} ({e}); free space there "
            "or set METAPLATFORM_CACHE to a folder with room"
        ) from None
    return dest


def _download_to(url: str, dest: Path, expected_md5: str | None) -> None:
    with atomic_file(dest, "w+b") as f:
        sink = _DiskWrites(f)
        (_get_s3 if url.startswith("s3://") else _get_http)(url, sink)
        f.seek(0)
        actual = hashlib.file_digest(f, "md5").hexdigest()
        if expected_md5 and actual != expected_md5:
            raise DataError(
                f"{url}: md5 checksum mismatch (expected {expected_md5}, got {actual}); the download is "
                "corrupt or the file changed upstream: try again, or give a local copy (Omniglot: METAPLATFORM_OMNIGLOT)"
            )


class _DiskWrites:
    """A file's `write` that keeps the error of a failed write (disk full), so that it is reported as
    the disk's, not as the network's; without `seek`, so boto3 writes the parts in order."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise


def _get_http(url: str, sink: _DiskWrites) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, sink, 1 << 20)
    except (OSError, http.client.HTTPException) as e:
        if sink.error:
            raise sink.error from None
        raise DataError(
            f"{url}: download failed ({e}); check the URL and the network, "
            "or give a local copy (Omniglot: METAPLATFORM_OMNIGLOT, a folder holding the zips)"
        ) from None


def _get_s3(uri: str, sink: _DiskWrites) -> None:
    import boto3  # imported here: it is slow to import and only S3 sources need it
    import botocore.exceptions

    parsed = urlparse(uri)
    try:
        boto3.client("s3").download_fileobj(parsed.netloc, parsed.path.lstrip("/"), sink)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        if sink.error:
            raise sink.error from None
        raise DataError(
            f"{uri}: download failed ({e}); check the bucket and key, and the AWS_* environment "
            "variables (credentials, AWS_ENDPOINT_URL for MinIO)"
        ) from None


def _check_s3_objects(uris: list[str]) -> None:
    """DataError unless each object exists; nothing is checked without AWS credentials (the workers may have them)."""
    import boto3  # imported here: it is slow to import and only S3 sources need it
    import botocore.config
    import botocore.exceptions

    session = boto3.Session()
    if session.get_credentials() is None:
        return
    client = session.client("s3", config=botocore.config.Config(connect_timeout=10, retries={"max_attempts": 2}))
    for uri in uris:
        parsed = urlparse(uri)
        try:
            client.head_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
        except botocore.exceptions.ClientError as e:
            status = e.response.get("Error", {}).get("Code", "")
            what = "no such object" if status in ("404", "NoSuchKey", "NoSuchBucket") else f"not readable ({e})"
            raise DataError(f"{uri}: {what}; check the bucket and prefix and the AWS_* environment variables") from None
        except botocore.exceptions.BotoCoreError as e:
            raise DataError(f"{uri}: cannot reach S3 ({e}); check AWS_ENDPOINT_URL and the network") from None


def _omniglot_files(part: str, path: Path) -> list[tuple[str, Path]]:
    """The files that make up one set (background, evaluation), labelled by their path in the official layout."""
    top = f"images_{part}"
    if path.is_file():
        return [(f"{top}.zip", path)]
    return sorted((f"{top}/{p.relative_to(path).as_posix()}", p) for p in path.glob("*/*/*"))


def _omniglot_classes(part: str, path: Path, files: list[tuple[str, Path]], stack: contextlib.ExitStack) -> Classes:
    """The classes of one set, from its zip or from the `files` of its extracted folder."""
    top = f"images_{part}"
    if path.is_file():
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: not a readable zip file ({e}); replace it with a complete copy") from None
        members = {m: (f"{path}: member {m}", functools.partial(archive.read, m)) for m in archive.namelist()}
    else:
        members = {m: (str(p), p.read_bytes) for m, p in files}
    groups = defaultdict(list)
    for member in sorted(members):
        parts = member.split("/")
        if len(parts) == 4 and parts[0] == top and is_image(parts[3]):
            groups[parts[1], parts[2]].append(members[member])
    if not groups:
        raise DataError(
            f"{path}: holds no images in the Omniglot layout {top}/<Alphabet>/<characterNN>/<image>.png; "
            f"use the official {top}.zip"
        )
    return [(f"{part}/{a}/{c}", items) for (a, c), items in sorted(groups.items())]


def cached_classes(
    kind: str, image_format: ImageFormat, key_files: list[tuple[str, Path]], classes: Callable[[], Classes]
) -> ImageClasses:
    """Loads the cache entry for the content of `key_files` in `image_format`, first building it from
    `classes()` if no process has yet (listing the classes is left until then: it is slow for big zips)."""
    key = hashlib.sha256(f"{image_format.preprocessing}\0{kind}\0".encode())
    for label, path in key_files:
        try:
            with open(path, "rb") as f:
                key.update(label.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
    entries = cache_dir() / "images"
    entry = entries / key.hexdigest()[:32]
    if not entry.is_dir():
        try:
            entries.mkdir(parents=True, exist_ok=True)
            with open(entries / f"{entry.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not entry.is_dir():  # another process may have built it while we waited
                    # Said because it takes a while (about a minute for Omniglot), once per node.
                    print(f"building the image cache {entry} (once per node and data set)", file=sys.stderr, flush=True)
                    _build_entry(entry, classes(), image_format)
        except OSError as e:
            raise DataError(
                f"cannot write the image cache in {entries} ({e}); set METAPLATFORM_CACHE to a writable folder"
            ) from None
    index = json.loads((entry / "index.json").read_text())
    return ImageClasses(
        images=np.load(entry / "images.npy", mmap_mode="r"),
        offsets=np.asarray(index["offsets"], dtype=np.int64),
        names=tuple(index["names"]),
    )


def _build_entry(entry: Path, classes: Classes, image_format: ImageFormat) -> None:
    """Decodes all images, then publishes them as `entry/` with one atomic rename."""
    # We hold the lock, so temp folders of this entry are left over from builders that crashed.
    for stale in entry.parent.glob(f".tmp-{entry.name}-*"):
        shutil.rmtree(stale)
    counts = [len(items) for _, items in classes]
    images = np.empty((sum(counts), *image_format.stored_shape), np.uint8)
    for i, (where, read) in enumerate(item for _, items in classes for item in items):
        images[i] = image_format.decode(read, where)
    offsets = [0, *np.cumsum(counts).tolist()]
    index = {"preprocessing": image_format.preprocessing, "offsets": offsets, "names": [name for name, _ in classes]}
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        with atomic_file(tmp / "images.npy") as f:
            np.save(f, images)
        atomic_write(tmp / "index.json", json.dumps(index))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
