"""Adapt a trained model to your own labelled examples and predict:
`python -m platform.adapt --checkpoint LOCATION --support DIR --query DIR|FILES... [--steps N]
[--bn-stats support|batch] [--output predictions.csv|.json]`.

Classification: `--support DIR` is laid out `DIR/<label>/<image>` (the folder names are the labels),
`--query` is a folder of images or image files. Regression: `--support` is a CSV of `x,y` rows and
`--query` a CSV of `x` values (either may start with a header line). One output row per query: the
file, the predicted label and the probability of each label (regression: x and the predicted y);
printed as a table, or written whole to `--output` (.csv or .json). `LOCATION` is a checkpoint
file, folder or s3:// prefix, or an MLflow model URI (runs:/<run id>/model, models:/<name>@<alias>).
Queries are normalised by the support set's statistics unless `--bn-stats batch` (platform/learner.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np

from platform.algorithms import BN_STATS
from platform.cli import run
from platform.config import ConfigError
from platform.data import IMAGE_SUFFIXES, is_image
from platform.files import atomic_write
from platform.learner import InputError, Learner, load_images, load_learner

OUTPUT_SUFFIXES = (".csv", ".json")
MAX_LINES = 20  # problems reported per file before "... and N more"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))


def support_images(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """(image files, their labels, problems) of a support folder `root/<label>/<image>`."""
    if not root.is_dir():
        return [], [], [f"--support {root}: not a folder; expected <folder>/<label>/<image>"]
    paths, labels, problems = [], [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        problems.append(f"--support {root}: holds no label folders; put each label's images in {root}/<label>/")
    for folder in folders:
        images = _images_in(folder)
        if not images:
            problems.append(f"--support {folder}: label folder holds no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
        paths += images
        labels += [folder.name] * len(images)
    return paths, labels, problems


def query_images(items: list[Path]) -> tuple[list[Path], list[str]]:
    """(image files, problems) of `--query`: one folder of images, or image files."""
    if len(items) == 1 and items[0].is_dir():
        images = _images_in(items[0])
        return images, [] if images else [f"--query {items[0]}: holds no images (suffixes {', '.join(IMAGE_SUFFIXES)})"]
    missing = [f"--query {p}: no such file" for p in items if not p.is_file()]
    return items, missing


def _capped(problems: list[str]) -> list[str]:
    more = len(problems) - MAX_LINES
    return problems[:MAX_LINES] + ([f"... and {more} more"] if more > 0 else [])


def read_numbers(path: Path, columns: int, flag: str) -> tuple[np.ndarray, list[str]]:
    """(rows of `columns` numbers, problems) of a CSV file; its first line may be a header."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return np.zeros((0, columns)), [f"{flag} {path}: cannot read the CSV file ({e})"]
    rows, problems = [], []
    for line, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not any(cell.strip() for cell in row):
            continue
        try:
            values = [float(cell) for cell in row]
        except ValueError:
            if line == 1 and not rows:
                continue  # a header
            problems.append(f"{flag} {path} line {line}: {','.join(row)!r} is not {columns} number(s)")
            continue
        if len(values) != columns or not np.isfinite(values).all():
            problems.append(f"{flag} {path} line {line}: {len(values)} values; expected {columns} finite number(s)")
            continue
        rows.append(values)
    if not rows and not problems:
        problems.append(f"{flag} {path}: no rows; expected {columns} comma-separated number(s) per line")
    return np.asarray(rows, dtype=np.float32).reshape(-1, columns), _capped(problems)


def _output_problems(output: Path | None) -> list[str]:
    if output is None:
        return []
    problems = []
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        problems.append(f"--output {output}: must end in .csv or .json")
    if not output.parent.is_dir():
        problems.append(f"--output {output}: folder {output.parent} does not exist")
    return problems


def classify(learner: Learner, support: Path, queries: list[Path], steps: int | None) -> list[dict]:
    """One row per query: file, label and the probability of each label."""
    support_paths, labels, problems = support_images(support)
    query_paths, query_problems = query_images(queries)
    problems += query_problems + learner.label_problems(len(set(labels)), f"--support {support}")
    images = {}
    for field, paths in (("support", support_paths), ("query", query_paths)):
        try:
            images[field] = load_images(paths, learner.image_format) if paths else None
        except InputError as e:
            problems += e.problems
    if problems:
        raise InputError(_capped(problems))
    predictions = learner.adapt(images["support"], labels, steps).predict(images["query"])
    return [
        {"file": str(path), "label": label, "probabilities": dict(zip(predictions.classes, map(float, p)))}
        for path, label, p in zip(query_paths, predictions.labels, predictions.probabilities)
    ]


def regress(learner: Learner, support: Path, queries: list[Path], steps: int | None) -> list[dict]:
    """One row per query: x and the predicted y."""
    if len(queries) != 1:
        raise InputError([f"--query: give one CSV file of x values for a regression model, not {len(queries)} files"])
    pairs, problems = read_numbers(support, 2, "--support")
    xs, query_problems = read_numbers(queries[0], 1, "--query")
    if problems + query_problems:
        raise InputError(problems + query_problems)
    values = learner.adapt(pairs[:, :1], pairs[:, 1:], steps).predict(xs)
    return [{"x": float(x), "y": float(y)} for x, y in zip(xs[:, 0], values)]


def _flat(row: dict) -> dict:
    """A row for a CSV file or a table: each label's probability in a column `p(<label>)`."""
    probabilities = row.get("probabilities", {})
    return {k: v for k, v in row.items() if k != "probabilities"} | {f"p({c})": p for c, p in probabilities.items()}


def render(rows: list[dict], suffix: str) -> str:
    """The rows as JSON (a list of objects), CSV, or (no suffix) an aligned table."""
    if suffix == ".json":
        return json.dumps(rows, indent=1) + "\n"
    flat = [_flat(r) for r in rows]
    columns = list(flat[0])
    if suffix == ".csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in flat])
        return out.getvalue()
    cells = [columns] + [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in flat]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Adapt a trained model to your labelled examples and predict.")
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint file, folder, s3:// prefix, or MLflow model URI"
    )
    parser.add_argument("--support", required=True, type=Path, help="<folder>/<label>/<image> (regression: x,y CSV)")
    parser.add_argument(
        "--query", required=True, type=Path, nargs="+", help="a folder of images, image files, or an x CSV"
    )
    parser.add_argument("--steps", type=int, help="inner steps (default: the run's optim.test_inner_steps)")
    parser.add_argument(
        "--bn-stats", choices=BN_STATS, default="support", help="normalise queries by (default: support)"
    )
    parser.add_argument("--output", type=Path, help="write the predictions to this .csv or .json file")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 0:
        parser.error(f"--steps {args.steps}: must be >= 0")
    if problems := _output_problems(args.output):
        raise ConfigError(problems)
    learner = load_learner(args.checkpoint, args.bn_stats)
    rows = (classify if learner.classification else regress)(learner, args.support, args.query, args.steps)
    text = render(rows, args.output.suffix.lower() if args.output else "")
    if args.output is None:
        print(text, end="")
    else:
        atomic_write(args.output, text)
        print(f"{len(rows)} predictions written to {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
