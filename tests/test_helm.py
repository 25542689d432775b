"""The Helm chart (helm/metaplatform): everything that can be checked without a cluster, with a real
helm v4 (tests/deploy_tools.py), and the commands it renders run for real.

Each values set is rendered once per session (`rendered`): every file in the chart's ci/ folder
(the defaults with generated Secrets, GPU workers, RayJobs on their own and the shared cluster, an
external database with every Secret named, auth on, a minimal install, serving alone): every check
of Ray pods covers the pods of RayClusters, RayJobs and the RayService alike (deploy_tools.pod_specs,
ray_cluster_spec).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from deploy_tools import (
    CHART,
    KUBERNETES_VERSIONS,
    REPO,
    CrdSchemas,
    RenderedPod,
    builtin_problems,
    container_env,
    find,
    helm,
    host_command,
    kuberay_problems,
    one,
    pod_specs,
    ray_cluster_spec,
    render,
    secret_data,
    selector_matches,
    template_args,
)

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
VALUE_SETS = {f.stem: [f] for f in CI_VALUES}  # "default": the defaults plus generateSecrets
RELEASE, NAMESPACE = "mp", "ml"
FULLNAME = f"{RELEASE}-metaplatform"
GENERATE = {"generateSecrets": True}  # the chart refuses to make Secrets without this choice
SERVING = {"enabled": True, "registeredModel": "omniglot"}
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: render(files, release=RELEASE, namespace=NAMESPACE) for name, files in VALUE_SETS.items()}


@pytest.fixture(scope="session")
def crd_schemas() -> CrdSchemas:
    return CrdSchemas()


def test_ci_values_files_are_there():
    wanted = {"default", "gpu-workers", "rayjob-own-cluster", "external-database", "auth-on", "minimal", "serving"}
    assert wanted <= set(VALUE_SETS)


@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict(values):
    args = ["lint", "--strict", "--namespace", NAMESPACE]
    for f in VALUE_SETS[values]:
        args += ["--values", str(f)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# -- every rendered object is valid ----------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_objects_are_valid(values, rendered, crd_schemas):
    """Built-in kinds against the Kubernetes schemas (oldest supported and newest), KubeRay and
    prometheus-operator kinds against their CRDs, both strict; plus KubeRay's own admission rules."""
    objects = rendered[values]
    problems, kinds = [], set()
    for obj in objects:
        kinds.add(obj["kind"])
        if crd_schemas.knows(obj):
            problems += crd_schemas.problems(obj)
        else:
            for version in KUBERNETES_VERSIONS:
                problems += builtin_problems(obj, version)
        problems += kuberay_problems(obj)
    assert not problems, "\n".join(problems)
    assert kinds & set(RAY_KINDS), "a values set without any Ray object"
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_validators_reject_what_the_api_server_would(rendered, crd_schemas):
    """The checks above can fail: an unknown field, a wrong type, a KubeRay rule, each is caught."""
    cluster = json.loads(json.dumps(one(rendered["default"], "RayCluster")))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    found = crd_schemas.problems(cluster)
    assert any("imagePullPolice" in p for p in found) and any("four" in p for p in found), found

    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    deployment["spec"]["replicas"] = "1"
    assert builtin_problems(deployment, KUBERNETES_VERSIONS[0])
    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    assert builtin_problems(deployment, KUBERNETES_VERSIONS[0])

    job = json.loads(json.dumps(one(rendered["auth-on"], "RayJob")))
    job["spec"]["clusterSelector"] = {"ray.io/cluster": FULLNAME}
    job["spec"]["submitterPodTemplate"] = {"spec": {"containers": []}}
    found = kuberay_problems(job)
    assert any("SidecarMode" in p for p in found), found
    cluster = json.loads(json.dumps(one(rendered["default"], "RayCluster")))
    cluster["spec"]["rayVersion"] = "2.51.0"
    assert any("2.52.0" in p for p in kuberay_problems(cluster))

    # A RayService: its cluster (rayClusterConfig) and its serveConfigV2 string are checked too.
    service = json.loads(json.dumps(one(rendered["serving"], "RayService")))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    found = crd_schemas.problems(service)
    assert any("imagePullPolice" in p for p in found) and any("four" in p for p in found), found
    service = json.loads(json.dumps(one(rendered["serving"], "RayService")))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    service["metadata"]["name"] = "x" * 48
    service["spec"]["rayClusterConfig"]["rayVersion"] = "2.51.0"
    head["headService"] = {"metadata": {"name": "mine"}}
    service["spec"]["serveConfigV2"] = service["spec"]["serveConfigV2"].replace("import_path", "import_pat")
    found = kuberay_problems(service)
    for needed in ("at most 47 characters", "2.52.0", "headService.metadata.name", "import_pat"):
        assert any(needed in p for p in found), (needed, found)
    service["spec"]["serveConfigV2"] = "applications: [oops"
    assert any("not YAML" in p for p in kuberay_problems(service))


# -- bad values are rejected with the value's name -----------------------------------------------

