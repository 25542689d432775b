"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

The one way the platform writes a local file that someone may read while it is written or after a
crash (checkpoints, the image cache, tracking spools, downloads, caches of results).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO]:
    """A file object for a temp file beside `path`; when the block ends without error the data is
    flushed to disk, renamed over `path` and the rename made durable; on error the temp file goes.
    `suffix` ends the temp file's name (for writers that choose a format by it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=suffix
    )  # hidden: never listed as the file
    os.close(fd)
    try:
        with open(tmp, mode) as f:  # reopened by name: `f.name` is the temp path, for writers that take one
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically and durably (see atomic_file)."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def fsync_folder(folder: str | Path) -> None:
    """Persist a folder's entries (a rename into it), or a power loss could still lose the new name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
