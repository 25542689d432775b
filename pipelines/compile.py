"""Write the pipeline as KFP IR YAML for upload to Kubeflow: `python -m pipelines.compile [--output F] [--image I]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.pipeline import DEFAULT_IMAGE, build_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--output", default="pipeline.yaml", help="the IR YAML to write (default pipeline.yaml)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"the steps' image (default {DEFAULT_IMAGE})")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".yaml", ".yml"):
        parser.error(f"--output {args.output}: must end in .yaml or .yml (KFP writes Kubernetes settings only to YAML)")
    if not output.parent.is_dir():
        parser.error(f"--output {args.output}: folder {output.parent} does not exist")
    from kfp import compiler

    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    compiler.Compiler().compile(build_pipeline(args.image), str(tmp))
    tmp.replace(output)  # never a half-written pipeline file
    print(f"wrote {output} (steps on {args.image}); upload it in the Kubeflow Pipelines UI or with kfp.Client")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