GROUP = {"name": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "gpus": 1}
JOB = {"name": "run", "preset": "configs/sinusoid.yaml"}
BAD_VALUES = {
    "typo in a key": ({"mlflow": {"prot": 5000}}, "/mlflow", "prot"),
    "negative replicas": (
        {"ray": {"workerGroups": [{**GROUP, "replicas": -1}]}},
        "/ray/workerGroups/0/replicas",
        "minimum",
    ),
    "negative maxReplicas": (
        {"ray": {"workerGroups": [{**GROUP, "maxReplicas": -3}]}},
        "/ray/workerGroups/0/maxReplicas",
        "minimum",
    ),
    "gpus not a number": ({"ray": {"workerGroups": [{**GROUP, "gpus": "two"}]}}, "/ray/workerGroups/0/gpus", "integer"),
    "unknown submission mode": (
        {"jobs": [{**JOB, "submissionMode": "BatchMode"}]},
        "/jobs/0/submissionMode",
        "K8sJobMode",
    ),
    "head exposed outside": ({"ray": {"head": {"serviceType": "LoadBalancer"}}}, "/ray/head/serviceType", "ClusterIP"),
    "override without =": ({"jobs": [{**JOB, "overrides": ["optim.iterations"]}]}, "/jobs/0/overrides/0", "pattern"),
    "job without preset": ({"jobs": [{"name": "run"}]}, "/jobs/0", "preset"),
    "unknown command": ({"jobs": [{**JOB, "command": "evaluate"}]}, "/jobs/0/command", "train"),
    "spool on the pod's /tmp": ({"spool": {"mountPath": "/tmp/spool"}}, "/spool/mountPath", "not"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_rejected(case, tmp_path):
    values, path, word = BAD_VALUES[case]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    for command in ("template", "install"):
        args = template_args([tmp_path / "bad.yaml"], release=RELEASE, namespace=NAMESPACE)
        if command == "install":  # a client-side dry run: the schema check of `helm install`
            args = ["install", *args[1:], "--dry-run=client"]
        result = helm(*args)
        assert result.returncode != 0, f"helm {command} accepted {values}"
        assert f"at '{path}'" in result.stderr and word in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"jobs": [{**JOB, "name": "a-very-long-job-name-for-this-release-x"}]}, "KubeRay allows 47"),
        ({"ray": {"cluster": {"enabled": False}}, "jobs": [{**JOB, "cluster": "shared"}]}, "ray.cluster.enabled"),
        ({"jobs": [{**JOB, "cluster": "shared", "submissionMode": "SidecarMode"}]}, "SidecarMode"),
        ({"jobs": [{**JOB, "submissionMode": "InteractiveMode", "backoffLimit": 1}]}, "InteractiveMode"),
        (
            {"jobs": [{**JOB, "shutdownAfterJobFinishes": False, "ttlSecondsAfterFinished": 60}]},
            "shutdownAfterJobFinishes",
        ),
    ],
)
def test_combinations_kuberay_refuses_fail_at_render_time(values, message, tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**values, **GENERATE}))
    result = helm(*template_args([tmp_path / "bad.yaml"], release=RELEASE, namespace=NAMESPACE))
    assert result.returncode != 0 and message in result.stderr, result.stderr


# -- Ray ------------------------------------------------------------------------------------------


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}"
    return match.group(1).strip('"')


