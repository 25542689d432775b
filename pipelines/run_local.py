"""Run the whole pipeline on this machine with kfp.local, against a Ray cluster and an MLflow server.

    python -m pipelines.run_local --ray-address http://127.0.0.1:8265 --mlflow-uri http://127.0.0.1:5000 \\
        [--config configs/sinusoid.yaml] [--overrides k=v ...] [--samples N] [--storage DIR] ...

Every pipeline parameter is an option (`--train-iterations` for `train_iterations`; lists take
several values, dicts a JSON object). Steps run as subprocesses of this Python (no containers),
and the Ray jobs find the token in $RAY_AUTH_TOKEN as `ray job submit` does. Checkpoints go under
`--storage`, which the cluster must be able to reach (a local folder for a local cluster; default
`kfp-local/checkpoints`). Step outputs and logs go under `--pipeline-root` (default `kfp-local/`).
"""

import argparse
import inspect
import json
import sys
import warnings
from pathlib import Path

from pipelines.pipeline import build_pipeline

# Meaningful on Kubernetes only (Secrets mounted as environment variables).
CLUSTER_ONLY = ("ray_token_secret", "mlflow_auth_secret")
# Their defaults are Kubernetes service names: here they must be given.
REQUIRED = ("ray_address", "mlflow_uri")
# The smallest value of the counts that make sense.
MINIMUM = {"samples": 1, "tune_iterations": 1, "train_iterations": 1, "eval_tasks": 2}


def parameters(pipeline) -> dict[str, inspect.Parameter]:
    return {
        name: p for name, p in inspect.signature(pipeline.pipeline_func).parameters.items() if name not in CLUSTER_ONLY
    }


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def make_parser(pipeline) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--pipeline-root", default="kfp-local", help="where step outputs and logs go")
    for name, p in parameters(pipeline).items():
        flag = "--" + name.replace("_", "-")
        kwargs = {"required": True} if name in REQUIRED else {"default": p.default, "help": "pipeline parameter"}
        if p.annotation is list:
            parser.add_argument(flag, nargs="*", metavar="VALUE", **kwargs)
        elif p.annotation is dict:
            parser.add_argument(flag, type=json_object, metavar="JSON", **kwargs)
        else:
            parser.add_argument(flag, type=p.annotation, **kwargs)
    parser.set_defaults(storage=str(Path("kfp-local", "checkpoints")))
    return parser


def main(argv: list[str] | None = None) -> int:
    pipeline = build_pipeline(image="python:3.11")  # the image is not used by SubprocessRunner
    parser = make_parser(pipeline)
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in parameters(pipeline)}
    for name, least in MINIMUM.items():
        if values[name] < least:
            parser.error(f"--{name.replace('_', '-')} {values[name]}: must be at least {least}")
    if not values["storage"].startswith("s3://"):
        values["storage"] = str(Path(values["storage"]).absolute())
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(args.pipeline_root).absolute()))
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    try:
        pipeline(**values)
    except RuntimeError as e:  # a failed step: its own output above says why
        print(f"error: the pipeline failed: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"pipeline finished; step outputs under {Path(args.pipeline_root).absolute()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
