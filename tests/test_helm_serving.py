"""The chart's optional RayService (helm/metaplatform/templates/rayservice.yaml, `serving.enabled`):
rendered with a real helm and validated like the rest of the chart (tests/test_helm.py, whose
checks of every values set also run on ci/serving.yaml), and its
rendered serveConfigV2 deployed for real to the session Ray head the way the KubeRay operator does
(PUT to the Serve REST API of the dashboard), serving a model registered in MLflow with the
`champion` alias, answering HTTP on loopback."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import yaml
from conftest import free_port
from deploy_tools import (
    KUBERNETES_VERSIONS,
    CrdSchemas,
    builtin_problems,
    container_env,
    find,
    helm,
    kuberay_problems,
    one,
    pod_specs,
    render,
    selector_matches,
    template_args,
)

from platform.algorithms import build
from platform.config import RunConfig
from platform.learner import load_learner
from platform.mlflow_model import log_saved_model, save_model
from platform.serve import ServeArgs

RELEASE, NAMESPACE = "mp", "ml"
FULLNAME = f"{RELEASE}-metaplatform"
SERVING = {"generateSecrets": True, "serving": {"enabled": True, "registeredModel": "omniglot"}}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render([], SERVING, release=RELEASE, namespace=NAMESPACE)


def _service_pods(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(group, pod metadata, pod spec) of the RayService's pods."""
    prefix = f"RayService/{FULLNAME}-serve "
    return [
        (where.removeprefix(prefix), meta, pod) for where, meta, pod in pod_specs(objects) if where.startswith(prefix)
    ]


def test_serving_is_off_by_default():
    objects = render([], {"generateSecrets": True}, release=RELEASE, namespace=NAMESPACE)
    assert not find(objects, "RayService") and not find(objects, "NetworkPolicy", f"{FULLNAME}-serve")


def test_the_rayservice_beside_the_standing_cluster_and_its_network_policy_are_valid(objects):
    """The defaults with serving on (ci/serving.yaml, serving alone, is checked with every values set)."""
    crds = CrdSchemas()
    service = one(objects, "RayService", f"{FULLNAME}-serve")
    assert crds.knows(service)
    problems = crds.problems(service) + kuberay_problems(service)
    policy = one(objects, "NetworkPolicy", f"{FULLNAME}-serve")
    problems += [p for version in KUBERNETES_VERSIONS for p in builtin_problems(policy, version)]
    assert not problems, "\n".join(problems)