def test_ray_cluster(rendered):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cluster = one(rendered["gpu-workers"], "RayCluster", FULLNAME)["spec"]
    # The image's Ray (Dockerfile), the chart's and the base image tag agree.
    assert cluster["rayVersion"] == values["ray"]["version"] == _dockerfile_arg("RAY_VERSION")
    assert f":{values['ray']['version']}-" in _dockerfile_arg("BASE_IMAGE")
    assert cluster["authOptions"] == {"mode": "token", "secretName": f"{FULLNAME}-ray-auth"}
    assert cluster["upgradeStrategy"] == {"type": "Recreate"}  # a new image tag replaces the pods
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Conservative"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"

    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"node-role.example.com/cpu": "true"}
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert ports == {
        "gcs-server": 6379,
        "dashboard": 8265,
        "client": 10001,
        "metrics": 8080,
        "as-metrics": 44217,
        "dash-metrics": 44227,
        "driver-metrics": 9400,
    }
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc:5000"
    mlflow_service = one(rendered["gpu-workers"], "Service", f"{FULLNAME}-mlflow")
    assert mlflow_service["spec"]["ports"][0]["port"] == 5000

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu-small", "gpu-h100"}
    h100 = groups["gpu-h100"]
    assert (h100["replicas"], h100["minReplicas"], h100["maxReplicas"]) == (0, 0, 2)
    pod = h100["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert worker["resources"]["limits"]["cpu"] == "96"
    assert {"key": "dedicated", "operator": "Equal", "value": "h100", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {p["name"] for p in worker["ports"]} == {"metrics"}
    assert pod["automountServiceAccountToken"] is False


def test_ray_token_secret(rendered):
    """Generated (64 random characters), never the same twice, and kept on `helm uninstall`."""
    secret = one(rendered["default"], "Secret", f"{FULLNAME}-ray-auth")
    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token)
    again = one(render(set_values=GENERATE, release=RELEASE, namespace=NAMESPACE), "Secret", f"{FULLNAME}-ray-auth")
    assert base64.b64decode(again["data"]["auth_token"]).decode() != token
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # An existing Secret is used as it is: none is generated.
    assert not find(rendered["auth-on"], "Secret", f"{FULLNAME}-ray-auth")
    assert one(rendered["auth-on"], "RayCluster")["spec"]["authOptions"]["secretName"] == "ray-token"


def test_secrets_are_named_or_generated_by_choice():
    """Without generateSecrets the chart makes no Secret: it refuses to render, naming every value
    to set. With every Secret named it renders none, and two renders are identical (Argo CD's
    renders change nothing), every pod referring to the named Secrets."""
    auth = {"mlflow": {"auth": {"enabled": True}}}
    refused = helm(*template_args(set_values=auth, release=RELEASE, namespace=NAMESPACE))
    assert refused.returncode != 0
    for needed in ("ray.auth.existingSecret (key auth_token)", "postgresql.existingSecret (key password)",
                   "mlflow.auth.existingSecret (keys username, password)",
                   "mlflow.auth.existingServerSecret (key flask-secret-key)", "generateSecrets=true"):  # fmt: skip
        assert needed in refused.stderr, refused.stderr
    named = {
        "ray": {"auth": {"existingSecret": "ray-token"}},
        "postgresql": {"existingSecret": "pg"},
        "mlflow": {"auth": {"enabled": True, "existingSecret": "admin", "existingServerSecret": "key"}},
        "jobs": [JOB],
        "serving": SERVING,
    }
    first, second = (helm(*template_args(set_values=named, release=RELEASE, namespace=NAMESPACE)) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    objects = [doc for doc in yaml.safe_load_all(first.stdout) if doc]
    assert not find(objects, "Secret")
    refs = {
        var["valueFrom"]["secretKeyRef"]["name"]
        for _, _, spec in pod_specs(objects)
        for c in [*spec["containers"], *spec.get("initContainers", [])]
        for var in c.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert refs == {"ray-token", "pg", "admin", "key"}
    clusters = [cluster for o in objects if (cluster := ray_cluster_spec(o))]
    assert len(clusters) == 3 and {c["authOptions"]["secretName"] for c in clusters} == {"ray-token"}


# -- RayJobs --------------------------------------------------------------------------------------


def test_rayjobs(rendered):
    objects = rendered["rayjob-own-cluster"]
    own = one(objects, "RayJob", f"{FULLNAME}-omniglot-5w1s")["spec"]
    assert shlex.split(own["entrypoint"]) == [
        "python", "-m", "platform.train", "--config", "configs/omniglot-5w1s.yaml",
        "checkpoint.dir=s3://ml-runs/checkpoints/omniglot-5w1s",
        "tracking.experiment=metaplatform",
        "tracking.prometheus_port=9400",
        "resources.workers=4", "resources.gpus_per_worker=1", "task.data=s3://ml-data/omniglot",
    ]  # fmt: skip
    assert (own["submissionMode"], own["shutdownAfterJobFinishes"], own["ttlSecondsAfterFinished"]) == (
        "K8sJobMode",
        True,
        3600,
    )
    assert (own["backoffLimit"], own["activeDeadlineSeconds"]) == (2, 86400)
    assert "clusterSelector" not in own
    workers = own["rayClusterSpec"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"]) for g in workers] == [("gpu", 4)]
    assert own["rayClusterSpec"]["authOptions"]["mode"] == "token"
    submitter = own["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"] == "ghcr.io/metaplatform/metaplatform:0.1.0"
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in submitter["env"]

    shared = one(objects, "RayJob", f"{FULLNAME}-sinusoid-sweep")["spec"]
    assert shlex.split(shared["entrypoint"]) == [
        "python", "-m", "platform.tune", "--config", "configs/sinusoid.yaml", "--samples", "16", "--scheduler", "asha",
        "checkpoint.dir=s3://ml-runs/checkpoints/sinusoid-sweep",
        "tracking.experiment=sinusoid-sweeps",
        "tracking.prometheus_port=9400",
        "optim.iterations=5000",
    ]  # fmt: skip
    assert shared["clusterSelector"] == {"ray.io/cluster": FULLNAME}
    assert "rayClusterSpec" not in shared
    assert shared["submissionMode"] == "HTTPMode" and "submitterPodTemplate" not in shared
    assert yaml.safe_load(shared["runtimeEnvYAML"]) == {"env_vars": {"OMP_NUM_THREADS": "1"}}

    sidecar = one(rendered["auth-on"], "RayJob")["spec"]
    assert sidecar["submissionMode"] == "SidecarMode" and "submitterPodTemplate" not in sidecar


def test_no_tracking_server_no_tracking(tmp_path):
    """Without MLflow in the chart or an external URI, jobs run with tracking off (no URI in the pods)."""
    (tmp_path / "v.yaml").write_text(yaml.safe_dump({"mlflow": {"enabled": False}, "jobs": [JOB], **GENERATE}))
    job = one(render([tmp_path / "v.yaml"], release=RELEASE, namespace=NAMESPACE), "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert "tracking.mlflow=false" in argv and not any(a.startswith("tracking.experiment=") for a in argv)
    assert "checkpoint.dir=/tmp/checkpoints/run" in argv  # no checkpoints.uri: the writable /tmp
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "MLFLOW_TRACKING_URI" not in {e["name"] for e in head["env"]}


def test_entrypoint_quoting_survives_a_shell(tmp_path):
    """Overrides with spaces, quotes and $ reach the command as written (the entrypoint runs in sh)."""
    tricky = ["task.data=/data/my set", "checkpoint.dir=it's", 'seed=$HOME "x"']
    (tmp_path / "v.yaml").write_text(yaml.safe_dump({"jobs": [{**JOB, "overrides": tricky}], **GENERATE}))
    job = one(render([tmp_path / "v.yaml"], release=RELEASE, namespace=NAMESPACE), "RayJob")
    # `python` replaced by a shell function that prints its arguments, one a line.
    argv = subprocess.run(
        ["sh", "-c", "python() { printf '%s\\n' \"$@\"; }; " + job["spec"]["entrypoint"]],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert argv[-3:] == tricky


def _head(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]


def test_stopped_drivers_get_the_stop_wait():
    """Every Ray container gets RAY_JOB_STOP_WAIT_TIME_S (ray.jobStopWaitSeconds), and head pods a
    grace period beyond it, for the preStop hook that stops their jobs."""
    for stop_wait, ray in ((120, {}), (300, {"ray": {"jobStopWaitSeconds": 300}})):
        values = {**GENERATE, **ray, "jobs": [JOB], "serving": SERVING}
        objects = render(set_values=values, release=RELEASE, namespace=NAMESPACE)
        clusters = [cluster for o in objects if (cluster := ray_cluster_spec(o))]
        assert len(clusters) == 3  # the RayCluster's, the RayJob's, the RayService's
        for where, _, spec in pod_specs(objects):
            if "submitter" in where or not where.startswith(RAY_KINDS):
                continue
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert env["RAY_JOB_STOP_WAIT_TIME_S"] == str(stop_wait), where
        for cluster in clusters:
            assert _head(cluster)["terminationGracePeriodSeconds"] == stop_wait + 30
            assert _head(cluster)["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][:2] == ["python", "-c"]


def _spool_of(spec: dict) -> tuple[str | None, str | None, str | None]:
    """(METAPLATFORM_SPOOL, where the spool volume is mounted, its claim) of a pod's first container."""
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = [m for m in container.get("volumeMounts", []) if "persistentVolumeClaim" in volumes.get(m["name"], {})]
    claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] if mounts else None
    return env.get("METAPLATFORM_SPOOL"), mounts[0]["mountPath"] if mounts else None, claim


def test_job_drivers_keep_their_mlflow_spool_on_a_volume_that_outlives_the_pod(rendered):
    """Every head pod that runs job drivers (the standing cluster's, each `cluster: own` job's) mounts
    the spool claim where METAPLATFORM_SPOOL says, outside the pod's /tmp; the claim is the chart's
    (kept on uninstall) or yours. Workers and the serving cluster get none, nor anything when disabled."""
    path = "/var/lib/metaplatform/spool"
    objects = rendered["rayjob-own-cluster"]
    claim = one(objects, "PersistentVolumeClaim", f"{FULLNAME}-mlflow-spool")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pods = [(where, spec) for where, _, spec in pod_specs(objects) if where.startswith(("RayCluster", "RayJob"))]
    heads = [spec for where, spec in pods if where.endswith(" head")]
    assert len(heads) == 2  # the standing cluster's and the own-cluster job's
    for where, spec in pods:
        expected = (path, path, claim["metadata"]["name"]) if where.endswith(" head") else (None, None, None)
        assert _spool_of(spec) == expected, where

    yours = {"spool": {"existingClaim": "my-spool", "mountPath": "/data/spool"}, "jobs": [JOB]}
    serving = {"serving": {"enabled": True, "registeredModel": "m"}}
    objects = render(set_values={**GENERATE, **yours, **serving}, release=RELEASE, namespace=NAMESPACE)
    assert not find(objects, "PersistentVolumeClaim", f"{FULLNAME}-mlflow-spool")
    heads = [
        spec for where, _, spec in pod_specs(objects) if where.endswith(" head") and not where.startswith("RayService")
    ]
    assert len(heads) == 2 and all(_spool_of(h) == ("/data/spool", "/data/spool", "my-spool") for h in heads)
    service_head = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert _spool_of(service_head) == (None, None, None)

    objects = render(set_values={**GENERATE, "spool": {"enabled": False}, "jobs": [JOB]}, release=RELEASE)
    assert not find(objects, "PersistentVolumeClaim", f"{FULLNAME}-mlflow-spool")
    assert all(_spool_of(spec) == (None, None, None) for _, _, spec in pod_specs(objects))


# A driver that needs 5 s after SIGTERM to finish (more than Ray's default 3 s before SIGKILL): it
# touches `<dir>/running` when it runs and writes "done" into `<dir>/done` once it has finished.
SLOW_TO_STOP = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(*_):
    time.sleep(5)
    (folder / 'done').write_text('done')
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(folder / 'running').touch()
time.sleep(600)
"""  # no double quotes: `ray job submit` quotes the entrypoint's words with them


def test_the_head_s_prestop_hook_stops_the_jobs_and_waits_for_their_drivers(tmp_path, ray_cluster):
    """The head container's rendered preStop command, run against the tests' Ray head while a job
    runs, stops the job and returns only once its driver has finished (5 s after SIGTERM, past
    Ray's default 3 s): the rendered stop wait reached the job supervisor. Emulated: the head pod's
    environment reaches the supervisor as the job's env_vars (in the pod, through `ray start`), and
    the job API is on the tests' port instead of the pod's 8265."""
    objects = render(set_values=GENERATE, release=RELEASE, namespace=NAMESPACE)
    head = _head(one(objects, "RayCluster")["spec"])["containers"][0]
    env = container_env(head, secret_data(objects))
    runtime_env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": env["RAY_JOB_STOP_WAIT_TIME_S"]}}
    client_env = ray_cluster.subprocess_env(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    submit = [
        "ray", "job", "submit", "--no-wait", "--address", ray_cluster.dashboard_url,
        "--submission-id", f"prestop-{uuid.uuid4().hex[:8]}", "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-c", SLOW_TO_STOP, str(tmp_path),
    ]  # fmt: skip
    subprocess.run(submit, check=True, env=client_env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 60
    while not (tmp_path / "running").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "running").exists(), "the job never started"
    command = [
        a.replace("http://127.0.0.1:8265", ray_cluster.dashboard_url)
        for a in head["lifecycle"]["preStop"]["exec"]["command"]
    ]
    result = subprocess.run(
        host_command(command), check=False, env=client_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 still running" in result.stdout
    assert (tmp_path / "done").read_text() == "done", "the driver was killed before it had finished"


# -- MLflow and PostgreSQL -----------------------------------------------------------------------


def _container(objects, kind, name, container=None):
    spec = one(objects, kind, name)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if container in (None, c["name"]))


def test_mlflow_server(rendered):
    objects = rendered["default"]
    deployment = one(objects, "Deployment", f"{FULLNAME}-mlflow")["spec"]["template"]["spec"]
    server = deployment["containers"][0]
    args = server["command"] + server["args"]
    assert args[:2] == ["mlflow", "server"]
    opts, rest = {}, args[2:]
    while rest:  # --option value, or a --flag alone
        if len(rest) > 1 and not rest[1].startswith("--"):
            opts[rest[0]], rest = rest[1], rest[2:]
        else:
            opts[rest[0]], rest = True, rest[1:]
    assert opts["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert opts["--artifacts-destination"] == "s3://metaplatform/mlflow-artifacts"
    assert opts["--serve-artifacts"] is True
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    assert [c["command"][:3] for c in deployment["initContainers"]] == [["mlflow", "db", "upgrade"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e for e in server["env"]}
    # The bundled database: the password from its Secret, expanded by the kubelet into the URI.
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        f"postgresql://mlflow:$(POSTGRES_PASSWORD)@{FULLNAME}-postgresql:5432/mlflow"
    )
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-postgresql",
        "key": "password",
    }
    statefulset = one(objects, "StatefulSet", f"{FULLNAME}-postgresql")["spec"]
    assert statefulset["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    postgres = statefulset["template"]["spec"]["containers"][0]
    assert {e["name"]: e for e in postgres["env"]}["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]

    external = rendered["external-database"]
    assert not find(external, "StatefulSet") and not find(external, "Secret", f"{FULLNAME}-postgresql")
    server = _container(external, "Deployment", f"{FULLNAME}-mlflow")
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert "mlflow.example.com" in server["args"][server["args"].index("--allowed-hosts") + 1].split(",")

    auth = rendered["auth-on"]
    server = _container(auth, "Deployment", f"{FULLNAME}-mlflow")
    assert server["args"][-2:] == ["--app-name", "basic-auth"]
    init = one(auth, "Deployment", f"{FULLNAME}-mlflow")["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["db-upgrade", "auth-db-upgrade"]
    head_env = {
        e["name"]: e
        for e in one(auth, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert head_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-mlflow-auth",
        "key": "password",
    }

    minimal = rendered["minimal"]
    assert not find(minimal, "Deployment")
    job_env = one(minimal, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "https://mlflow.example.com"} in job_env


# -- monitoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,count",
    [("rayjob-own-cluster", 4), ("serving", 3)],  # the chart's and the own-cluster job's head and group; serving's
)
def test_pod_monitors_find_the_ray_pods(rendered, values, count):
    objects = rendered[values]
    ray_pods = [(where, meta, spec) for where, meta, spec in pod_specs(objects) if "submitter" not in where]
    ray_pods = [p for p in ray_pods if p[0].startswith(RAY_KINDS)]
    assert len(ray_pods) == count
    ray = one(objects, "PodMonitor", f"{FULLNAME}-ray")["spec"]
    driver = one(objects, "PodMonitor", f"{FULLNAME}-driver")["spec"]
    for where, meta, spec in ray_pods:
        assert selector_matches(ray["selector"], meta["labels"]), where
        ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        assert "metrics" in ports, where
        if where.endswith("head"):
            assert selector_matches(driver["selector"], meta["labels"]), where
            assert {e["port"] for e in ray["podMetricsEndpoints"]} | {"driver-metrics"} <= ports
            assert driver["podMetricsEndpoints"][0]["port"] in ports
        else:
            assert not selector_matches(driver["selector"], meta["labels"]), where
    assert driver["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_grafana_dashboards(tmp_path):
    """Every dashboards/*.json becomes a ConfigMap for Grafana's sidecar; none renders fine too."""
    chart = tmp_path / "metaplatform"
    shutil.copytree(CHART, chart)
    shutil.rmtree(chart / "dashboards", ignore_errors=True)
    assert not find(render(set_values=GENERATE, chart=chart), "ConfigMap")

    (chart / "dashboards").mkdir()
    board = {"title": "metaplatform", "panels": [{"type": "timeseries", "targets": [{"expr": "metaplatform_loss"}]}]}
    (chart / "dashboards" / "metaplatform.json").write_text(json.dumps(board, indent=2))
    (chart / "dashboards" / "Ray_Nodes.json").write_text(json.dumps({"title": "ray"}))
    maps = find(render(set_values=GENERATE, chart=chart, release=RELEASE, namespace=NAMESPACE), "ConfigMap")
    assert sorted(m["metadata"]["name"] for m in maps) == [
        f"{FULLNAME}-dashboard-metaplatform",
        f"{FULLNAME}-dashboard-ray-nodes",
    ]
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
    by_name = {m["metadata"]["name"]: m for m in maps}
    assert json.loads(by_name[f"{FULLNAME}-dashboard-metaplatform"]["data"]["metaplatform.json"]) == board


def test_the_lead_s_dashboard_if_present(rendered):
    board = CHART / "dashboards" / "metaplatform.json"
    maps = find(rendered["default"], "ConfigMap")
    if not board.exists():
        assert not maps
        return
    (m,) = [m for m in maps if "metaplatform.json" in m["data"]]
    assert json.loads(m["data"]["metaplatform.json"]) == json.loads(board.read_text())


# -- security -------------------------------------------------------------------------------------

SENSITIVE = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|_URI$")


@pytest.mark.parametrize("values", VALUE_SETS)
def test_pods_run_locked_down(values, rendered):
    pods = pod_specs(rendered[values])
    assert pods
    for where, _, spec in pods:
        # No pod mounts its service-account token: job drivers run in the head pods.
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            for bound in ("requests", "limits"):  # schedulable and bounded: what the scheduler and quotas need
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (where, c["name"], bound)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, (where, c["name"])
            for var in c.get("env", []):
                # Secret material only by reference; the one URI built from parts holds a $(reference).
                if SENSITIVE.search(var["name"]) and "value" in var and var["name"] != "MLFLOW_TRACKING_URI":
                    assert "$(" in var["value"], (where, var)


def test_only_the_autoscaler_gets_the_head_pod_s_token(rendered):
    """With the in-tree autoscaler (which scales the worker groups through the Kubernetes API), the
    head pod's token is a projected volume mounted into the autoscaler container alone."""
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    for values in ("default", "minimal", "serving"):
        for cluster in filter(None, map(ray_cluster_spec, rendered[values])):
            head = _head(cluster)
            volumes = {v["name"]: v for v in head["volumes"]}
            for c in head["containers"]:
                assert token not in {m["mountPath"] for m in c.get("volumeMounts", [])}, c["name"]
            if cluster["enableInTreeAutoscaling"]:
                (mount,) = [m for m in cluster["autoscalerOptions"]["volumeMounts"] if m["mountPath"] == token]
                sources = volumes[mount["name"]]["projected"]["sources"]
                assert any("serviceAccountToken" in s for s in sources) and mount["readOnly"] is True
            else:
                assert "autoscalerOptions" not in cluster
                assert not any("projected" in v for v in volumes.values())


@pytest.mark.parametrize("values", VALUE_SETS)
def test_nothing_is_exposed_outside_the_cluster(values, rendered):
    for service in find(rendered[values], "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    for obj in rendered[values]:
        assert obj["kind"] not in ("Ingress", "Route")
        if cluster := ray_cluster_spec(obj):
            assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert not cluster["headGroupSpec"].get("enableIngress")
        if obj["kind"] == "RayService":  # KubeRay's serve Service
            assert obj["spec"]["serveService"]["spec"]["type"] == "ClusterIP"


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, str(i)))
    else:
        yield path, node


def test_no_secret_values_in_defaults_or_config_maps(rendered):
    """values.yaml names Secrets but holds no secret; no secret value is rendered outside a Secret."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, value in _leaves(defaults):
        key = path[-1] if not path[-1].isdigit() else path[-2]
        if re.search(r"password|token|secret|accesskey", key, re.IGNORECASE) and not key.startswith(
            ("existingSecret", "existingServerSecret", "imagePullSecrets", "generateSecrets")
        ):
            assert value in (None, ""), ".".join(path)
    assert any(p[-1] == "existingSecret" for p, _ in _leaves(defaults))  # the walk does see the keys
    for name, objects in rendered.items():
        secrets = [v for data in secret_data(objects).values() for v in data.values() if len(v) >= 16]
        for obj in objects:
            if obj["kind"] in ("ConfigMap", *RAY_KINDS, "Deployment", "StatefulSet"):
                text = json.dumps(obj)
                assert not any(s in text for s in secrets), f"{name}: a secret value in {obj['kind']}"


def test_network_policies(rendered):
    objects = rendered["default"]
    policies = {p["metadata"]["name"]: p["spec"] for p in find(objects, "NetworkPolicy")}
    assert set(policies) == {f"{FULLNAME}-{name}" for name in ("ray", "ray-head", "submitter", "mlflow", "postgresql")}
    pods = {where: meta["labels"] for where, meta, _ in pod_specs(objects)}
    ray_pods = [w for w in pods if w.startswith("RayCluster")]

    def admitted(policy, labels, port):
        """Whether a pod with `labels` in the same namespace may reach `port` (podSelector peers only)."""
        for rule in policy.get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            for peer in rule["from"]:
                if "namespaceSelector" not in peer and selector_matches(peer["podSelector"], labels):
                    return True
        return False

    ray, mlflow, pg = policies[f"{FULLNAME}-ray"], policies[f"{FULLNAME}-mlflow"], policies[f"{FULLNAME}-postgresql"]
    assert all(selector_matches(ray["podSelector"], pods[w]) for w in ray_pods)
    mlflow_pod = pods[f"Deployment/{FULLNAME}-mlflow"]
    pg_pod = pods[f"StatefulSet/{FULLNAME}-postgresql"]
    stranger = {"app": "something-else"}
    client = {"metaplatform.io/client": "true"}
    submitter = {
        "app.kubernetes.io/name": "metaplatform",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "ray-submitter",
    }
    ray_pod = pods[ray_pods[0]]
    assert admitted(ray, ray_pod, 6379) and admitted(ray, ray_pod, 12345)  # Ray nodes: any port
    assert admitted(ray, submitter, 8265) and admitted(ray, client, 8265)
    assert (
        not admitted(ray, submitter, 6379) and not admitted(ray, stranger, 8265) and not admitted(ray, mlflow_pod, 8265)
    )
    assert admitted(mlflow, ray_pod, 5000) and admitted(mlflow, client, 5000)
    assert not admitted(mlflow, stranger, 5000) and not admitted(mlflow, ray_pod, 5432)
    assert admitted(pg, mlflow_pod, 5432) and not admitted(pg, ray_pod, 5432) and not admitted(pg, client, 5432)
    assert selector_matches(mlflow["podSelector"], mlflow_pod) and selector_matches(pg["podSelector"], pg_pod)
    # The operator and Prometheus come from other namespaces, to the ports they need only.
    peers = [
        (r["from"][0], {p["port"] for p in r["ports"]}) for r in ray["ingress"] if "namespaceSelector" in r["from"][0]
    ]
    assert [ports for _, ports in peers] == [{8265, 52365}, {8080, 44217, 44227, 9400}]


METADATA = ipaddress.ip_address("169.254.169.254")


def _egress_allowed(policies, labels, port, *, peer=None, ip=None, protocol="TCP") -> bool:
    """Whether a pod with `labels` may send to `peer` (a pod's labels, same namespace) or to `ip`
    on `port`, under the NetworkPolicies that select it for egress (none: anything goes)."""
    selecting = [p for p in policies if "Egress" in p["policyTypes"] and selector_matches(p["podSelector"], labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy.get("egress") or []:
            ports = rule.get("ports")
            if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
                continue
            if "to" not in rule:
                return True
            for to in rule["to"]:
                same_namespace = "podSelector" in to and "namespaceSelector" not in to
                if peer is not None and same_namespace and selector_matches(to["podSelector"], peer):
                    return True
                if ip is not None and "ipBlock" in to:
                    block = to["ipBlock"]
                    address = ipaddress.ip_address(ip)
                    if address in ipaddress.ip_network(block["cidr"]) and not any(
                        address in ipaddress.ip_network(e) for e in block.get("except", [])
                    ):
                        return True
    return False


def test_egress_is_what_each_pod_needs_and_never_the_metadata_endpoint(rendered):
    objects = rendered["default"]
    policies = [p["spec"] for p in find(objects, "NetworkPolicy")]
    pods = {where: meta["labels"] for where, meta, _ in pod_specs(objects)}
    head, worker = pods["RayCluster/mp-metaplatform head"], pods["RayCluster/mp-metaplatform gpu"]
    mlflow, pg = pods[f"Deployment/{FULLNAME}-mlflow"], pods[f"StatefulSet/{FULLNAME}-postgresql"]
    submitter = {**worker, "app.kubernetes.io/component": "ray-submitter"}
    submitter = {k: v for k, v in submitter.items() if k != "metaplatform.io/ray-node"}
    allowed = functools.partial(_egress_allowed, policies)
    for labels in (head, worker, mlflow, pg, submitter):  # every pod is under an egress policy
        assert any("Egress" in p["policyTypes"] and selector_matches(p["podSelector"], labels) for p in policies)
        for port in (80, 443):
            assert not allowed(labels, port, ip=str(METADATA)), (labels, port)
    for ray in (head, worker):
        assert allowed(ray, 6379, peer=worker) and allowed(ray, 45678, peer=head)  # Ray nodes: any port
        assert allowed(ray, 5000, peer=mlflow) and allowed(ray, 443, ip="52.216.0.1")  # MLflow, S3
        assert not allowed(ray, 5432, peer=pg) and not allowed(ray, 22, ip="10.0.0.1")
    assert allowed(head, 6443, ip="10.0.0.1") and not allowed(worker, 6443, ip="10.0.0.1")  # the autoscaler's API
    assert allowed(submitter, 8265, peer=head) and not allowed(submitter, 8265, peer=worker)
    assert not allowed(submitter, 443, ip="52.216.0.1")
    assert allowed(mlflow, 5432, peer=pg) and allowed(mlflow, 443, ip="52.216.0.1")
    assert not allowed(mlflow, 6379, peer=head)
    assert not allowed(pg, 53, ip="10.96.0.10", protocol="UDP") and not allowed(pg, 443, ip="52.216.0.1")
    dns = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["egress"]["dns"]
    for labels in (head, worker, mlflow, submitter):
        assert any(
            rule.get("to") == dns and {"port": 53, "protocol": "UDP"} in rule["ports"]
            for p in policies if selector_matches(p["podSelector"], labels) for rule in p.get("egress", [])
        ), labels  # fmt: skip


def test_egress_address_ranges_always_cut_out_the_metadata_endpoint(tmp_path):
    """Whatever ranges are configured, the metadata endpoint is excepted from each that holds it
    (and only those: an except outside its cidr is invalid), unless explicitly allowed."""
    cidrs = ["0.0.0.0/0", "169.254.0.0/16", "169.254.169.0/24", "10.0.0.0/8", "2001:db8::/32"]
    egress = {"s3": {"cidrs": cidrs, "ports": [9000]}, "database": {"cidrs": ["169.0.0.0/8"], "ports": [5432]}}
    values = {**GENERATE, "mlflow": {"backendStore": {"existingSecret": "db"}}, "networkPolicy": {"egress": egress}}
    for allow in (False, True):
        values["networkPolicy"]["egress"]["allowMetadataEndpoint"] = allow
        objects = render(set_values=values, release=RELEASE, namespace=NAMESPACE)
        blocks = [
            to["ipBlock"]
            for policy in find(objects, "NetworkPolicy")
            for rule in policy["spec"].get("egress", [])
            for to in rule.get("to", [])
            if "ipBlock" in to
        ]
        assert {b["cidr"] for b in blocks} >= set(cidrs) | {"169.0.0.0/8"}
        for block in blocks:
            network = ipaddress.ip_network(block["cidr"])
            holds = METADATA.version == network.version and METADATA in network
            assert block.get("except", []) == (["169.254.169.254/32"] if holds and not allow else []), block
        for policy in find(objects, "NetworkPolicy"):
            assert not builtin_problems(policy, KUBERNETES_VERSIONS[0])
        worker = {where: meta["labels"] for where, meta, _ in pod_specs(objects)}["RayCluster/mp-metaplatform gpu"]
        policies = [p["spec"] for p in find(objects, "NetworkPolicy")]
        assert _egress_allowed(policies, worker, 9000, ip=str(METADATA)) is allow
    values["networkPolicy"]["egress"] = {"s3": {"cidrs": ["169.254.169.254/32"], "ports": [80]}}
    result = helm(*template_args(set_values=values, release=RELEASE, namespace=NAMESPACE))
    assert (
        result.returncode != 0
        and "networkPolicy.egress.s3.cidrs: 169.254.169.254/32 is the cloud metadata endpoint" in result.stderr
    )
    values["networkPolicy"]["egress"] = {"enabled": False}
    policies = find(render(set_values=values, release=RELEASE, namespace=NAMESPACE), "NetworkPolicy")
    assert {p["metadata"]["name"] for p in policies} == {f"{FULLNAME}-ray", f"{FULLNAME}-mlflow"}
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)


def test_notes(tmp_path):
    result = helm(
        "install",
        RELEASE,
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        "--values",
        str(CHART / "ci" / "rayjob-own-cluster.yaml"),
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for needed in (
        f"kubectl port-forward -n {NAMESPACE} svc/{FULLNAME}-mlflow 5000:5000",
        f"kubectl port-forward -n {NAMESPACE} svc/{FULLNAME}-head-svc 8265:8265",
        "ray job submit --address http://127.0.0.1:8265",
        f"secret -n {NAMESPACE} {FULLNAME}-ray-auth -o jsonpath='{{.data.auth_token}}'",
        "export RAY_AUTH_MODE=token",
        f"kubectl get rayjob -n {NAMESPACE} {FULLNAME}-omniglot-5w1s",
        "/metrics",
        "tracking.prometheus_port=9400",
    ):
        assert needed in notes, needed


# -- the rendered commands are real ----------------------------------------------------------------


def _http(url: str, *, host: str | None = None, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if host:
        request.add_header("Host", host)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_rendered_commands_are_real(tmp_path, postgres, s3_server, s3_bucket, ray_cluster, monkeypatch):
    """The chart's MLflow pod (migration init containers, then the server with basic auth, artifacts
    proxied to S3) runs here from its rendered command, env and Secrets against the tests' PostgreSQL
    and S3; the chart's RayJob entrypoint and runtime env are submitted the way KubeRay's submitter
    does (`ray job submit ... -- <entrypoint>` through bash) to the tests' token-auth Ray head, with
    the Ray head pod's rendered environment; the run logs into that MLflow and checkpoints to S3.

    What is emulated, and why: Service DNS names resolve to 127.0.0.1 here (the URI's host is
    replaced); the head pod's environment reaches the driver through `ray start` in the pod, here
    through the job's env_vars; the image's working directory (/opt/metaplatform, holding configs/)
    is the job's working_dir.
    """
    import boto3
    import mlflow

    mlflow_port, driver_port = _free_port(), _free_port()
    values = {
        **GENERATE,
        "s3": {"endpoint": s3_server, "region": "us-east-1", "existingSecret": "s3-credentials"},
        "checkpoints": {"uri": f"s3://{s3_bucket}/checkpoints"},
        "ray": {"driverMetricsPort": driver_port},
        "mlflow": {
            "port": mlflow_port,
            "workers": 1,
            "artifactsDestination": f"s3://{s3_bucket}/mlflow",
            "experiment": "chart-test",
            "backendStore": {"existingSecret": "mlflow-db"},
            "auth": {"enabled": True},
        },
        "jobs": [
            {
                "name": "sinusoid",
                "preset": "configs/sinusoid.yaml",
                "cluster": "shared",
                "overrides": ["optim.iterations=100", "checkpoint.every=50", "eval.every=0", "log_every=50"],
                "runtimeEnv": {"env_vars": {"OMP_NUM_THREADS": "1"}},
            }
        ],
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    objects = render([tmp_path / "values.yaml"], release=RELEASE, namespace=NAMESPACE)
    # The Secrets a user creates before `helm install` (docs/deploy.md), besides those the chart renders.
    secrets = secret_data(
        objects,
        {
            "mlflow-db": {"uri": postgres.create_database(f"chart_{uuid.uuid4().hex[:8]}")},
            "s3-credentials": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        },
    )
    admin = (secrets[f"{FULLNAME}-mlflow-auth"]["username"], secrets[f"{FULLNAME}-mlflow-auth"]["password"])
    service = f"{FULLNAME}-mlflow.{NAMESPACE}.svc:{mlflow_port}"
    local = f"http://127.0.0.1:{mlflow_port}"

    pod = one(objects, "Deployment", f"{FULLNAME}-mlflow")["spec"]["template"]["spec"]
    with RenderedPod(pod, secrets) as mlflow_pod:
        mlflow_pod.run_init_containers()
        mlflow_pod.start("mlflow", ready=lambda: _http(f"{local}/health") == 200)

        # Basic auth on; the Service's name is an accepted Host, a foreign one is refused.
        search = f"{local}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _http(search, host=service) == 401
        assert _http(search, host=service, auth=admin) == 200
        assert _http(search, host="mlflow.attacker.example", auth=admin) == 403

        # The Ray head pod's environment, with the Service name resolved here.
        head = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        head_env = container_env(head, secrets)
        assert head_env["MLFLOW_TRACKING_URI"] == f"http://{service}"
        head_env["MLFLOW_TRACKING_URI"] = local
        head_env["HOME"] = str(tmp_path / "home")
        # The head's spool volume (mounted where METAPLATFORM_SPOOL says), here a folder of the host.
        assert head_env["METAPLATFORM_SPOOL"] in {m["mountPath"] for m in head["volumeMounts"]}
        head_env["METAPLATFORM_SPOOL"] = str(tmp_path / "spool-volume")
        job = one(objects, "RayJob")["spec"]
        runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}")
        runtime_env["env_vars"] = {**head_env, **runtime_env.get("env_vars", {})}
        runtime_env["working_dir"] = str(_image_workdir(tmp_path))

        scraped = []

        def scrape():  # the driver's /metrics while it runs (tracking.prometheus_port)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{driver_port}/metrics", timeout=2) as response:
                    body = response.read().decode()
                if "metaplatform_" in body:
                    scraped.append(body)
            except OSError:
                pass

        returncode, output = _submit_like_kuberay(ray_cluster, job["entrypoint"], runtime_env, tmp_path, scrape)
        assert returncode == 0, output[-5000:]
        assert "done: 100 iterations" in output, output[-5000:]
        assert scraped, "the driver's /metrics never answered with metaplatform_* series"

        # Checkpoints where the chart pointed them, in S3.
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert "checkpoints/sinusoid/ckpt-00000100.pt" in keys, keys
        # Its MLflow spool was on the spool volume (so not in the pod's /tmp), and is gone: delivered.
        assert (tmp_path / "spool-volume").is_dir() and not any((tmp_path / "spool-volume").iterdir())

        # The run is in the chart's experiment, with metrics; artifacts go through the server to S3.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        client = mlflow.MlflowClient(tracking_uri=local)
        experiment = client.get_experiment_by_name("chart-test")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics, run
        client.log_text(run.info.run_id, "probe", "probe.txt")
        keys = [
            o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="mlflow/").get("Contents", [])
        ]
        assert any(k.endswith("/probe.txt") for k in keys), keys


def _image_workdir(tmp_path: Path) -> Path:
    """What the image's working directory /opt/metaplatform holds: the presets."""
    workdir = tmp_path / "opt-metaplatform"
    shutil.copytree(REPO / "configs", workdir / "configs")
    return workdir


def _submit_like_kuberay(ray_cluster, entrypoint: str, runtime_env: dict, tmp_path: Path, poll=None, timeout=300):
    """What KubeRay's K8sJobMode submitter does: `ray job submit ... -- <entrypoint>` through bash,
    waiting for the job's end. Returns (exit code, output); `poll()` is called every 0.2 s meanwhile."""
    submit = (
        f"ray job submit --address {ray_cluster.dashboard_url} --submission-id chart-{uuid.uuid4().hex[:8]} "
        f"--runtime-env-json {shlex.quote(json.dumps(runtime_env))} -- {entrypoint}"
    )
    env = ray_cluster.subprocess_env(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    log = tmp_path / f"submit-{uuid.uuid4().hex[:6]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", submit], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if poll:
                    poll()
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def test_rendered_tune_command_is_real(tmp_path, ray_cluster, s3_bucket):
    """A Tune sweep RayJob's rendered entrypoint, submitted as KubeRay does, finishes with the
    sweep in S3 (what the trials' pods all reach on a cluster)."""
    import boto3

    values = {
        **GENERATE,
        "mlflow": {"enabled": False},
        "ray": {"driverMetricsPort": _free_port()},
        "checkpoints": {"uri": f"s3://{s3_bucket}/checkpoints"},
        "jobs": [
            {
                "name": "sweep",
                "command": "tune",
                "preset": "configs/sinusoid.yaml",
                "samples": 2,
                "scheduler": "fifo",
                "cluster": "shared",
                "overrides": ["optim.iterations=10", "eval.every=5", "log_every=5", "resources.workers=1"],
            }
        ],
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    job = one(render([tmp_path / "values.yaml"], release=RELEASE, namespace=NAMESPACE), "RayJob")["spec"]
    assert shlex.split(job["entrypoint"])[:9] == [
        "python", "-m", "platform.tune", "--config", "configs/sinusoid.yaml", "--samples", "2", "--scheduler", "fifo"
    ]  # fmt: skip
    # The pods' S3 settings (the chart's s3 Secret and endpoint) are the job's environment here.
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    runtime_env = {"working_dir": str(_image_workdir(tmp_path)), "env_vars": {"HOME": str(tmp_path), **aws}}
    returncode, output = _submit_like_kuberay(ray_cluster, job["entrypoint"], runtime_env, tmp_path, timeout=400)
    assert returncode == 0, output[-5000:]
    keys = [
        o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="checkpoints/sweep/")["Contents"]
    ]
    assert {"checkpoints/sweep/sweep.json", "checkpoints/sweep/best.yaml"} <= set(keys)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
