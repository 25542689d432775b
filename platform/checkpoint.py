"""Checkpoint storage in a local folder or under an s3://bucket/prefix: atomic writes, keep the newest N.

A checkpoint is one dict (tensors, numpy arrays, numbers, strings, nested dicts/lists/tuples) saved
with torch.save as `ckpt-<iteration:08d>.pt`. One process writes to a store at a time; any number
may read it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from platform.config import ConfigError
from platform.files import atomic_write

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d{8,})\.pt")
_DIGEST = ".sha256"  # suffix of the sidecar holding a checkpoint's SHA-256

# We load with weights_only=True: a checkpoint may come from a shared bucket, and the restricted
# unpickler cannot run code, while our plain-data checkpoints need nothing more than torch's
# default allowlist plus numpy arrays and scalars (numpy RNG state, metrics). These globals only
# rebuild arrays, scalars and dtypes; an object array's elements still go through the restricted
# unpickler. Added process-wide once, because the `safe_globals` context manager edits the same
# global set on entry and exit, which races between threads and drops entries a caller added too.
torch.serialization.add_safe_globals(
    [
        np.zeros(0).__reduce__()[0],  # numpy's _reconstruct, whose module differs in numpy 1 and 2
        np.float64(0).__reduce__()[0],  # numpy's scalar
        np.ndarray,
        np.dtype,
        *(t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)),
    ]
)


def _name(iteration: int) -> str:
    return f"ckpt-{iteration:08d}.pt"


class CheckpointError(Exception):
    """A checkpoint location or file cannot be used; the message names it and the problem."""


@contextmanager
def _raise_as_checkpoint_error(where: str, doing: str, errors):
    try:
        yield
    except errors as e:
        raise CheckpointError(f"{where}: {doing}: {e}") from e


class _LocalFolder:
    def __init__(self, location: str | Path):
        self.root = Path(location).expanduser().absolute()
        self.location = str(self.root)
        # Created now so that an unusable path fails when the store is made, not hours later.
        with _raise_as_checkpoint_error(self.location, "cannot create checkpoint folder", OSError):
            self.root.mkdir(parents=True, exist_ok=True)

    def uri(self, name: str) -> str:
        return str(self.root / name)

    def names(self) -> list[str]:
        with _raise_as_checkpoint_error(self.location, "cannot list checkpoints", OSError):
            return os.listdir(self.root)

    def read(self, name: str) -> bytes:
        with _raise_as_checkpoint_error(self.uri(name), "cannot read", OSError):
            return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def write(self, name: str, data: bytes) -> None:
        with _raise_as_checkpoint_error(self.uri(name), "cannot write", OSError):
            for stale in self.root.glob(".ckpt-*.tmp"):  # left by a writer that crashed mid-write
                stale.unlink(missing_ok=True)
            atomic_write(self.root / name, data)

    def delete(self, name: str) -> None:
        with _raise_as_checkpoint_error(self.uri(name), "cannot delete", OSError):
            (self.root / name).unlink(missing_ok=True)


class _S3Prefix:
    def __init__(self, location: str):
        # Imported here: boto3 is slow to import and only S3 stores need it.
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self.bucket, _, prefix = location.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.location = f"s3://{self.bucket}/{self.prefix}"
        if not self.bucket:
            raise CheckpointError(f"{location}: no bucket in the S3 URI")
        # Endpoint, region and credentials come from the standard AWS_* variables (MinIO, moto).
        self.client = boto3.client("s3")
        # Checked now so that a missing bucket fails when the store is made, not hours later.
        with _raise_as_checkpoint_error(self.location, "cannot access bucket", self._errors):
            self.client.head_bucket(Bucket=self.bucket)

    def uri(self, name: str) -> str:
        return self.location + name

    def names(self) -> list[str]:
        with _raise_as_checkpoint_error(self.location, "cannot list checkpoints", self._errors):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            return [o["Key"][len(self.prefix) :] for page in pages for o in page.get("Contents", [])]

    def read(self, name: str) -> bytes:
        with _raise_as_checkpoint_error(self.uri(name), "cannot read", self._errors):
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
        except self._errors as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise CheckpointError(f"{self.uri(name)}: cannot access: {e}") from e
        return True

    def write(self, name: str, data: bytes) -> None:
        # A single put_object is atomic: the object appears whole or not at all.
        with _raise_as_checkpoint_error(self.uri(name), "cannot write", self._errors):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def delete(self, name: str) -> None:
        with _raise_as_checkpoint_error(self.uri(name), "cannot delete", self._errors):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)


def open_storage(location: str | Path) -> _LocalFolder | _S3Prefix:
    """Named files under a local folder or an s3://bucket/prefix, each written whole or not at all
    (`names()`, `exists(name)`, `read(name)`, `write(name, data)`, `delete(name)`, `uri(name)`); CheckpointError
    if unusable."""
    if str(location).startswith("s3://"):
        return _S3Prefix(str(location))
    return _LocalFolder(location)


class CheckpointStore:
    """Checkpoints under a local folder or an s3://bucket/prefix URI, named ckpt-<iteration:08d>.pt.

    Each checkpoint has a sidecar `ckpt-<iteration:08d>.pt.sha256` with the SHA-256 of its bytes,
    written before it: a listed checkpoint always has its digest, and loading verifies it, so a
    truncated or bit-flipped file is never taken for a good one. Old checkpoints are pruned only
    after the new one has been read back and verified.
    """

    def __init__(self, location: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._backend = open_storage(location)
        self.location = self._backend.location

    def uri(self, iteration: int) -> str:
        return self._backend.uri(_name(iteration))

    def encode(self, state: dict) -> bytes:
        """`state` as checkpoint bytes; refuses now what load() would refuse, rather than at resume time."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        refused = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        if refused:
            raise CheckpointError(
                f"{self.location}: the state holds types that load() refuses: "
                f"{sorted(refused)}; store plain data (dicts, lists, numbers, strings, tensors, arrays)"
            )
        return data

    def write(self, data: bytes, iteration: int) -> str:
        """Store encoded checkpoint bytes as `iteration`, verify them, then prune; returns the path or URI.

        A checkpoint is never rewritten with other bytes: its digest would be replaced before its
        data, and a crash between the two would leave the only copy looking damaged."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        name = _name(iteration)
        digest = hashlib.sha256(data).hexdigest()
        if self._backend.exists(name):
            if self._backend.read(name + _DIGEST).decode().strip() == digest:
                return self._backend.uri(name)  # the same checkpoint again (a retried write)
            raise CheckpointError(
                f"{self._backend.uri(name)}: a different checkpoint {iteration} exists; not rewriting it"
            )
        self._backend.write(name + _DIGEST, digest.encode())
        self._backend.write(name, data)
        self._verify(name, self._backend.read(name))
        self._prune(iteration)
        return self._backend.uri(name)

    @contextmanager
    def exclusive(self):
        """Held while one run writes here; another run's try fails at once (ConfigError). Local folders
        only (flock on `.writer.lock`): S3 has no lock, so give concurrent runs their own prefixes."""
        if not isinstance(self._backend, _LocalFolder):
            yield
            return
        with open(self._backend.root / ".writer.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    [
                        f"checkpoint.dir = {self.location!r}: another run is writing checkpoints there now; give this one another checkpoint.dir"
                    ]
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self, state: dict, iteration: int) -> str:
        """Write `state` as the checkpoint of `iteration`, return its path or URI, keep the newest `keep`."""
        return self.write(self.encode(state), iteration)

    def set_aside_after(self, iteration: int) -> list[int]:
        """Move the checkpoints after `iteration` into a folder `superseded-<iteration>[-n]` beside them
        (nothing is deleted), and return their iterations. For a run that goes on from `iteration` again
        (a Tune trial restored from an older checkpoint: PBT's exploit, a restart): those checkpoints are
        a branch it left, and it writes their iterations anew, where a checkpoint is never rewritten.
        Local folders only (a trial's are local). Each file moves by a rename, the checkpoint before its
        digest, so a listed checkpoint always has its digest."""
        later = [i for i in self.iterations() if i > iteration]
        if not later:
            return []
        if not isinstance(self._backend, _LocalFolder):
            raise CheckpointError(f"{self.location}: setting checkpoints aside is for local folders")
        root = self._backend.root
        target, n = root / f"superseded-{iteration}", 1
        while target.exists():
            target, n = root / f"superseded-{iteration}-{n}", n + 1
        target.mkdir()
        for i in later:
            for name in (_name(i), _name(i) + _DIGEST):
                os.replace(root / name, target / name)
        return later

    def iterations(self) -> list[int]:
        """Iterations of the complete checkpoints, ascending."""
        return sorted(int(m[1]) for name in self._backend.names() if (m := _NAME.fullmatch(name)))

    def latest(self) -> int | None:
        """Iteration of the newest complete checkpoint, or None if there is none."""
        iterations = self.iterations()
        return iterations[-1] if iterations else None

    def load(self, iteration: int | None = None) -> dict:
        """The checkpoint of `iteration`, with all tensors on the CPU; a damaged one raises CheckpointError.

        With `iteration=None`, the newest intact checkpoint: damaged newer ones are skipped with a
        warning naming them, and if none is intact the error names them all.
        """
        if iteration is not None:
            return self._load(iteration)
        bad = []
        for candidate in reversed(self.iterations()):
            try:
                state = self._load(candidate)
            except CheckpointError as e:
                bad.append(str(e))
                continue
            for problem in bad:
                log.warning("skipped a damaged checkpoint: %s; using %s", problem, self.uri(candidate))
            return state
        if bad:
            raise CheckpointError(f"{self.location}: no intact checkpoint: " + "; ".join(bad))
        raise CheckpointError(f"{self.location}: no checkpoint to load")

    def _load(self, iteration: int) -> dict:
        name = _name(iteration)
        data = self._backend.read(name)
        self._verify(name, data)
        # map_location="cpu" so a checkpoint written on a GPU loads anywhere; load_state_dict then
        # copies the tensors onto the model's device.
        with _raise_as_checkpoint_error(self._backend.uri(name), "unreadable checkpoint", Exception):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def _verify(self, name: str, data: bytes) -> None:
        try:
            expected = self._backend.read(name + _DIGEST).decode().strip()
        except CheckpointError:
            raise CheckpointError(
                f"{self._backend.uri(name)}: damaged checkpoint: its digest {name}{_DIGEST} is missing"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(
                f"{self._backend.uri(name)}: damaged checkpoint: SHA-256 {actual[:12]}... of its {len(data)} bytes "
                f"differs from the {expected[:12]}... recorded when it was written (truncated or corrupted)"
            )

    def _prune(self, just_written: int) -> None:
        """Delete all but the newest `keep` checkpoints (never the one just written), and stray digests."""
        names = set(self._backend.names())
        old = {_name(i) for i in self.iterations()[: -self.keep] if i != just_written}
        # A digest without its checkpoint is left by a writer that died between the two writes.
        strays = {n for n in names if n.endswith(_DIGEST) and n.removesuffix(_DIGEST) not in names}
        strays.discard(_name(just_written) + _DIGEST)
        for name in sorted(old) + sorted(n + _DIGEST for n in old) + sorted(strays):
            # The checkpoint is already safe, so a failed delete must not fail the save; the next
            # save retries it.
            try:
                self._backend.delete(name)
            except CheckpointError as e:
                log.warning("could not prune an old checkpoint: %s", e)


class CheckpointWriter:
    """Writes checkpoints in a background thread, so unreachable storage never stalls training.

    `submit` encodes the state at once (the caller's tensors may change right after) and queues the
    bytes; a newer submission supersedes one not yet written. A failed write is retried with
    exponential back-off (up to `max_backoff_s`); the first failure of an outage and the recovery
    are each reported once. `flush(timeout_s)` waits for the newest submission to land.
    `on_written(location, iteration)` is called, in the writer's thread, once a checkpoint is on
    storage and verified (before `flush` returns): what names a checkpoint must wait for it.
    """

    def __init__(
        self,
        store: CheckpointStore,
        report=log.warning,
        max_backoff_s: float = 30.0,
        on_written: Callable[[str, int], None] = lambda location, iteration: None,
    ):
        self.store, self.report, self.max_backoff_s, self.on_written = store, report, max_backoff_s, on_written
        self.written: str | None = None  # path or URI of the newest checkpoint written
        self._pending: tuple[int, bytes] | None = None
        self._busy = False  # a write is in progress
        self._error: str | None = None  # set while storage fails
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state: dict, iteration: int) -> str:
        """Queue `state` as the checkpoint of `iteration`; returns where it will be."""
        data = self.store.encode(state)
        with self._changed:
            self._pending = (iteration, data)
            self._changed.notify_all()
        return self.store.uri(iteration)

    def flush(self, timeout_s: float) -> str:
        """Wait until every submitted checkpoint is written; CheckpointError after `timeout_s`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._pending is None and not self._busy, timeout=timeout_s):
                iteration = self._pending[0] if self._pending else None
                raise CheckpointError(
                    f"{self.store.uri(iteration) if iteration is not None else self.store.location}: "
                    f"still not written after {timeout_s:g}s of retrying ({self._error}); the newest "
                    f"checkpoint written is {self.written or 'none'}"
                )
            return self.written

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                (iteration, data), self._pending, self._busy = self._pending, None, True
            try:
                where = self.store.write(data, iteration)
            except CheckpointError as e:
                with self._changed:
                    if self._error is None:
                        self.report(f"checkpoint storage failed ({e}); training goes on, retrying with back-off")
                    self._error = str(e)
                    if self._pending is None:  # nothing newer to write instead: retry this one
                        self._pending = (iteration, data)
                    self._busy = False
                    self._changed.notify_all()
                    self._changed.wait_for(lambda: self._closed, timeout=backoff)
                    backoff = min(2 * backoff, self.max_backoff_s)
                continue
            self.on_written(where, iteration)
            with self._changed:
                if self._error is not None:
                    self.report(f"checkpoint storage is back: wrote {where}")
                self.written, self._error, self._busy, backoff = where, None, False, 1.0
                self._changed.notify_all()


def load_checkpoint(location: str | Path) -> dict:
    """A checkpoint named by its file or object (`.../ckpt-N.pt`), or the newest one under a folder or prefix."""
    location = str(location).rstrip("/")
    if not location.startswith("s3://") and not Path(location).expanduser().exists():
        raise CheckpointError(f"{location}: no such checkpoint file or folder")
    head, _, name = location.rpartition("/")
    if match := _NAME.fullmatch(name):
        return CheckpointStore(head or ".").load(int(match[1]))
    return CheckpointStore(location).load()
