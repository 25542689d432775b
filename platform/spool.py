"""A durable, ordered queue of JSON records in a folder, consumed in order by one reader.

    <folder>/records.jsonl   the records, one JSON line each, append-only
    <folder>/delivered       how many of them the consumer has taken
    <folder>/<name>          small named values the consumer keeps (`get` / `put`)
    <folder>/files/          payloads the records name

A crash can tear the last line of records.jsonl (a partial write): opening the spool cuts the file
back to its last complete record, so later appends start on a line of their own and nothing
written after the crash is lost behind the fragment.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from platform.files import atomic_write

RECORDS, DELIVERED = "records.jsonl", "delivered"


class Spool:
    """The queue in `folder` (created if missing); `records` in order, `delivered` of them consumed."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = self.folder / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self._path = self.folder / RECORDS
        self.records = self._load()
        # Never past the records: a count saved before a torn tail was cut away.
        self.delivered = min(int(self.get(DELIVERED) or 0), len(self.records))
        self._lock = threading.Lock()

    def _load(self) -> list[dict]:
        """The complete records; a torn tail is cut off the file."""
        if not self._path.exists():
            return []
        data = self._path.read_bytes()
        end = data.rfind(b"\n") + 1  # what follows the last newline is a torn record
        if end < len(data):
            os.truncate(self._path, end)
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line an older version left torn mid-file: skipped, as before
                continue
        return records

    def get(self, name: str) -> str | None:
        path = self.folder / name
        return path.read_text().strip() if path.exists() else None

    def put(self, name: str, text: str) -> None:
        atomic_write(self.folder / name, text)

    def append(self, record: dict) -> None:
        """Add `record` (flushed to the OS before this returns). OSError when the disk refuses it, and
        then nothing of it stays in the file: the next append starts on a line of its own."""
        line = (json.dumps(record) + "\n").encode()
        with self._lock, open(self._path, "ab", buffering=0) as f:  # unbuffered: nothing left to fail at close
            size, rest = f.tell(), memoryview(line)
            try:
                while rest:
                    rest = rest[f.write(rest) :]
            except OSError:
                f.truncate(size)
                raise
            self.records.append(record)

    def set_delivered(self, count: int) -> None:
        self.delivered = count
        self.put(DELIVERED, str(count))

    @property
    def pending(self) -> int:
        return len(self.records) - self.delivered
