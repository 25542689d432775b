"""The KFP v2 pipeline: tune -> train -> evaluate -> register, the last only when the new model wins.

    tune      `platform.tune` as a Ray job; outputs the best trial's config (an artifact), its
              hyperparameters as overrides, and the sweep's MLflow parent run id
    train     `platform.train` of the preset + the best hyperparameters for the full budget;
              outputs the run's MLflow id and its final checkpoint
    evaluate  `platform.evaluate` on held-out tasks (600 by default) into the training run; outputs
              the meta-test metric with its 95% CI (KFP metrics) and whether it beats the model that
              holds the registry alias (recorded on the run as `champion_comparison` either way)
    register  under dsl.If(evaluate beats the champion): a new registered model version, alias moved

The steps are lightweight Python components on the platform's own image (it carries kfp, Ray's
job client, MLflow and this code); their work is in pipelines/steps.py. On Kubernetes each step
reads the Ray token from the Secret named by `ray_token_secret` (the chart's `<release>-ray-auth`)
and MLflow credentials from `mlflow_auth_secret` when that Secret exists.
"""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
import functools
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Metrics, Output

DEFAULT_IMAGE = "ghcr.io/metaplatform/metaplatform:0.1.0"  # the Helm chart's image.repository:tag
CLIENT_LABEL = ("metaplatform.io/client", "true")  # the chart's NetworkPolicy lets such pods in


# -- the components: thin wrappers of pipelines.steps (KFP ships each function's source alone, so
# everything they use is imported inside them) ------------------------------------------------------


def tune(ray_address: str, mlflow_uri: str, experiment: str, config: str, overrides: list, samples: int,
         scheduler: str, iterations: int, storage: str, runtime_env: dict, pipeline_run: str,
         best_config: Output[Artifact]) -> NamedTuple("TuneOutputs", [("sweep_run_id", str), ("best_overrides", list)]):  # fmt: skip
    """A Ray Tune sweep over the preset; the best trial's config and hyperparameters."""
    from collections import namedtuple

    from pipelines.steps import run_step, tune

    run_id, best = run_step(tune, ray_address, mlflow_uri, experiment, config, overrides, samples, scheduler,
                            iterations, storage, runtime_env, pipeline_run, best_config.path)  # fmt: skip
    best_config.metadata.update({"sweep_run_id": run_id, "overrides": best})
    return namedtuple("TuneOutputs", ["sweep_run_id", "best_overrides"])(run_id, best)


def train(ray_address: str, mlflow_uri: str, experiment: str, config: str, overrides: list, best_overrides: list,
          iterations: int, storage: str, runtime_env: dict,
          pipeline_run: str) -> NamedTuple("TrainOutputs", [("run_id", str), ("checkpoint", str)]):  # fmt: skip
    """Distributed training of the best config for the full budget."""
    from collections import namedtuple

    from pipelines.steps import run_step, train

    run_id, checkpoint = run_step(train, ray_address, mlflow_uri, experiment, config, overrides, best_overrides,
                                  iterations, storage, runtime_env, pipeline_run)  # fmt: skip
    return namedtuple("TrainOutputs", ["run_id", "checkpoint"])(run_id, checkpoint)


def evaluate(ray_address: str, mlflow_uri: str, run_id: str, checkpoint: str, tasks: int, registered_model: str,
             alias: str, runtime_env: dict, pipeline_run: str, metrics: Output[Metrics]) -> bool:  # fmt: skip
    """Meta-test on held-out tasks; True when the model beats the one holding the alias."""
    import math

    from pipelines.steps import evaluate, run_step

    values, beats = run_step(evaluate, ray_address, mlflow_uri, run_id, checkpoint, tasks, registered_model,
                                alias, runtime_env, pipeline_run)  # fmt: skip
    for name, value in values.items():
        if math.isfinite(value):  # KFP metadata cannot hold NaN
            metrics.log_metric(name, value)
    return beats


def register(mlflow_uri: str, run_id: str, registered_model: str, alias: str, pipeline_run: str) -> str:
    """A new version of the registered model from the training run; the alias moves to it."""
    from pipelines.steps import register, run_step

    return run_step(register, mlflow_uri, run_id, registered_model, alias, pipeline_run)


# -- the pipeline -----------------------------------------------------------------------------------


def build_pipeline(image: str = DEFAULT_IMAGE):
    """The pipeline with its steps on `image` (a GraphComponent: compile it, or call it under kfp.local)."""
    component = functools.partial(dsl.component, base_image=image, install_kfp_package=False)
    tune_op, train_op, evaluate_op, register_op = (component(f) for f in (tune, train, evaluate, register))

    @dsl.pipeline(
        name="metaplatform",
        description="Meta-learning on Ray: tune -> train -> evaluate -> register if better than the champion",
    )
    def metaplatform(
        config: str = "configs/omniglot-5w1s.yaml",
        overrides: list = [],  # noqa: B006 - KFP reads defaults from the signature; never mutated
        samples: int = 8,
        scheduler: str = "asha",
        tune_iterations: int = 2000,
        train_iterations: int = 60000,
        eval_tasks: int = 600,
        registered_model: str = "metaplatform-omniglot-5w1s",
        alias: str = "champion",
        ray_address: str = "http://metaplatform-head-svc:8265",
        ray_token_secret: str = "metaplatform-ray-auth",
        mlflow_uri: str = "http://metaplatform-mlflow:5000",
        mlflow_auth_secret: str = "metaplatform-mlflow-auth",
        experiment: str = "metaplatform",
        storage: str = "s3://metaplatform/pipelines",
        runtime_env: dict = {},  # noqa: B006 - e.g. env_vars for the Ray jobs
    ):
        run = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        ray_args = {"ray_address": ray_address, "runtime_env": runtime_env, "pipeline_run": run}
        sweep = tune_op(mlflow_uri=mlflow_uri, experiment=experiment, config=config, overrides=overrides,
                        samples=samples, scheduler=scheduler, iterations=tune_iterations, storage=storage,
                        **ray_args).set_display_name("tune")  # fmt: skip
        trained = train_op(mlflow_uri=mlflow_uri, experiment=experiment, config=config, overrides=overrides,
                           best_overrides=sweep.outputs["best_overrides"], iterations=train_iterations,
                           storage=storage, **ray_args).set_display_name("train")  # fmt: skip
        tested = evaluate_op(mlflow_uri=mlflow_uri, run_id=trained.outputs["run_id"],
                             checkpoint=trained.outputs["checkpoint"], tasks=eval_tasks,
                             registered_model=registered_model, alias=alias,
                             **ray_args).set_display_name("evaluate")  # fmt: skip
        # A single (unnamed) output: kfp.local 2.17 resolves only `Output` in dsl.If conditions.
        with dsl.If(tested.outputs["Output"] == True, name="beats-champion"):
            registered = register_op(mlflow_uri=mlflow_uri, run_id=trained.outputs["run_id"],
                                     registered_model=registered_model, alias=alias,
                                     pipeline_run=run).set_display_name("register")  # fmt: skip
        for task in (sweep, trained, tested, registered):
            task.set_caching_options(False)  # every step acts on the cluster or the registry
            kubernetes.add_pod_label(task, *CLIENT_LABEL)
            kubernetes.use_secret_as_env(
                task,
                secret_name=mlflow_auth_secret,
                secret_key_to_env={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
                optional=True,
            )
        for task in (sweep, trained, tested):
            kubernetes.use_secret_as_env(
                task, secret_name=ray_token_secret, secret_key_to_env={"auth_token": "RAY_AUTH_TOKEN"}, optional=True
            )

    return metaplatform
