"""What the commands share: argument parsing of config + overrides, and turning user mistakes into exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from platform.checkpoint import CheckpointError
from platform.config import ConfigError
from platform.data import DataError

USAGE_ERROR = 2


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML run config (default: the embedded sinusoid MAML run)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. optim.inner_lr=0.4 optim.inner_steps=3",
    )
    return parser


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    """An error as one line for a message: its type's name and the first line of what it says."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def run(main) -> None:
    """Run a command's main(); bad input prints one line per problem and exits 2, with no traceback."""
    logging.basicConfig(format="%(levelname)s: %(message)s")  # our modules' warnings, one line each
    try:
        sys.exit(main())
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(USAGE_ERROR)