def test_it_serves_the_registered_champion_inside_the_cluster_with_the_platform_image(objects):
    service = one(objects, "RayService")["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "platform.serve:build_app" and app["route_prefix"] == "/"
    args = ServeArgs.model_validate(app["args"])  # what build_app will validate: the chart's args are ServeArgs'
    assert args.model == "models:/omniglot@champion" and args.cache_size == 128
    assert config["http_options"]["port"] == 8000
    assert service["serveService"]["spec"]["type"] == "ClusterIP"
    assert service["rayClusterConfig"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    for group, _, pod in _service_pods(objects):
        (container,) = pod["containers"]
        assert container["image"] == "ghcr.io/metaplatform/metaplatform:0.1.0", group
        assert {"name": "serve", "containerPort": 8000} in container["ports"], group
    workers = service["rayClusterConfig"]["workerGroupSpecs"]
    assert [w["groupName"] for w in workers] == ["serve"] and "nvidia.com/gpu" not in str(workers)


def test_clients_reach_it_prometheus_scrapes_it_and_it_gets_the_mlflow_credentials():
    values = SERVING | {"mlflow": {"auth": {"enabled": True, "existingSecret": "mlflow-admin"}}}
    objects = render([], values, release=RELEASE, namespace=NAMESPACE)
    serve_policy = one(objects, "NetworkPolicy", f"{FULLNAME}-serve")["spec"]
    ray_policy = one(objects, "NetworkPolicy", f"{FULLNAME}-ray")["spec"]
    monitor = one(objects, "PodMonitor", f"{FULLNAME}-ray")["spec"]
    (rule,) = serve_policy["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert {"podSelector": {"matchLabels": {"metaplatform.io/client": "true"}}} in rule["from"]
    secrets = {"mlflow-admin": {"username": "admin", "password": "pw"}, f"{FULLNAME}-ray-auth": {}}
    pods = _service_pods(objects)
    assert [group for group, _, _ in pods] == ["head", "serve"]
    for group, meta, pod in pods:
        labels = meta["labels"]
        assert selector_matches(serve_policy["podSelector"], labels), group
        assert selector_matches(ray_policy["podSelector"], labels), group  # egress to MLflow, S3, DNS
        assert selector_matches(monitor["selector"], labels), group
        (container,) = pod["containers"]
        assert "metrics" in {p["name"] for p in container["ports"]}, group
        env = container_env(container, secrets)
        assert env["MLFLOW_TRACKING_URI"] == f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc:5000", group
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("admin", "pw"), group
    # Pods of the chart's own RayCluster are not serving pods: the serve port stays closed there.
    cluster = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not selector_matches(serve_policy["podSelector"], cluster)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"serving": {"enabled": True}}, "serving.registeredModel: empty"),
        ({"serving": {"enabled": True, "registeredModel": "m", "args": {"cache_size": 0}}}, "cache_size"),
        ({"serving": {"enabled": True, "registeredModel": "m", "args": {"cache": 5}}}, "cache"),
        ({"serving": {"enabled": True, "registeredModel": "m"}, "mlflow": {"enabled": False}}, "mlflow.externalUri"),
    ],
    ids=["no-model", "cache-size-0", "unknown-arg", "no-mlflow"],
)
def test_bad_serving_values_fail_the_render_naming_the_value(values, message):
    result = helm(*template_args(set_values={"generateSecrets": True, **values}))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def _registered_champion(tmp_path, name: str) -> str:
    """A sinusoid adapting model registered in the session's MLflow store (the one the Ray head was
    started with: MLFLOW_TRACKING_URI, tests/conftest.py) with the `champion` alias on its version."""
    config = RunConfig.model_validate({"optim": {"test_inner_steps": 4}})
    _, _, params = build(config)
    saved = save_model(config, params, tmp_path / "model")
    experiment = mlflow.create_experiment(f"serving-{name}", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        version = log_saved_model(saved, registered_model_name=name).registered_model_version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return f"models:/{name}@champion"


def _serve_api(cluster, method: str, body: dict | None = None):
    """The Serve REST API of the head's dashboard, which KubeRay PUTs serveConfigV2 to."""
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/serve/applications/",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {cluster.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read()
        return json.loads(text) if text.strip() else None


def test_the_rendered_serve_config_runs_on_the_ray_head_and_answers_http(ray_cluster, tmp_path):
    name = f"sinusoid-{free_port()}"
    model = _registered_champion(tmp_path, name)
    values = SERVING | {"serving": {"enabled": True, "registeredModel": name, "args": {"max_replicas": 1}}}
    service = one(render([], values, release=RELEASE, namespace=NAMESPACE), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}  # a pod's 0.0.0.0:8000 is this machine's
    _serve_api(ray_cluster, "PUT", config)
    try:
        deadline, status = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            apps = (_serve_api(ray_cluster, "GET") or {}).get("applications") or {}
            status = apps.get("metaplatform", {}).get("status")
            assert status != "DEPLOY_FAILED", apps["metaplatform"].get("message")
            if status == "RUNNING":
                break
            time.sleep(1)
        assert status == "RUNNING", status
        x = np.linspace(-4, 4, 8, dtype=np.float32)
        task = {"support_x": x.tolist(), "support_y": np.sin(x).tolist(), "query_x": [0.5, 1.5]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", json.dumps(task).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        want = load_learner(model).adapt(x, np.sin(x)).predict(np.float32([0.5, 1.5]))
        assert np.allclose(answer["values"], want, rtol=1e-5, atol=1e-6) and answer["adapted"]
    finally:
        _serve_api(ray_cluster, "DELETE")  # `serve shutdown`: the head is left as it was
