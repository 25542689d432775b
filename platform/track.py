"""Tracking chores: `python -m platform.track sync SPOOL [--uri URI]`.

`sync` delivers what a run left in its MLflow spool (see platform.tracking) because the tracking
server was unreachable when it ended: in order, each record once, then removes the spool. It
exits 1, keeping the rest, if the server is still unreachable.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from platform.cli import USAGE_ERROR, run, warn
from platform.delivery import Delivery, RunSpool


def sync(folder: Path, uri: str | None) -> int:
    if not (folder / "records.jsonl").is_file():
        print(f"error: {folder}: not an MLflow spool (no records.jsonl in it)", file=sys.stderr)
        return USAGE_ERROR
    spool = RunSpool(folder)
    uri = uri or spool.uri
    if not uri:
        print(f"error: {folder}: the spool does not say where its records go; give --uri", file=sys.stderr)
        return USAGE_ERROR
    delivery = Delivery(spool, uri, report=warn)
    total = spool.pending
    while spool.pending:
        if not delivery.run_once():
            print(
                f"error: {uri} unreachable: {total - spool.pending} of {total} records sent, "
                f"{spool.pending} kept in {folder}; run this again later",
                file=sys.stderr,
            )
            return 1
    shutil.rmtree(folder)
    print(f"sent {total} records to MLflow run {spool.run_id} in {uri}; removed {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tracking chores for metaplatform runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="deliver the records a run left in its MLflow spool")
    sync_parser.add_argument("spool", type=Path, help="the spool folder the run named")
    sync_parser.add_argument("--uri", help="tracking URI (default: the one the run used)")
    args = parser.parse_args(argv)
    return sync(args.spool, args.uri)


if __name__ == "__main__":
    run(main)
