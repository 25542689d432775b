"""Write the pipeline as KFP IR YAML for upload to Kubeflow: `python -m pipelines.compile [--output F] [--image I]`.

`--graph F.dot` also writes the compiled DAG (steps, dependencies, the condition) for Graphviz:
`dot -Tpng F.dot -o F.png` draws the picture in docs/pipelines.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pipelines.pipeline import DEFAULT_IMAGE, build_pipeline
from platform.files import atomic_file


def graph(spec: dict) -> str:
    """The IR's DAG in Graphviz: one box per step, a dashed cluster per condition, edges = dependencies."""
    lines = ["digraph pipeline {", '  rankdir=LR; node [shape=box, style="rounded,filled", fillcolor="#e8f0fe"];']

    def add(tasks: dict, indent: str) -> None:
        for name, task in tasks.items():
            dag = spec["components"][task["componentRef"]["name"]].get("dag")
            if dag is None:
                lines.append(f'{indent}"{name}";')
                continue
            condition = task.get("triggerPolicy", {}).get("condition", "").replace('"', "'")
            label = f"{task['taskInfo']['name']}: {condition}"
            lines.append(f'{indent}subgraph "cluster_{name}" {{ label="{label}"; style=dashed; fontsize=10;')
            add(dag["tasks"], indent + "  ")
            lines.append(f"{indent}}}")

    def edges(tasks: dict) -> None:
        for name, task in tasks.items():
            dag = spec["components"][task["componentRef"]["name"]].get("dag")
            targets = list(dag["tasks"]) if dag else [name]
            for upstream in task.get("dependentTasks", []):
                lines.extend(f'  "{upstream}" -> "{t}";' for t in targets)
            if dag:
                edges(dag["tasks"])

    root = spec["root"]["dag"]["tasks"]
    add(root, "  ")
    edges(root)
    return "\n".join([*lines, "}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--output", default="pipeline.yaml", help="the IR YAML to write (default pipeline.yaml)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"the steps' image (default {DEFAULT_IMAGE})")
    parser.add_argument("--graph", help="also write the DAG as a Graphviz .dot file")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".yaml", ".yml"):
        parser.error(f"--output {args.output}: must end in .yaml or .yml (KFP writes Kubernetes settings only to YAML)")
    if not output.parent.is_dir():
        parser.error(f"--output {args.output}: folder {output.parent} does not exist")
    from kfp import compiler

    with atomic_file(output, "w", suffix=output.suffix) as f:  # never a half-written pipeline file
        compiler.Compiler().compile(build_pipeline(args.image), f.name)
    if args.graph:
        Path(args.graph).write_text(graph(next(yaml.safe_load_all(output.read_text()))))
    print(f"wrote {output} (steps on {args.image}); upload it in the Kubeflow Pipelines UI or with kfp.Client")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
