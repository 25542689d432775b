"""Kubeflow Pipelines for the platform (docs/pipelines.md): `python -m pipelines.compile`, `python -m pipelines.run_local`."""
